#!/usr/bin/env bash
# Runs the Kubernetes Deployment's pod (k8s/overlays/cpu, rendered by kubectl kustomize) on
# this machine with `podman kube play`, with the pod spec as written: read-only root file
# system, non-root user, dropped capabilities, the ConfigMap's settings, the /tmp emptyDir.
# Checks /ready and one streamed generation, then `podman kube down`.
#
# It is tests/test_deploy.py::test_kube_play_serves, required to run: `make test` skips it
# where podman or the image is missing, this script fails instead. Build the image first
# (make image; make image-test does both).
#
# Environment: IMAGE (default localhost/seq2serve:dev), PYTHON (default .venv/bin/python,
# which has pytest, httpx and PyYAML from the dev extra).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"

if [[ "$CONTAINER_ENGINE" != podman ]]; then
    echo "error: kube play needs podman (CONTAINER_ENGINE is $CONTAINER_ENGINE)" >&2
    exit 1
fi
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"
echo "== podman kube play k8s/overlays/cpu ($IMAGE)"
IMAGE="$IMAGE" SEQ2SERVE_REQUIRE_KUBE_PLAY=1 timeout 600 "$PYTHON" -m pytest -q -rA \
    -p no:cacheprovider "tests/test_deploy.py::test_kube_play_serves"
