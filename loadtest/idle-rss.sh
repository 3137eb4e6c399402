#!/usr/bin/env bash
# Resident memory of each comfyq service as its own process: idle after start, then
# idle again after a burst of jobs (issue 8's "idle services each under 30 MiB").
#
#   cargo build --release --bins && bash loadtest/idle-rss.sh [jobs]
#
# Starts nats-server (temp store, free ports), a ComfyUI simulator and the four
# release binaries from target/release, reads VmRSS/VmHWM from /proc, stops them all.
set -euo pipefail

JOBS="${1:-100}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${ROOT}/target/release"
NATS_BIN="${NATS_SERVER_BIN:-${ROOT}/.tools/nats/bin/nats-server}"
for b in comfyq-ingress comfyq-scheduler comfyq-runner comfyq-notifier comfy-sim; do
    [[ -x "${BIN}/${b}" ]] || { echo "error: ${BIN}/${b} missing: cargo build --release --bins" >&2; exit 2; }
done
[[ -x "${NATS_BIN}" ]] || { echo "error: nats-server not found: bash deploy/dev.sh setup" >&2; exit 2; }

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "${pid}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "${WORK}"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NATS_PORT="$(free_port)"; SIM_PORT="$(free_port)"; HTTP_PORT="$(free_port)"

"${NATS_BIN}" -js -a 127.0.0.1 -p "${NATS_PORT}" -sd "${WORK}/js" >"${WORK}/nats.log" 2>&1 &
PIDS+=($!)
"${BIN}/comfy-sim" --listen "127.0.0.1:${SIM_PORT}" --data-dir "${WORK}/sim" >"${WORK}/sim.log" 2>&1 &
PIDS+=($!)
sleep 1

export COMFYQ_NATS__URL="nats://127.0.0.1:${NATS_PORT}" RUST_LOG="warn"
declare -A SERVICE_PID
start() {
    local name="$1"; shift
    env "$@" "${BIN}/${name}" >"${WORK}/${name}.log" 2>&1 &
    PIDS+=($!)
    SERVICE_PID[${name}]=$!
}
start comfyq-scheduler
start comfyq-notifier
start comfyq-runner COMFYQ_COMFYUI_URL="http://127.0.0.1:${SIM_PORT}"
start comfyq-ingress COMFYQ_HTTP_ADDR="127.0.0.1:${HTTP_PORT}" COMFYQ_OPEN_TENANT=local
API="http://127.0.0.1:${HTTP_PORT}"
for _ in $(seq 100); do curl -fsS "${API}/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

report() {
    printf '%-18s %10s %10s\n' "$1" "RSS MiB" "peak MiB"
    for name in comfyq-ingress comfyq-scheduler comfyq-runner comfyq-notifier; do
        local pid="${SERVICE_PID[${name}]}"
        kill -0 "${pid}" 2>/dev/null || { echo "error: ${name} exited; log: $(tail -n 5 "${WORK}/${name}.log")" >&2; exit 1; }
        awk -v n="${name}" '/^VmRSS/ {r=$2} /^VmHWM/ {h=$2} END {printf "%-18s %10.1f %10.1f\n", n, r/1024, h/1024}' "/proc/${pid}/status"
    done
}

sleep 5
report "idle after start"
for _ in $(seq "${JOBS}"); do
    curl -fsS -X POST "${API}/v1/jobs" -H 'content-type: application/json' \
        --data-binary @"${ROOT}/deploy/examples/invert.json" >/dev/null
done
for _ in $(seq 600); do
    queued="$(curl -fsS "${API}/v1/jobs?status=queued&limit=1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["jobs"]))')"
    running="$(curl -fsS "${API}/v1/jobs?status=running&limit=1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["jobs"]))')"
    [[ "${queued}" == 0 && "${running}" == 0 ]] && break
    sleep 0.5
done
completed="$(curl -fsS "${API}/v1/jobs?status=completed&limit=100" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["jobs"]))')"
echo "completed: ${completed} of ${JOBS} (counts up to 100)"
sleep 5
report "idle after ${JOBS} jobs"
