"""Tests for openllm.tracking: one store shared by processes that start together, readable runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_PIPELINE, subprocess_env, write_params
from openllm import tracking
from openllm.config import DataConfig, TokenizerConfig

# Opens the store the way every stage does, at an agreed moment (argv: tracking URI, start time).
OPEN_STORE = """
import sys, time
from openllm import tracking
while time.time() < float(sys.argv[1]):
    time.sleep(0.001)
mlflow = tracking.setup("race")
with mlflow.start_run():
    mlflow.log_metric("x", 1.0)
"""


def test_processes_opening_a_fresh_store_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = f"{time.time() + 8:.3f}"  # after every interpreter has imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, start], env=subprocess_env(MLFLOW_TRACKING_URI=uri),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("race")
    assert len(client.search_runs([experiment.experiment_id])) == 3
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND  # the training view


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    from helpers import TINY_DOCS
    from openllm import data, tokenizer

    root = tmp_path_factory.mktemp("tracking-corpus")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in TINY_DOCS.items():
        (corpus / name).write_text(text * 40, encoding="utf-8")
    data.download(DataConfig(source="files", folder=str(corpus), files={"glob": str(corpus / "*.txt")}), root / "raw")
    tokenizer.tokenize(root / "raw", root / "tokenized", TokenizerConfig(vocab_size=400, workers=1))
    return root / "tokenized"


def test_two_trainings_starting_together_share_a_fresh_store(tmp_path: Path, tokenized: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logs, procs = [], []
    for name in ("a", "b"):
        project = tmp_path / name
        (project / "data").mkdir(parents=True)
        (project / "data" / "tokenized").symlink_to(tokenized, target_is_directory=True)
        write_params(project, {**TINY_PIPELINE, "mlflow": {"experiment": "together"}})
        logs.append(project / "train.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "openllm", "train"], cwd=project, stdout=out,
                                          stderr=subprocess.STDOUT, env=subprocess_env(MLFLOW_TRACKING_URI=uri)))
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=300) == 0, log.read_text()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert len(runs) == 2
    name = tracking.run_name("micro", 20, tracking.git_sha(tmp_path))  # TINY_PIPELINE: micro resized, 20 steps
    for run in runs:
        assert run.info.run_name == name
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert {"tokenized/train.bin", "tokenized/val.bin"} <= set(inputs), inputs
        assert all(len(d.dataset.digest) == 16 for d in inputs.values())
        assert not [m for m in run.data.metrics if m.startswith("eval_eval_")]


def test_run_name_reads_preset_steps_and_short_sha() -> None:
    assert tracking.run_name("micro", 2400, "1a2b3c4d5e6f") == "micro-2400steps-1a2b3c4"
    assert tracking.run_name("tiny", 10, "unknown") == "tiny-10steps-nogit"
