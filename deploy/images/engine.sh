# Container engine helpers, sourced by deploy/images/build.sh and
# deploy/compose/e2e.sh.

# pick_engine [docker|podman]: the engine to build and run with. Without a
# choice: docker if a Docker daemon answers, else podman. Run podman_compat
# after it (in this shell) when it picked podman.
pick_engine() {
    local wanted="${1:-}"
    case "${wanted}" in
        docker | podman) ;;
        "")
            if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
                wanted=docker
            elif command -v podman >/dev/null 2>&1; then
                wanted=podman
            else
                printf 'error: no container engine: start a Docker daemon, or apt-get install podman\n' >&2
                return 1
            fi
            ;;
        *) printf 'error: unknown engine %s\n' "${wanted}" >&2; return 1 ;;
    esac
    printf '%s\n' "${wanted}"
}

# Some sandboxes refuse what rootful podman asks by default: crun cannot run
# on hybrid cgroups (v1 controllers with a v2 mount), and raising RLIMIT_NOFILE
# or RLIMIT_NPROC above the parent's hard limit fails. podman_compat IMAGE runs
# IMAGE once; if that fails, it points podman (this shell's CONTAINERS_CONF)
# at a containers.conf that uses runc on hybrid cgroups and keeps the limits
# within the current ones, and tries again. COMFYQ_PODMAN_COMPAT=0 skips it.
podman_compat() {
    local image="$1"
    [[ "${COMFYQ_PODMAN_COMPAT:-auto}" == 0 || -n "${CONTAINERS_CONF:-}" ]] && return 0
    podman run --rm --entrypoint /bin/true "${image}" >/dev/null 2>&1 && return 0
    local nofile nproc dir="${REPO_ROOT}/.tools/podman"
    nofile="$(ulimit -Hn)"
    nproc="$(ulimit -Hu)"
    [[ "${nofile}" == unlimited || "${nofile}" -gt 65536 ]] && nofile=65536
    [[ "${nproc}" == unlimited || "${nproc}" -gt 16384 ]] && nproc=16384
    mkdir -p "${dir}"
    {
        printf '# written by deploy/images/engine.sh (podman_compat)\n[containers]\n'
        printf 'default_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' "${nofile}" "${nofile}" "${nproc}" "${nproc}"
        if [[ -d /sys/fs/cgroup/unified && ! -f /sys/fs/cgroup/cgroup.controllers ]]; then
            printf '[engine]\nruntime = "runc"\n'
        fi
    } > "${dir}/containers.conf"
    export CONTAINERS_CONF="${dir}/containers.conf"
    printf 'podman: a plain run failed; using %s:\n' "${CONTAINERS_CONF}" >&2
    cat "${CONTAINERS_CONF}" >&2
    podman run --rm --entrypoint /bin/true "${image}" >/dev/null \
        || { printf 'error: podman cannot run containers here\n' >&2; return 1; }
}
