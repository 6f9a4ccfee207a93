"""The shared MLflow tracking server (ops/mlflow_server.py) on a live PostgreSQL.

A short DVC pipeline logs its run, metrics, artifacts and registry versions to the server and
nothing to the repository; the registry URIs it prints resolve through the server; two
trainings and several bare writers logging at the same time lose nothing.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT, subprocess_env
from servicekit import make_dvc_repo, repo_env

from openllm.tracking import read_run_id

EXPERIMENT, MODEL = "services-pipeline", "services-model"
TIMEOUT = 600


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_server_refuses_a_bad_port_with_a_clear_message():
    result = subprocess.run([sys.executable, "-m", "ops.mlflow_server", "--port", "0"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--port and --workers must be positive" in result.stderr


def test_pipeline_logs_runs_metrics_artifacts_and_registry_versions(mlflow_server, tmp_path, monkeypatch):
    repo = make_dvc_repo(tmp_path / "repo", {
        "export": {"register_model": True, "genai": False},  # the plain ONNX export is enough here
        "mlflow": {"experiment": EXPERIMENT, "registered_model": MODEL},
    })
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=repo_env(repo, MLFLOW_TRACKING_URI=mlflow_server.url),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # Nothing was written next to the repository: no SQLite file, no local artifact folders.
    assert not {"mlflow.db", "mlruns", "mlartifacts"} & {p.name for p in repo.iterdir()}

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    [run] = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run_id == read_run_id(repo / "models" / "checkpoints")
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "20"

    steps = {int(row["step"]): float(row["train_loss"]) for row in read_tsv(repo / "metrics" / "train_steps.tsv")}
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert history.keys() == {10, 20} and all(history[s] == pytest.approx(steps[s], rel=1e-5) for s in history)
    assert {m.step for m in client.get_metric_history(run_id, "eval_val_bits_per_byte")} == {10, 20}

    artifacts = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"samples/step-10.md", "samples/step-20.md"} <= artifacts, artifacts
    assert {a.path for a in client.list_artifacts(run_id, "plots")}, "the report's plots are missing"
    stored = mlflow_server.artifacts_dir / experiment.experiment_id / run_id / "artifacts" / "samples" / "step-20.md"
    assert stored.read_text() == (repo / "metrics" / "samples" / "step-20.md").read_text()

    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert [(v.version, v.run_id) for v in versions] == [("1", run_id), ("2", run_id)]
    assert client.get_model_version_by_alias(MODEL, "newest").version == "2"
    assert client.get_model_version_by_alias(MODEL, "best").version in {"1", "2"}

    # What `openllm serve --model models:/...` and the app do: load a version through the server.
    from openllm.runtime import OnnxGenerator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    from_registry = OnnxGenerator.load(f"models:/{MODEL}@newest")
    from_folder = OnnxGenerator.load(repo / "models" / "export" / "step-20")
    assert from_registry.generate("Ka").text == from_folder.generate("Ka").text


def training_project(root: Path, tokenized: Path, seed: int) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "tokenized").symlink_to(tokenized, target_is_directory=True)
    params = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "context_length": 32},
        "train": {"max_steps": 60, "checkpoint_steps": [30, 60], "batch_size": 4, "eval_interval": 20,
                  "eval_batches": 2, "warmup_steps": 2, "compile": "false", "precision": "fp32",
                  "sample_tokens": 4, "device": "cpu", "seed": seed, "resume_interval": 1000},
        "evaluate": {"prompts": ["Ka"]},
        "mlflow": {"experiment": "services-concurrent"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_two_trainings_logging_at_once_lose_nothing(mlflow_server, tokenized, tmp_path):
    projects = [training_project(tmp_path / f"training-{i}", tokenized, seed=i) for i in range(2)]
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_server.url, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, "-m", "openllm", "train"], cwd=p, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in projects]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("services-concurrent")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    run_ids = [read_run_id(p / "models" / "checkpoints") for p in projects]
    assert set(run_ids) == set(runs) and len(runs) == 2
    for project, run_id in zip(projects, run_ids):
        assert runs[run_id].info.status == "FINISHED"
        logged = {int(r["step"]): float(r["train_loss"]) for r in read_tsv(project / "metrics" / "train_steps.tsv")}
        history = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
        assert history.keys() == set(range(10, 61, 10))
        assert all(history[s] == pytest.approx(logged[s], rel=1e-5) for s in history)
        evals = {int(r["step"]) for r in read_tsv(project / "metrics" / "train_evals.tsv")}
        assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == evals == {20, 30, 40, 60}
        samples = {a.path for a in client.list_artifacts(run_id, "samples")}
        assert samples == {f"samples/step-{s}.md" for s in evals}


def test_concurrent_writers_lose_no_point(mlflow_server):
    spec = importlib.util.spec_from_file_location("mlflow_writers", REPO_ROOT / "bench" / "mlflow_writers.py")
    writers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writers)
    result = writers.run_writers(mlflow_server.url, writers=4, steps=50)
    assert result["failed_calls"] == 0 and result["errors"] == {}, result
    assert result["points_stored"] == result["points_expected"] == 4 * 50 * len(writers.METRICS), result
