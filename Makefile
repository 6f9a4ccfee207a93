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

.PHONY: setup run exp-show mlflow-ui test results app serve bench clean docs docs-serve

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup  ## check params.yaml, then build every stage of dvc.yaml that is out of date
	python -m openllm check
	dvc repro

mlflow-ui: setup  ## the MLflow UI over mlflow.db on http://127.0.0.1:5000 (this machine only)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

exp-show: setup  ## compare experiments: the summary metrics and the params that differ
	dvc exp show --only-changed --drop 'Created|State|Executor|.*perplexity|.*tokens_seen' --precision 4

test: setup  ## the test suite (tiny models, real DVC/MLflow/Prefect/onnxruntime)
	python -m pytest --durations=15

results: setup  ## write the results table of the last `make run` into README.md
	python -m openllm report --readme README.md

docs: setup  ## the documentation site: figures from the trained checkpoints (docs/generated), then a strict build into site/
	python -m openllm.docs_figures
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict

docs-serve: docs  ## the documentation site on http://127.0.0.1:8001 (this machine only), rebuilt when a page changes
	NO_MKDOCS_2_WARNING=1 mkdocs serve --strict --dev-addr 127.0.0.1:8001

app: setup  ## the Streamlit comparison app on http://127.0.0.1:8501 (every model in models/export)
	streamlit run app/streamlit_app.py --server.address 127.0.0.1 --server.headless true --browser.gatherUsageStats false

serve: setup  ## OpenAI-compatible HTTP server for every model in models/export (params.yaml serve: 127.0.0.1:8000)
	python -m openllm serve

bench: setup  ## benchmarks -> bench/results/*.json and bench/results/README.md (about 45 min on 2 cores)
	python bench/training.py --out bench/results/training.json
	python bench/tokenizer.py --out bench/results/tokenizer.json
	python bench/generation.py --out bench/results/generation.json --workdir bench/.work
	python bench/server_load.py --model bench/.work/export/step-0 --out bench/results/server.json
	python bench/gpu.py --out bench/results/gpu.json
	python bench/pipeline.py --out bench/results/pipeline.json
	python bench/report.py

clean:  ## remove pipeline outputs (keeps .venv)
	rm -rf data/raw data/tokenized models/checkpoints models/export mlflow.db mlartifacts

.PHONY: mlflow-server
mlflow-server: setup  ## shared MLflow tracking server: PostgreSQL store, proxied artifacts in .mlflow-server/ (http://127.0.0.1:5000)
	python -m ops.mlflow_server $(MLFLOW_SERVER_ARGS)
