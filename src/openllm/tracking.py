"""MLflow setup in one place: the store, the experiment, the training run and its tags.

The default store is ``sqlite:///<repo>/mlflow.db`` with an absolute path, so stages run by
``dvc repro``, ``dvc exp run`` (in a temporary copy of the repo) and Prefect all land in the same
store; ``MLFLOW_TRACKING_URI`` overrides it. The training run's id is written next to the
checkpoints so that evaluate and export log into the same run.
"""

from __future__ import annotations

import logging
import os
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"
logging.getLogger("alembic").setLevel(logging.WARNING)  # MLflow's schema migrations are chatty


def repo_root(start: Path | None = None) -> Path:
    """The main repository's root, also from inside a ``dvc exp run`` temporary copy.

    DVC runs queued/temp experiments in ``.dvc/tmp/exps/...``; ``DVC_ROOT`` and the git common
    dir lead back to the user's checkout, so every run lands in one MLflow store.
    """
    start = Path(start or Path.cwd()).resolve()
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=start, capture_output=True, text=True, check=True,
        ).stdout.strip()
        root = Path(common).parent
        if (root / "dvc.yaml").is_file() or (root / "params.yaml").is_file():
            return root
    except (OSError, subprocess.CalledProcessError):
        pass
    return start


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def setup(experiment: str):
    """Point MLflow at the project's store and experiment; return the ``mlflow`` module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None
        if tracking_uri().startswith("sqlite:///"):
            artifacts = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        except Exception:  # created meanwhile by another process
            pass
    mlflow.set_experiment(experiment)
    return mlflow


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def git_sha(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_tags(extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {"git_sha": git_sha()}
    for package in ("torch", "numpy", "sentencepiece", "dvc", "mlflow", "onnx", "onnxruntime"):
        try:
            tags[f"version.{package}"] = version(package)
        except Exception:
            pass
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    tags.update(extra or {})
    return tags


def read_run_id(checkpoints_dir: Path) -> str | None:
    path = Path(checkpoints_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def open_run(mlflow, run_id: str | None, log_system_metrics: bool = False):
    """Resume the run ``run_id`` when the store still has it, else start a new one."""
    if run_id:
        try:
            mlflow.get_run(run_id)
            return mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
        except Exception:
            pass
    return mlflow.start_run(log_system_metrics=log_system_metrics)
