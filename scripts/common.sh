# Shared by the container scripts (sourced, not run): picks the container engine and the
# image names. Callers set `set -euo pipefail` themselves.
#
#   CONTAINER_ENGINE  podman or docker (default: podman when installed, else docker)
#   IMAGE             the image to build and test (default localhost/seq2serve:dev)
#   BASE_IMAGE        the Python base image (default docker.io/library/python:3.11-slim)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-localhost/seq2serve:dev}"
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/python:3.11-slim}"

if [[ -z "${CONTAINER_ENGINE:-}" ]]; then
    if command -v podman >/dev/null 2>&1; then
        CONTAINER_ENGINE=podman
    elif command -v docker >/dev/null 2>&1; then
        CONTAINER_ENGINE=docker
    else
        echo "error: no container engine: install podman (apt-get install -y podman runc" \
            "debootstrap) or docker" >&2
        exit 1
    fi
fi

# podman's defaults fail on hosts with hybrid cgroups or without CAP_SYS_RESOURCE (CI
# containers among them); scripts/containers.conf selects runc and lower ulimits, which work
# everywhere runc is installed. An explicit CONTAINERS_CONF wins.
if [[ "$CONTAINER_ENGINE" == podman && -z "${CONTAINERS_CONF:-}" ]] \
    && command -v runc >/dev/null 2>&1; then
    export CONTAINERS_CONF="$ROOT/scripts/containers.conf"
fi

engine() {
    "$CONTAINER_ENGINE" "$@"
}

image_exists() {
    # `podman image exists` and `docker image inspect` both answer by exit status.
    if [[ "$CONTAINER_ENGINE" == podman ]]; then
        podman image exists "$1"
    else
        docker image inspect "$1" >/dev/null 2>&1
    fi
}
