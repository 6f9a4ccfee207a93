"""Where every stage reads and writes, and how output folders are named.

Paths are relative to the repository root; dvc.yaml names the same ones. Checkpoint and export
folders are named ``step-<N>`` so that their names equal DVC's ``foreach`` items.
"""

from __future__ import annotations

import re
from pathlib import Path

RAW_DIR = Path("data/raw")
TOKENIZED_DIR = Path("data/tokenized")
CHECKPOINTS_DIR = Path("models/checkpoints")
EXPORT_DIR = Path("models/export")
METRICS_DIR = Path("metrics")

# Files below METRICS_DIR
TRAIN_SUMMARY = "train.json"
SUMMARY = "summary.json"  # the one metrics file `dvc exp show` compares
STEP_LOG, EVAL_LOG = "train_steps.tsv", "train_evals.tsv"

_STEP_NAME = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step}"


def parse_step(name: str) -> int | None:
    """The N of a ``step-N`` name (a folder, or a file stem), else None."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def step_folder(parent: Path, step: int) -> Path:
    """``parent/step-N``: a checkpoint or export folder."""
    return Path(parent) / step_name(step)


def evaluation_path(metrics_dir: Path, step: int) -> Path:
    """The evaluate stage's figures for one checkpoint."""
    return Path(metrics_dir) / "evaluate" / f"{step_name(step)}.json"


def samples_path(metrics_dir: Path, step: int) -> Path:
    """The evaluate stage's sample continuations for one checkpoint."""
    return Path(metrics_dir) / "samples" / f"{step_name(step)}.md"


def run_id_path(checkpoints_dir: Path) -> Path:
    """Where the training run's MLflow id is kept: beside the checkpoints, not inside them.

    Run ids differ from run to run, so they stay out of DVC-tracked outputs (git ignores it).
    """
    checkpoints_dir = Path(checkpoints_dir)
    return checkpoints_dir.parent / f".{checkpoints_dir.name}.mlflow_run_id"
