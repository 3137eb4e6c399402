"""Checks of rendered deploy recipes that schemas cannot make.

    python check_rendered.py k8s RENDERED.yaml      Helm output: references between objects,
                                                  KEDA and Prometheus Operator objects (no
                                                  CRD schemas here), TOML in ConfigMaps
    python check_rendered.py config BIN_DIR CASES   service binaries load the rendered,
                                                  compose and systemd configuration

Exit 1 on the first list of problems, printed one per line.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

WORKLOADS = ("Deployment", "StatefulSet")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_k8s(path):
    docs = load_docs(path)
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    workloads = [d for k in WORKLOADS for d in by_kind.get(k, {}).values()]
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})

    def pod_labels(w):
        return w["spec"]["template"]["metadata"].get("labels", {})

    for w in workloads:
        name = f'{w["kind"]}/{w["metadata"]["name"]}'
        if not selects(w["spec"]["selector"]["matchLabels"], pod_labels(w)):
            problems.append(f"{name}: selector does not match its pod labels")
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                vol = volumes.get(m["name"])
                if vol is None:
                    if m["name"] not in claims:
                        problems.append(f"{name}: mount {m['name']} has no volume")
                    continue
                if "configMap" in vol:
                    cm = configmaps.get(vol["configMap"]["name"])
                    if cm is None:
                        problems.append(f"{name}: ConfigMap {vol['configMap']['name']} not rendered")
                    elif m.get("subPath") and m["subPath"] not in cm.get("data", {}):
                        problems.append(f"{name}: ConfigMap has no key {m['subPath']}")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in secrets:
                    data = secrets[ref["name"]].get("stringData", {})
                    if ref["key"] not in data:
                        problems.append(f"{name}: Secret {ref['name']} has no key {ref['key']}")
            args = c.get("args", [])
            if "--config" in args:
                conf = args[args.index("--config") + 1]
                if not any(m["mountPath"] == conf for m in c.get("volumeMounts", [])):
                    problems.append(f"{name}: --config {conf} is not mounted")
            res = c.get("resources", {})
            if w["metadata"]["labels"].get("comfyq.dev/pool") and not any(
                k.endswith("/gpu") for k in res.get("limits", {})
            ):
                problems.append(f"{name}: a runner without a GPU limit")

    for kind in ("PodDisruptionBudget", "Service"):
        for obj in by_kind.get(kind, {}).values():
            sel = obj["spec"]["selector"]
            sel = sel.get("matchLabels", sel) if kind == "PodDisruptionBudget" else sel
            if not any(selects(sel, pod_labels(w)) for w in workloads):
                problems.append(f"{kind}/{obj['metadata']['name']}: selects no pods")
    for svc in by_kind.get("Service", {}).values():
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str):
                named = [
                    p["name"]
                    for w in workloads
                    if selects(svc["spec"]["selector"], pod_labels(w))
                    for c in w["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                ]
                if target not in named:
                    problems.append(f"Service/{svc['metadata']['name']}: no container port {target}")

    for sm in by_kind.get("ServiceMonitor", {}).values():
        if sm["apiVersion"] != "monitoring.coreos.com/v1":
            problems.append(f"ServiceMonitor/{sm['metadata']['name']}: apiVersion {sm['apiVersion']}")
        chosen = [
            s for s in by_kind.get("Service", {}).values()
            if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        ports = {p["name"] for s in chosen for p in s["spec"]["ports"]}
        if not chosen:
            problems.append(f"ServiceMonitor/{sm['metadata']['name']}: selects no Service")
        for ep in sm["spec"]["endpoints"]:
            if ep["port"] not in ports or not ep.get("path", "").startswith("/"):
                problems.append(f"ServiceMonitor/{sm['metadata']['name']}: endpoint {ep}")

    for so in by_kind.get("ScaledObject", {}).values():
        name = f"ScaledObject/{so['metadata']['name']}"
        if so["apiVersion"] != "keda.sh/v1alpha1":
            problems.append(f"{name}: apiVersion {so['apiVersion']}")
        spec = so["spec"]
        ref = spec["scaleTargetRef"]
        target = by_kind.get(ref.get("kind", "Deployment"), {}).get(ref["name"])
        if target is None:
            problems.append(f"{name}: target {ref} not rendered")
        elif "replicas" in target["spec"]:
            problems.append(f"{name}: target sets spec.replicas (it would fight the HPA)")
        if not 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]:
            problems.append(f"{name}: replica bounds")
        for t in spec["triggers"]:
            md = t["metadata"]
            if not all(isinstance(v, str) for v in md.values()):
                problems.append(f"{name}: trigger metadata values must be strings: {md}")
            if t["type"] == "nats-jetstream":
                need = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"}
                if need - md.keys():
                    problems.append(f"{name}: nats-jetstream lacks {sorted(need - md.keys())}")
                if not re.fullmatch(r"[A-Z0-9_]+_(PENDING|DISPATCH)", md.get("stream", "")):
                    problems.append(f"{name}: stream {md.get('stream')!r} is not a comfyq stream")
                if not re.fullmatch(r"dispatcher|dispatch-[a-z0-9_-]+", md.get("consumer", "")):
                    problems.append(f"{name}: consumer {md.get('consumer')!r}")
                if not re.fullmatch(r"[^/:]+:\d+", md.get("natsServerMonitoringEndpoint", "")):
                    problems.append(f"{name}: monitoring endpoint is host:port")
                if not md.get("lagThreshold", "").isdigit() or int(md["lagThreshold"]) < 1:
                    problems.append(f"{name}: lagThreshold {md.get('lagThreshold')!r}")
            elif t["type"] == "prometheus":
                if {"serverAddress", "query", "threshold"} - md.keys():
                    problems.append(f"{name}: prometheus trigger incomplete")
                elif md["query"].count("(") != md["query"].count(")"):
                    problems.append(f"{name}: unbalanced query")
            else:
                problems.append(f"{name}: unexpected trigger {t['type']}")

    for cm in configmaps.values():
        for key, text in cm.get("data", {}).items():
            if key.endswith(".toml"):
                try:
                    tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    problems.append(f"ConfigMap/{cm['metadata']['name']} {key}: {e}")
    for s in secrets.values():
        for key, text in s.get("stringData", {}).items():
            try:
                tomllib.loads(f"v = {text}")
            except tomllib.TOMLDecodeError as e:
                problems.append(f"Secret/{s['metadata']['name']} {key}: not inline TOML: {e}")

    if not workloads:
        problems.append("no workloads rendered")
    return problems, f"{len(docs)} objects"


FIELD_STAND_INS = {"metadata.name": "comfyq-runner-default-0", "spec.nodeName": "node-1"}


def rendered_configs(path):
    """(label, binary, config text, env) for each comfyq container of a Helm
    render: its --config file from the ConfigMap, its env as the pod gets it
    (Secrets the chart renders resolved, fieldRefs given stand-in values,
    Secrets the chart does not render skipped)."""
    docs = load_docs(path)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    for w in docs:
        if w["kind"] not in WORKLOADS:
            continue
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            args = c.get("args", [])
            image = c["image"].rsplit("/", 1)[-1].split(":")[0]
            if "--config" not in args or not image.startswith("comfyq-"):
                continue
            conf = args[args.index("--config") + 1]
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == conf)
            text = configmaps[volumes[mount["name"]]["configMap"]["name"]][mount["subPath"]]
            env = {}
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif "secretKeyRef" in e.get("valueFrom", {}):
                    ref = e["valueFrom"]["secretKeyRef"]
                    if ref["key"] in secrets.get(ref["name"], {}):
                        env[e["name"]] = secrets[ref["name"]][ref["key"]]
                elif "fieldRef" in e.get("valueFrom", {}):
                    env[e["name"]] = FIELD_STAND_INS[e["valueFrom"]["fieldRef"]["fieldPath"]]
            # A credentials file the cluster would mount: not here.
            env.pop("COMFYQ_NATS__CREDENTIALS_FILE", None)
            binary = "comfyq-runner" if image == "comfyq-runner-comfyui" else image
            yield f'{w["kind"]}/{w["metadata"]["name"]}', binary, text, env


def compose_configs(path, repo):
    """The same for each comfyq service of a `docker-compose config` output."""
    baked = {"comfyq-runner-comfyui": os.path.join(repo, "deploy/images/runner-comfyui/runner.toml")}
    for name, svc in load_docs(path)[0]["services"].items():
        image = svc["image"].rsplit("/", 1)[-1].split(":")[0]
        if image not in ("comfyq-ingress", "comfyq-scheduler", "comfyq-notifier", "comfyq-runner", "comfyq-runner-comfyui"):
            continue
        command = svc.get("command") or []
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if v is not None}
        if "--config" in command:
            target = command[command.index("--config") + 1]
            source = next(v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == target)
        else:
            source = baked.get(image)
        if source is None:
            text = ""
        else:
            with open(source) as f:
                text = f.read()
        if image == "comfyq-runner-comfyui":
            env.setdefault("COMFYQ_MANAGED__WORKING_DIR", "/nonexistent/ComfyUI")
        binary = "comfyq-runner" if image == "comfyq-runner-comfyui" else image
        yield f"compose {name}", binary, text, env


def run_config(bin_dir, binary, config_path, env, label):
    """The binary's exit code tells: 2 = configuration refused; 1 = it got as
    far as connecting to the (unreachable) NATS or launching ComfyUI."""
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "RUST_LOG": "error",
        **env,
        "COMFYQ_NATS__URL": "nats://127.0.0.1:1",
        "COMFYQ_NATS__CONNECT_TIMEOUT": "1s",
    }
    if binary == "comfyq-runner":
        full_env["COMFYQ_COMFYUI_READY_TIMEOUT"] = "1s"
        with open(config_path) as f:
            managed = "managed" in f.read() or any(k.startswith("COMFYQ_MANAGED__") for k in env)
        if managed:
            # Launching ComfyUI fails at once here (no ComfyUI): one try.
            full_env["COMFYQ_MANAGED__START_ATTEMPTS"] = "1"
            full_env["COMFYQ_MANAGED__READY_TIMEOUT"] = "1s"
    args = [os.path.join(bin_dir, binary), "--config", config_path]
    if binary == "comfyq-ingress":
        args += ["--http-addr", "127.0.0.1:0"]
    try:
        done = subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return [f"{label}: {binary} did not exit within 60 s"]
    if done.returncode == 1:
        return []
    return [f"{label}: {binary} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-400:]}"]


def env_file(path):
    """KEY=VALUE lines as systemd reads them (outer single quotes removed)."""
    env = {}
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        env[key] = value
    return env


def check_configs(bin_dir, cases):
    """cases: a JSON list of {"label", "helm": rendered file}, {"label",
    "compose": config output, "repo": root} or {"label", "binary", "config",
    "env": [systemd environment files], "vars": {...}}."""
    problems = []
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        for case in json.loads(cases):
            found = []
            if "helm" in case:
                found = rendered_configs(case["helm"])
            elif "compose" in case:
                found = compose_configs(case["compose"], case["repo"])
            for label, binary, text, env in found:
                path = os.path.join(tmp, f"{count}.toml")
                with open(path, "w") as f:
                    f.write(text)
                problems += run_config(bin_dir, binary, path, env, f"{case['label']}: {label}")
                count += 1
            if "binary" in case:
                env = {}
                for f in case.get("env", []):
                    env.update(env_file(f))
                env.update(case.get("vars", {}))
                problems += run_config(bin_dir, case["binary"], case["config"], env, case["label"])
                count += 1
    return problems, f"{count} configurations loaded by the service binaries"


def main():
    if sys.argv[1] == "k8s":
        problems, what = check_k8s(sys.argv[2])
    elif sys.argv[1] == "config":
        problems, what = check_configs(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"  ok: {what}", file=sys.stderr)


if __name__ == "__main__":
    main()
