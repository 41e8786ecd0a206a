#!/usr/bin/env bash
# Builds the server image (what `make image` runs): makes sure the base image is present
# (scripts/base-image.sh: pulled, or built with debootstrap when no registry is reachable),
# then builds the Dockerfile with podman or docker and prints the build time and image size.
#
# Environment:
#   VARIANT     cpu (default) or cuda
#   IMAGE       default localhost/seq2serve:dev (cpu), localhost/seq2serve:dev-cuda (cuda)
#   BASE_IMAGE  default python:3.11-slim (cpu), nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
#               (cuda: the CUDA and cuDNN majors onnxruntime-gpu 1.31 is built for)
#   CONTAINER_ENGINE  podman or docker (scripts/common.sh)
# Extra arguments go to the build command, e.g.
#   scripts/build-image.sh --build-arg PIP_INDEX_URL=https://pypi.internal/simple
set -euo pipefail

VARIANT="${VARIANT:-cpu}"
case "$VARIANT" in
    cpu) ;;
    cuda)
        IMAGE="${IMAGE:-localhost/seq2serve:dev-cuda}"
        BASE_IMAGE="${BASE_IMAGE:-docker.io/nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04}"
        ;;
    *)
        echo "error: VARIANT must be cpu or cuda, got $VARIANT" >&2
        exit 2
        ;;
esac
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"

build_args=(--build-arg "VARIANT=$VARIANT" --build-arg "BASE_IMAGE=$BASE_IMAGE")
if [[ "$VARIANT" == cpu ]]; then
    # Pulled, or built with debootstrap where no registry is reachable. NVIDIA's CUDA image
    # for the cuda variant has no such stand-in: the engine pulls it.
    "$ROOT/scripts/base-image.sh"
fi
if [[ "$CONTAINER_ENGINE" == podman ]]; then
    # podman writes OCI images by default, which have no HEALTHCHECK; the docker format keeps it.
    build_args+=(--format docker)
fi

start=$(date +%s)
engine build "${build_args[@]}" "$@" -t "$IMAGE" "$ROOT"
took=$(($(date +%s) - start))
size_bytes="$(engine image inspect --format '{{.Size}}' "$IMAGE")"
echo "built $IMAGE ($VARIANT) in ${took} s: $((size_bytes / 1000000)) MB"
