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
	$(PIP) -e '.[train,dev]'
	touch $@ $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/seq2serve serve

test: $(DEV_STAMP)
	$(BIN)/ruff check seq2serve tests
	$(BIN)/ruff format --check seq2serve tests
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check seq2serve tests
	$(BIN)/ruff format --check seq2serve tests
	$(BIN)/mypy seq2serve

bench: $(DEV_STAMP)
	$(BIN)/seq2serve bench

# Reproduces the shipped default checkpoint (about 15 minutes on 2 CPU cores).
train: $(DEV_STAMP)
	$(BIN)/seq2serve train --out models/default

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
