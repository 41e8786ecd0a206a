# The verbs people type. Every target sets up .venv itself from nothing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, pinned to the CPU build: any other spec pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

SERVE_STAMP := $(VENV)/.serve-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: serve test lint bench train export clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[train,dev,hf]'
	touch $@ $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/seq2serve serve

test: lint
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check seq2serve tests
	$(BIN)/ruff format --check seq2serve tests
	$(BIN)/mypy --strict

bench: $(DEV_STAMP)
	$(BIN)/seq2serve bench

# The reference workload of the README's peer table: an opus-mt-en-de-sized Marian with
# random weights (built here, nothing downloaded), benchmarked against transformers and
# CTranslate2 on the same weights.
# The bundle is rebuilt when the code that converts or exports it changes.
REFERENCE := bench-results/reference/bundle/manifest.json
$(REFERENCE): $(DEV_STAMP) $(wildcard seq2serve/export/*.py seq2serve/hf/*.py seq2serve/model/*.py)
	$(BIN)/python -m seq2serve.hf.reference --out bench-results/reference

.PHONY: bench-reference
bench-reference: $(REFERENCE)
	$(BIN)/seq2serve bench --model bench-results/reference/bundle \
		--json bench-results/reference.json

# Reproduces the shipped default bundle: train (about 10 minutes on 2 CPU cores), then export
# with int8 graphs, parity and held-out figures in the manifest.
train: $(DEV_STAMP)
	$(BIN)/seq2serve train --out runs/default
	$(BIN)/seq2serve export runs/default --out models/default --quantize int8 --verify

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info

# The server image and its smoke test (podman or docker; docs/deploy.md). Not part of
# `make test`: they need a container engine. image-test builds, runs the image read-only
# (SSE, encode, classify, SIGTERM drain) and runs the k8s Deployment under podman kube play.
.PHONY: image image-test
image:
	scripts/build-image.sh

image-test: $(DEV_STAMP)
	scripts/image-test.sh
	PYTHON=$(BIN)/python scripts/kube-play-test.sh

# The reliability suite's long form (about 15 minutes on 2 cores): load, a 10-minute soak,
# cancellation, overload, bad bundles, SIGTERM drain, hostile input with schemathesis, API
# keys and pip-audit, against real servers on 127.0.0.1. Prints each figure against its bar
# and writes bench-results/reliability.json. `make test` runs the short form.
.PHONY: reliability
reliability: $(DEV_STAMP)
	$(BIN)/python -m seq2serve.reliability --out bench-results/reliability.json
