#!/usr/bin/env bash
# End to end on the simulator variant (`bash deploy/dev.sh compose-e2e`):
# build the images, start compose.yaml + compose.sim.yaml (3 NATS nodes, 2
# ingress, 2 schedulers, notifier, a managed and an attached runner, the
# simulator), submit deploy/examples/invert.json through ingress-1, wait for it
# to complete on each runner (picked by label), download its output through
# ingress-2, kill the scheduler holding the dispatcher lease and one NATS
# node, run another job, tear down.
#
#   bash deploy/compose/e2e.sh [--prebuilt] [--keep]
#     --prebuilt  images from this host's release binaries (see deploy/images/build.sh)
#     --keep      leave the stack running afterwards
#
# Needs docker-compose and a Docker API. With none answering, as root with
# dockerd installed (Debian docker.io), it starts a private dockerd (data in
# .tools/dockerd) for the run and stops it afterwards.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
COMPOSE_DIR="${REPO_ROOT}/deploy/compose"
PROJECT="comfyq-e2e"
BUILD_ARGS=()
KEEP=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prebuilt) BUILD_ARGS+=(--prebuilt) ;;
        --keep) KEEP=1 ;;
        *) printf 'unknown argument: %s\n' "$1" >&2; exit 2 ;;
    esac
    shift
done

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v docker-compose >/dev/null || die "docker-compose not found (apt-get install docker-compose)"

DOCKERD_PID=""
start_private_dockerd() {
    local dir="${REPO_ROOT}/.tools/dockerd"
    mkdir -p "${dir}"
    step "no Docker daemon answers: starting a private dockerd (${dir})"
    dockerd --data-root "${dir}/data" --exec-root "${dir}/exec" --pidfile "${dir}/dockerd.pid" \
        -H "unix://${dir}/docker.sock" > "${dir}/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST="unix://${dir}/docker.sock"
    local i
    for i in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "${DOCKERD_PID}" 2>/dev/null || { tail -20 "${dir}/dockerd.log" >&2; die "dockerd exited"; }
        sleep 1
    done
    die "dockerd did not answer within 60 s"
}
if ! docker info >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v dockerd >/dev/null; then
        start_private_dockerd
    else
        die "no Docker daemon answers (DOCKER_HOST=${DOCKER_HOST:-unset}) and none can be started here"
    fi
fi

# Host ports: free ones, so a `comfyq up` on 8080 does not get in the way.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
export COMFYQ_HTTP_PORT COMFYQ_HTTP_PORT_2 COMFYQ_NATS_PORT COMFYQ_NATS_MONITOR_PORT
COMFYQ_HTTP_PORT="$(free_port)"
COMFYQ_HTTP_PORT_2="$(free_port)"
COMFYQ_NATS_PORT="$(free_port)"
COMFYQ_NATS_MONITOR_PORT="$(free_port)"
API1="http://127.0.0.1:${COMFYQ_HTTP_PORT}"
API2="http://127.0.0.1:${COMFYQ_HTTP_PORT_2}"

compose() {
    docker-compose -p "${PROJECT}" -f "${COMPOSE_DIR}/compose.yaml" -f "${COMPOSE_DIR}/compose.sim.yaml" "$@"
}

cleanup() {
    local status=$?
    if [[ "${status}" != 0 ]]; then
        step "failed: state and logs"
        compose ps >&2 || true
        compose logs --no-color --tail 40 >&2 || true
    fi
    if [[ "${KEEP}" == 0 ]]; then
        step "docker-compose down -v"
        compose down -v --remove-orphans >&2 || true
        if [[ -n "${DOCKERD_PID}" ]]; then
            kill "${DOCKERD_PID}" 2>/dev/null || true
            wait "${DOCKERD_PID}" 2>/dev/null || true
        fi
    else
        printf 'left running: API %s and %s (DOCKER_HOST=%s)\n' "${API1}" "${API2}" "${DOCKER_HOST:-default}" >&2
    fi
    exit "${status}"
}
trap cleanup EXIT

started=${SECONDS}
step "images"
bash "${REPO_ROOT}/deploy/images/build.sh" --engine docker "${BUILD_ARGS[@]}"
built=${SECONDS}

step "docker-compose up (simulator variant)"
compose up -d

# until_ok SECONDS description command...: poll a condition with a deadline.
until_ok() {
    local limit="$1" what="$2" deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        [[ ${SECONDS} -lt ${deadline} ]] || die "${what}: not within ${limit} s"
        sleep 1
    done
    printf '  %s (%d s)\n' "${what}" "$((SECONDS - built))" >&2
}
runners_registered() {
    [[ "$(curl -sf "${API1}/v1/runners" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["runners"]))')" == 2 ]]
}
all_healthy() {
    local unhealthy
    unhealthy="$(docker ps --filter "label=com.docker.compose.project=${PROJECT}" --format '{{.Names}} {{.Status}}' | grep -v '(healthy)' || true)"
    [[ -z "${unhealthy}" ]]
}
until_ok 180 "ingress-1 ready" curl -sf "${API1}/readyz"
until_ok 60 "ingress-2 ready" curl -sf "${API2}/readyz"
until_ok 180 "both runners registered" runners_registered
until_ok 120 "every container healthy" all_healthy
docker ps --filter "label=com.docker.compose.project=${PROJECT}" --format '  {{.Names}}: {{.Status}}' >&2

# Submit invert.json through ingress-1, wait for the end there,
# fetch the output through ingress-2, check it is a PNG.
# A submit refused while NATS elects new leaders (503) is retried, as a
# client would, for up to 60 s; the stall is reported.
# run_job NAME MODE: MODE (managed or attached) picks the runner by its label.
run_job() {
    local name="$1" mode="$2" job="" id status url first=${SECONDS}
    python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); j["runner_labels"] = {"mode": sys.argv[2]}; print(json.dumps(j))' \
        "${REPO_ROOT}/deploy/examples/invert.json" "${mode}" > "${tmp}/${name}.json"
    until job="$(curl -sf -X POST "${API1}/v1/jobs?wait=120" -H 'content-type: application/json' \
        -d @"${tmp}/${name}.json")"; do
        [[ $((SECONDS - first)) -lt 60 ]] || die "${name}: submit refused for 60 s"
        sleep 1
    done
    [[ $((SECONDS - first)) -gt 1 ]] && printf '  %s: submit accepted after %d s of refusals\n' "${name}" "$((SECONDS - first))" >&2
    id="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["id"])' "${job}")"
    status="$(curl -sf "${API2}/v1/jobs/${id}" | python3 -c 'import json, sys; j = json.load(sys.stdin); print(j["status"], j.get("runner") or "")')"
    [[ "${status}" == "completed sim-${mode}" ]] || die "${name}: job ${id} is ${status} (wanted completed by sim-${mode})"
    url="$(curl -sf "${API2}/v1/jobs/${id}" | python3 -c 'import json, sys; print(json.load(sys.stdin)["outputs"][0]["url"])')"
    curl -sf -o "${tmp}/${name}.png" "${API2}${url}" || die "${name}: output download failed"
    [[ "$(head -c 8 "${tmp}/${name}.png" | od -An -tx1 | tr -d ' \n')" == 89504e470d0a1a0a ]] \
        || die "${name}: output is not a PNG"
    printf '  %s: job %s %s, output %s bytes (PNG) via ingress-2\n' "${name}" "${id}" "${status}" \
        "$(wc -c < "${tmp}/${name}.png")" >&2
}
tmp="$(mktemp -d)"

step "jobs: deploy/examples/invert.json on each runner"
run_job job-1-managed managed
run_job job-2-attached attached

step "failover: kill the scheduler holding the dispatcher lease, and nats-3"
leader=""
for s in scheduler-1 scheduler-2; do
    if compose exec -T "${s}" /bin/busybox wget -q -O - http://127.0.0.1:9090/metrics 2>/dev/null \
        | grep -q '^comfyq_scheduler_dispatcher_active 1'; then
        leader="${s}"
    fi
done
[[ -n "${leader}" ]] || die "no scheduler reports comfyq_scheduler_dispatcher_active 1"
printf '  lease holder: %s\n' "${leader}" >&2
compose kill -s SIGKILL "${leader}" nats-3 >&2
# restart: unless-stopped brings them back at once: keep them down.
compose stop -t 0 "${leader}" nats-3 >&2
run_job job-3-after-failover managed
compose start "${leader}" nats-3 >&2
until_ok 120 "${leader} and nats-3 back and healthy" all_healthy

step "passed: end to end in $((SECONDS - built)) s after the images ($((built - started)) s)"
