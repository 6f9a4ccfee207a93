"""The summary a pipeline run publishes: each checkpoint's metrics now and before the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openllm.paths import METRICS_DIR
from openllm.paths import parse_step

SUMMARY_ARTIFACT = "openllm-pipeline-summary"  # key of the markdown artifact each run publishes
METRICS = ("val_loss", "val_bits_per_byte", "val_perplexity")


def checkpoint_metrics(root: Path) -> dict[int, dict[str, Any]]:
    """``metrics/evaluate/step-N.json`` of every evaluated checkpoint, by step."""
    found: dict[int, dict[str, Any]] = {}
    for path in (root / METRICS_DIR / "evaluate").glob("step-*.json"):
        step = parse_step(path.stem)
        if step is None:
            continue  # not a checkpoint's metrics file
        try:
            found[step] = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
    return dict(sorted(found.items()))


def compare_checkpoints(
    before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per checkpoint after the run: new / updated / unchanged, metrics now and before."""
    rows = []
    for step, now in after.items():
        previous = before.get(step)
        status = "new" if previous is None else "unchanged" if previous == now else "updated"
        row: dict[str, Any] = {"step": step, "status": status}
        for metric in METRICS:
            row[metric] = now.get(metric)
            row[f"previous_{metric}"] = previous.get(metric) if previous else None
        rows.append(row)
    return rows


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _delta(now: float | None, previous: float | None) -> str:
    return "–" if now is None or previous is None else f"{now - previous:+.4f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run's summary as markdown: what ran, the MLflow run, the checkpoints' metrics."""
    run_id, previous_run_id = summary["mlflow_run_id"], summary["previous_mlflow_run_id"]
    lines = [
        "# OpenLLM pipeline run",
        "",
        f"- repository: `{summary['repo']}`",
        f"- stages: {', '.join(summary['stages'])}",
        f"- DVC ran: {', '.join(summary['ran']) or 'nothing (everything was up to date)'}",
        f"- MLflow run: `{run_id}`"
        + (f" (before this run: `{previous_run_id}`)" if previous_run_id != run_id else ""),
    ]
    if summary["experiment"]:
        lines.append(f"- DVC experiment: `{summary['experiment']}` (`dvc exp show`)")
    lines += ["", "| checkpoint | status | val loss | before | Δ | bits/byte | before | Δ | perplexity | before |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in summary["checkpoints"]:
        cells = [f"step-{row['step']}", row["status"]]
        for metric in METRICS:
            now, before = row[metric], row[f"previous_{metric}"]
            cells += [_number(now), _number(before)]
            if metric != "val_perplexity":
                cells.append(_delta(now, before))
        lines.append("| " + " | ".join(cells) + " |")
    if not summary["checkpoints"]:
        lines.append("| (no evaluated checkpoint yet) |" + " |" * 9)
    return "\n".join(lines) + "\n"
