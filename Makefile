# Two commands for a new user: `make run` (train the default model) and `make test`.
# Both create .venv with pip when it is missing and skip work already done.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test results app serve bench clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup  ## build every stage of dvc.yaml that is out of date
	dvc repro

test: setup  ## the test suite (tiny models, real DVC/MLflow/Prefect/onnxruntime)
	python -m pytest

results: setup  ## write the results table of the last `make run` into README.md
	python -m openllm report --readme README.md

clean:  ## remove pipeline outputs (keeps .venv)
	rm -rf data/raw data/tokenized models mlflow.db mlartifacts
