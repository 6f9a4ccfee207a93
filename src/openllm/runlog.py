"""The training run's record: TSV curves for DVC plots, and MLflow for everything else.

The TSV files hold only what a rerun reproduces (losses, learning rate, gradient norm, tokens),
so two runs leave the same bytes; timings and throughput go to MLflow. Off rank 0 (torchrun) a
:class:`RunLogger` writes nothing.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from . import tracking
from .paths import EVAL_LOG, STEP_LOG, run_id_path

STEP_COLUMNS = ["step", "train_loss", "learning_rate", "grad_norm", "tokens_seen"]
EVAL_COLUMNS = ["step", "val_loss", "val_perplexity"]


class TsvLog:
    """A TSV file of rows keyed by step; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_until: int):
        self.path, self.columns = path, columns
        kept: list[list[str]] = []
        if path.is_file() and keep_until > 0:
            with open(path, newline="") as f:
                rows = list(csv.reader(f, delimiter="\t"))
            if rows and rows[0] == columns:
                kept = [row for row in rows[1:] if row and int(row[0]) <= keep_until]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows([columns, *kept])

    def append(self, **values: Any) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerow(
                [f"{values[c]:.6g}" if isinstance(values[c], float) else values[c] for c in self.columns])


class RunLogger:
    """Curves to ``metrics/``, and params, tags, metrics and samples to one MLflow run."""

    def __init__(self, enabled: bool, metrics_dir: Path, checkpoints_dir: Path, keep_until: int):
        self.enabled = enabled
        self.mlflow = self.run = None
        if enabled:
            self.steps = TsvLog(metrics_dir / STEP_LOG, STEP_COLUMNS, keep_until)
            self.evals = TsvLog(metrics_dir / EVAL_LOG, EVAL_COLUMNS, keep_until)
            self.checkpoints_dir = checkpoints_dir

    def start(self, experiment: str, resume: bool, name: str, params: dict[str, Any], tags: dict[str, str],
              tokenized_dir: Path, data_meta: dict[str, Any]) -> None:
        """Open the MLflow run: the one that made the resumed state, else a new one called ``name``."""
        if not self.enabled:
            return
        self.mlflow = tracking.setup(experiment)
        previous = tracking.read_run_id(self.checkpoints_dir) if resume else None
        self.run = tracking.open_run(self.mlflow, previous, log_system_metrics=True, run_name=name)
        run_id_path(self.checkpoints_dir).parent.mkdir(parents=True, exist_ok=True)
        tracking.write_run_id(self.checkpoints_dir, self.run.info.run_id)
        self.mlflow.set_tags(tracking.run_tags(tags))
        if self.run.info.run_id != previous:  # MLflow refuses to change the params of a run
            self.mlflow.log_params(params)
            tracking.log_training_data(self.mlflow, tokenized_dir, data_meta)

    def step(self, step: int, train_loss: float, learning_rate: float, grad_norm: float, tokens_seen: int,
             tokens_per_second: float, last: bool) -> None:
        if not self.enabled:
            return
        self.steps.append(step=step, train_loss=train_loss, learning_rate=learning_rate, grad_norm=grad_norm,
                          tokens_seen=tokens_seen)
        if step % 10 == 0 or last:
            self.mlflow.log_metrics({"train_loss": train_loss, "learning_rate": learning_rate,
                                     "grad_norm": grad_norm, "tokens_per_second": tokens_per_second}, step=step)

    def evaluation(self, step: int, val_loss: float, samples: str | None) -> None:
        if not self.enabled:
            return
        self.evals.append(step=step, val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 700)))
        self.mlflow.log_metrics({"val_loss": val_loss}, step=step)
        if samples is not None:
            self.mlflow.log_text(f"# Samples at step {step}\n\n{samples}\n", f"samples/step-{step}.md")

    def metrics(self, values: dict[str, float]) -> None:
        if self.enabled and self.mlflow is not None:
            self.mlflow.log_metrics(values)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def end(self, interrupted: bool) -> None:
        if self.run is not None:
            self.mlflow.end_run("KILLED" if interrupted else "FINISHED")
