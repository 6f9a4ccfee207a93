"""MLflow setup in one place: the store, the experiment, the training run and its tags.

The default store is ``sqlite:///<repo>/mlflow.db`` with an absolute path, so stages run by
``dvc repro``, ``dvc exp run`` (in a temporary copy of the repo) and Prefect all land in the same
store; ``MLFLOW_TRACKING_URI`` overrides it. The training run's id is kept beside the checkpoint
folder (not inside it: run ids differ between runs) so that evaluate and export log into that run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .paths import run_id_path

logging.getLogger("alembic").setLevel(logging.WARNING)  # MLflow's schema migrations are chatty
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"  # UI: training view


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


def tracking_uri(root: Path | None = None) -> str:
    """The store: ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in ``root`` (default: the repository's root)."""
    folder = Path(root).resolve() if root is not None else repo_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder / 'mlflow.db'}"


def init_store(uri: str | None = None, attempts: int = 5) -> None:
    """Create or upgrade a SQLite store's tables once, whoever else starts at the same moment.

    MLflow creates a new SQLite store's schema on first use; two processes doing that at once
    collide ("table ... already exists", "duplicate column name"). An exclusive lock on
    ``<db>.lock`` makes one process build the schema while the others wait, and a collision
    with a process that does not take the lock (``mlflow ui``) is retried.
    """
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    from alembic.util.exc import CommandError
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.exc import SQLAlchemyError

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for attempt in range(attempts):
            try:
                SqlAlchemyStore(uri, artifact_root(uri))
                return
            except (SQLAlchemyError, CommandError, MlflowException):  # a half-built schema: wait, look again
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))


def artifact_root(uri: str) -> str | None:
    """``mlartifacts/`` next to a SQLite store (MLflow's default would be the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def setup(experiment: str):
    """Point MLflow at the project's store and experiment; return the ``mlflow`` module.

    The experiment is created when missing, tagged so that MLflow's UI opens it in the
    model-training view.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    init_store(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_root(uri),
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another process
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
    for package in ("torch", "numpy", "sentencepiece", "dvc", "mlflow", "onnx", "onnxruntime", "onnxruntime-genai"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    tags.update(extra or {})
    return tags


def read_run_id(checkpoints_dir: Path) -> str | None:
    """The MLflow run that trained the checkpoints in ``checkpoints_dir`` (None if unknown)."""
    path = run_id_path(checkpoints_dir)
    return path.read_text().strip() or None if path.is_file() else None


def write_run_id(checkpoints_dir: Path, run_id: str) -> None:
    run_id_path(checkpoints_dir).write_text(run_id + "\n")


def open_run(mlflow, run_id: str | None, log_system_metrics: bool = False, run_name: str | None = None):
    """Resume the run ``run_id`` when the store still has it, else start a new one named ``run_name``."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            mlflow.get_run(run_id)
            return mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
        except MlflowException:  # deleted, or from another store
            pass
    return mlflow.start_run(run_name=run_name, log_system_metrics=log_system_metrics)


def run_name(preset: str, max_steps: int, sha: str | None = None) -> str:
    """A name a person can read: ``micro-2400steps-1a2b3c4``."""
    sha = sha or git_sha()
    return f"{preset}-{max_steps}steps-{sha[:7] if sha != 'unknown' else 'nogit'}"


def log_training_data(mlflow, tokenized_dir: Path, data_meta: dict[str, Any]) -> None:
    """Log the tokenized training split as the run's MLflow dataset, its digest from its sha256."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for split, context in (("train", "training"), ("val", "validation")):
        path = (Path(tokenized_dir) / data_meta[split]["file"]).resolve()
        dataset = MetaDataset(resolve_dataset_source(str(path)), name=f"{path.parent.name}/{path.name}",
                              digest=data_meta[split]["sha256"][:16])
        mlflow.log_input(dataset, context=context)
