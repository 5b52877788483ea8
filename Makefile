# Every target creates and uses .venv itself: `make run` and `make test` work from a fresh clone.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

# Stage subprocesses (dvc repro -> prefalign stage ...) must find the venv's tools.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Offline and no-telemetry switches (docs/design.md, "Offline"); the CLI sets the same defaults.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export GX_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_HOME ?= $(CURDIR)/.prefect
export AWS_EC2_METADATA_DISABLED ?= true

.PHONY: install run lint test test-fast repro ui-mlflow ui-prefect clean-outputs gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install  ## the whole pipeline on the demo world (Prefect flow, every stage through dvc repro)
	$(VENV)/bin/prefalign run

lint: install  ## ruff (lint + format check) and mypy on src/prefalign; the versions are pinned in pyproject
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint  ## lint, then the whole test suite (CPU, offline)
	$(PY) -m pytest -q

test-fast: install  ## unit tests only
	$(PY) -m pytest -q tests/unit

repro: install  ## the same stages through DVC alone, without Prefect or promotion
	$(VENV)/bin/dvc repro

ui-mlflow: install  ## MLflow UI on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

ui-prefect: install  ## Prefect UI on http://127.0.0.1:4200 (also runs schedules)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

clean-outputs:  ## remove pipeline outputs (not the DVC cache or remote)
	rm -rf data/world data/preferences data/features models/base models/reward models/dpo models/dro reports/*

# What a lent GPU machine lacks (Python 3.12, its own torch/transformers/accelerate, no network): the wheels
# benchmarks/gpu_check.sh installs there, at the versions of constraints.txt (benchmarks/GPU_CHECK.md).
GPU_WHEELS := diffusers peft pydantic pydantic_core annotated-types typing-inspection importlib_metadata
gpu-wheels:  ## download into .whl/ the wheels benchmarks/gpu_check.sh needs on a GPU machine
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $(foreach name,$(GPU_WHEELS),$(shell grep -i -m1 '^$(name)==' constraints.txt))
