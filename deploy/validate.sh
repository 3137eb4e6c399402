#!/usr/bin/env bash
# Validates every deploy recipe that can be checked without a cluster, a GPU
# or a container engine (`bash deploy/dev.sh test` runs it; so can you):
#
#   Helm     helm lint; helm template of the chart with three value sets
#            (defaults, ci/full-values.yaml, ci/external-nats-values.yaml);
#            the output against the Kubernetes 1.25 and 1.37 schemas
#            (kubernetes-validate --strict); references between the objects,
#            the KEDA and ServiceMonitor objects and the TOML files
#            (deploy/check_rendered.py)
#   compose  docker-compose config of the GPU and the simulator variants
#   systemd  systemd-analyze verify of every unit (in a scratch root), and
#            systemd-analyze security: each unit's exposure at most 4.0
#   configs  with COMFYQ_BIN_DIR (the service binaries): each rendered,
#            compose and systemd configuration is loaded by the real service,
#            which must refuse nothing (exit 2 = configuration refused)
#
# Tools: HELM, KUBERNETES_VALIDATE (default: .tools/ as `dev.sh setup` installs
# them), docker-compose and systemd-analyze on PATH. A missing tool fails the
# run unless COMFYQ_DEPLOY_ALLOW_MISSING=1, then its checks are skipped, saying so.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY="${REPO_ROOT}/deploy"
HELM="${HELM:-${REPO_ROOT}/.tools/helm/bin/helm}"
KUBERNETES_VALIDATE="${KUBERNETES_VALIDATE:-${REPO_ROOT}/.tools/kubevalidate/bin/kubernetes-validate}"
PYTHON="${DEPLOY_PYTHON:-$(dirname "${KUBERNETES_VALIDATE}")/python}"
BIN_DIR="${COMFYQ_BIN_DIR:-}"
K8S_VERSIONS=(1.25.0 1.37.0)

passed=0
failed=0
skipped=()
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

ok() { passed=$((passed + 1)); printf '  ok   %s\n' "$*" >&2; }
bad() { failed=$((failed + 1)); printf '  FAIL %s\n' "$*" >&2; }
run() {
    # run "description" command...: ok if it exits 0 (its output shown on failure)
    local what="$1"
    shift
    if "$@" > "${work}/out" 2>&1; then
        ok "${what}"
        grep -E '^  (ok: |[0-9]+ )' "${work}/out" | sed 's/^  /       /' >&2 || true
    else
        bad "${what}"
        sed 's/^/       /' "${work}/out" >&2
    fi
}
missing() {
    if [[ "${COMFYQ_DEPLOY_ALLOW_MISSING:-0}" == 1 ]]; then
        skipped+=("$1")
        printf '  skip %s\n' "$1" >&2
    else
        bad "$1"
    fi
}

helm_checks() {
    printf '==> Helm chart deploy/helm/comfyq\n' >&2
    if [[ ! -x "${HELM}" || ! -x "${KUBERNETES_VALIDATE}" ]]; then
        missing "helm or kubernetes-validate not installed (bash deploy/dev.sh setup)"
        return 0
    fi
    # The NATS dependency cannot be fetched here: render a copy without it
    # (its own objects are then absent; ours still assume its names).
    local chart="${work}/chart"
    cp -r "${DEPLOY}/helm/comfyq" "${chart}"
    "${PYTHON}" - "${chart}/Chart.yaml" <<'PY'
import sys, yaml
path = sys.argv[1]
chart = yaml.safe_load(open(path))
assert [d["name"] for d in chart.pop("dependencies")] == ["nats"], "unexpected dependencies"
yaml.safe_dump(chart, open(path, "w"))
PY
    run "helm lint" "${HELM}" lint --strict "${chart}" -f "${chart}/ci/full-values.yaml"
    local values
    for values in default ci/full-values.yaml ci/external-nats-values.yaml; do
        local out="${work}/rendered-${values//\//_}.yaml" args=()
        [[ "${values}" != default ]] && args=(-f "${chart}/${values}")
        if ! "${HELM}" template comfyq "${chart}" --namespace comfyq "${args[@]}" > "${out}" 2> "${work}/out"; then
            bad "helm template (${values})"
            sed 's/^/       /' "${work}/out" >&2
            continue
        fi
        ok "helm template (${values}): $(grep -c '^kind:' "${out}") objects"
        local version
        for version in "${K8S_VERSIONS[@]}"; do
            run "kubernetes-validate --strict -k ${version} (${values})" \
                "${KUBERNETES_VALIDATE}" --strict --quiet -k "${version}" "${out}"
        done
        run "object references, KEDA, ServiceMonitor, TOML (${values})" \
            "${PYTHON}" "${DEPLOY}/check_rendered.py" k8s "${out}"
        rendered+=("${values}=${out}")
    done
}

compose_checks() {
    printf '==> compose deploy/compose\n' >&2
    if ! command -v docker-compose >/dev/null 2>&1; then
        missing "docker-compose not installed (bash deploy/dev.sh setup)"
        return 0
    fi
    cd "${DEPLOY}/compose"
    run "docker-compose config (GPU: --profile gpu)" docker-compose -f compose.yaml --profile gpu config -q
    run "docker-compose config (simulator: + compose.sim.yaml)" \
        docker-compose -f compose.yaml -f compose.sim.yaml config -q
    docker-compose -f compose.yaml -f compose.sim.yaml config > "${work}/compose-sim.yaml"
    docker-compose -f compose.yaml --profile gpu config > "${work}/compose-gpu.yaml"
    run "compose variants: the services, the GPU reservation, the images" \
        "${PYTHON}" - "${work}/compose-sim.yaml" "${work}/compose-gpu.yaml" <<'PY'
import sys, yaml
sim, gpu = (yaml.safe_load(open(p))["services"] for p in sys.argv[1:])
always = {"nats-1", "nats-2", "nats-3", "ingress-1", "ingress-2", "scheduler-1", "scheduler-2", "notifier"}
want_sim = always | {"comfyui-sim", "runner-managed", "runner-attached"}
assert {s for s, v in sim.items() if not v.get("profiles")} == want_sim, sorted(sim)
assert set(gpu) == always | {"runner-gpu0"}, sorted(gpu)
runner = gpu["runner-gpu0"]
assert runner["profiles"] == ["gpu"]
devices = runner["deploy"]["resources"]["reservations"]["devices"]
assert devices and devices[0]["capabilities"] == ["gpu"], devices
assert any(v.endswith(":/models:ro") for v in runner["volumes"]), runner["volumes"]
for name, svc in {**sim, **gpu}.items():
    assert svc.get("restart") == "unless-stopped", name
    if name.startswith("nats-"):
        continue
    deps = svc.get("depends_on", {})
    assert all(deps.get(n, {}).get("condition") == "service_healthy" for n in ("nats-1", "nats-2", "nats-3")) \
        or name == "comfyui-sim", (name, deps)
print(f"  {len(want_sim)} services (simulator variant), {len(gpu)} (GPU variant)")
PY
    cd "${REPO_ROOT}"
}

systemd_checks() {
    printf '==> systemd deploy/systemd\n' >&2
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        missing "systemd-analyze not installed"
        return 0
    fi
    # A scratch root holding systemd's own units, ours, and stand-ins for the
    # binaries (verify checks that ExecStart= points at an executable).
    local root="${work}/sysroot"
    mkdir -p "${root}/etc/systemd/system" "${root}/usr/local/bin" "${root}/bin" "${root}/usr/lib/systemd"
    cp -a /usr/lib/systemd/system "${root}/usr/lib/systemd/"
    cp "${DEPLOY}"/systemd/*.service "${root}/etc/systemd/system/"
    local bin
    for bin in /usr/local/bin/comfyq-ingress /usr/local/bin/comfyq-scheduler /usr/local/bin/comfyq-notifier \
        /usr/local/bin/comfyq-runner /usr/local/bin/nats-server /bin/kill; do
        printf '#!/bin/sh\n' > "${root}${bin}"
        chmod +x "${root}${bin}"
    done
    local units=(comfyq-ingress.service comfyq-scheduler.service comfyq-notifier.service
        comfyq-runner@0.service comfyq-runner@1.service nats-server.service)
    # verify exits 0 on unknown keys and only warns: any output is a failure.
    if systemd-analyze verify --root="${root}" "${units[@]}" > "${work}/out" 2>&1 && [[ ! -s "${work}/out" ]]; then
        ok "systemd-analyze verify: ${units[*]}"
    else
        bad "systemd-analyze verify"
        sed 's/^/       /' "${work}/out" >&2
    fi
    # Hardening: systemd's exposure score of each unit (0 best, 10 worst).
    local unit scores=""
    for unit in "${units[@]}"; do
        if ! systemd-analyze security --offline=yes --root="${root}" --threshold=40 "${unit}" > "${work}/out" 2>&1; then
            bad "systemd-analyze security ${unit}: exposure above 4.0"
            tail -1 "${work}/out" >&2
            continue
        fi
        scores+=" ${unit%.service} $(tail -1 "${work}/out" | grep -oE '[0-9]+\.[0-9]+' | head -1)"
    done
    [[ -n "${scores}" ]] && ok "systemd-analyze security (exposure, 10 = worst):${scores}"
}

config_checks() {
    printf '==> configurations loaded by the services\n' >&2
    if [[ -z "${BIN_DIR}" ]]; then
        skipped+=("config-loading")
        printf '  skip no service binaries (COMFYQ_BIN_DIR, or built ones newer than the sources):\n' >&2
        printf '       the configurations were not loaded by the services\n' >&2
        return 0
    fi
    local cases="[" entry sep=""
    for entry in "${rendered[@]}"; do
        cases+="${sep}{\"label\": \"helm ${entry%%=*}\", \"helm\": \"${entry#*=}\"}"
        sep=", "
    done
    local c="${DEPLOY}/compose/config" s="${DEPLOY}/systemd/etc/comfyq"
    if [[ -f "${work}/compose-sim.yaml" ]]; then
        cases+="${sep}"'{"label": "compose (simulator)", "compose": "'"${work}"'/compose-sim.yaml", "repo": "'"${REPO_ROOT}"'"},
          {"label": "compose (GPU)", "compose": "'"${work}"'/compose-gpu.yaml", "repo": "'"${REPO_ROOT}"'"}'
        sep=", "
    fi
    cases+="${sep}"'{"label": "compose notifier with a signing secret", "binary": "comfyq-notifier", "config": "'"${c}"'/notifier.toml",
       "vars": {"COMFYQ_DEFAULT_SECRETS": "[\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]"}},
      {"label": "systemd ingress", "binary": "comfyq-ingress", "config": "'"${s}"'/ingress.toml", "env": ["'"${s}"'/comfyq.env"]},
      {"label": "systemd scheduler", "binary": "comfyq-scheduler", "config": "'"${s}"'/scheduler.toml", "env": ["'"${s}"'/comfyq.env"]},
      {"label": "systemd notifier", "binary": "comfyq-notifier", "config": "'"${s}"'/notifier.toml", "env": ["'"${s}"'/comfyq.env"],
       "vars": {"COMFYQ_TENANT_SECRETS": "{acme = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]}"}},
      {"label": "systemd runner@0", "binary": "comfyq-runner", "config": "'"${s}"'/runner.toml", "env": ["'"${s}"'/comfyq.env", "'"${s}"'/runner@0.env"]},
      {"label": "systemd runner@1", "binary": "comfyq-runner", "config": "'"${s}"'/runner.toml", "env": ["'"${s}"'/comfyq.env", "'"${s}"'/runner@1.env"]}]'
    run "every configuration loads (binaries in ${BIN_DIR})" \
        "${PYTHON}" "${DEPLOY}/check_rendered.py" config "${BIN_DIR}" "${cases}"
}

started=${SECONDS}
rendered=()
helm_checks
compose_checks
systemd_checks
config_checks
printf '==> deploy recipes: %d checks passed, %d failed%s (%d s)\n' "${passed}" "${failed}" \
    "${skipped:+, skipped: ${skipped[*]}}" "$((SECONDS - started))" >&2
[[ "${failed}" == 0 ]]
