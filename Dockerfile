# seq2serve: the HTTP server with the bundled default model, no PyTorch.
#
# CPU (the default; `make image` runs this with podman or docker):
#   podman build --format docker -t seq2serve:cpu .
# CUDA: onnxruntime-gpu instead of onnxruntime, on NVIDIA's CUDA runtime image (its CUDA and
# cuDNN major versions must be the ones the onnxruntime-gpu wheel was built for: CUDA 13 and
# cuDNN 9 for 1.31); run it with the NVIDIA container toolkit (`--gpus all`, or the
# device plugin's `nvidia.com/gpu` on Kubernetes):
#   docker build --build-arg VARIANT=cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 -t seq2serve:cuda .
#
# Build arguments:
#   VARIANT                  cpu | cuda; also the image's default SEQ2SERVE_DEVICE
#   BASE_IMAGE               any Debian/Ubuntu image; without python3, the distribution's is
#                            installed (the CUDA images carry none)
#   ONNXRUNTIME_GPU_VERSION  the onnxruntime-gpu release for VARIANT=cuda
#   PIP_INDEX_URL            a package index to build from (an internal mirror when air-gapped)
#
# Runtime: runs as uid 10001, writes nothing outside /tmp (a read-only root file system works),
# listens on 8000, serves the bundle in /models/default unless SEQ2SERVE_MODEL_DIR names
# another (a mounted volume). SIGTERM drains: /ready turns 503, streams finish, exit 0.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
# The CUDA runtime images have no Python; python:3.11-slim has, and then this installs nothing.
# The distribution's python3 is whatever that release ships, so its version is not pinned.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi


FROM base AS builder
ARG VARIANT=cpu
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Fail here, not at the first request, when the CUDA variant is built on a base without the
# libraries onnxruntime's CUDA provider loads (loading them needs no GPU).
RUN if [ "$VARIANT" = cuda ]; then \
        for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 \
                   libcufft.so.12 libcudnn.so.9; do \
            python3 -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$lib" \
            || { echo "VARIANT=cuda: $lib is missing; BASE_IMAGE needs CUDA 13 and cuDNN 9," \
                      "e.g. nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04" >&2; exit 1; }; \
        done; \
    elif [ "$VARIANT" != cpu ]; then \
        echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1; \
    fi
WORKDIR /src
# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml scripts/image_requirements.py ./
RUN python3 image_requirements.py --variant "$VARIANT" \
        --onnxruntime-gpu "$ONNXRUNTIME_GPU_VERSION" > requirements.txt \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
# README.md is the package's long description (pyproject's `readme`).
COPY README.md ./
COPY seq2serve ./seq2serve
# The installer itself is not needed to serve, nor hf-xet (huggingface_hub's transfer backend,
# pulled in through tokenizers; the server never downloads from a hub). Bytecode is compiled
# here with hashes that are never checked against source times, so the read-only runtime has
# nothing to write and no copy step's timestamps can make it stale.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip uninstall -y pip setuptools hf-xet \
    && /opt/venv/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
        /opt/venv/lib >/dev/null


FROM base AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="seq2serve" \
      org.opencontainers.image.description="Transformer encoder-decoder server (ONNX Runtime, ${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 seq2serve \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin seq2serve
COPY --from=builder /opt/venv /opt/venv
# Owned by root and not writable by the server's user: the bundle and code are read-only
# whatever the root file system's mode.
COPY models/default /models/default
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SEQ2SERVE_MODEL_DIR=/models/default \
    SEQ2SERVE_DEVICE=${VARIANT} \
    SEQ2SERVE_HOST=0.0.0.0 \
    SEQ2SERVE_PORT=8000
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# /health, not /ready: a draining server is healthy. No curl in the image; Python is there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SEQ2SERVE_PORT', '8000') + '/health', timeout=4)"]
# Exec form: the server is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["/opt/venv/bin/seq2serve"]
CMD ["serve"]
