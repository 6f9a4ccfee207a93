"""The report: one summary, one table and a few pictures across the listed checkpoints.

Writes ``metrics/summary.json`` (the metrics file ``dvc exp show`` and ``dvc metrics diff``
compare: the same keys in every experiment, whatever its checkpoint steps),
``metrics/checkpoints.tsv`` (a DVC plot of loss / bits per byte against step),
``metrics/results.md`` (the table the README shows) and PNG charts in ``metrics/plots/``, which
open offline (DVC's interactive plots load their JavaScript from a CDN). Every file depends on
the params, code and data only: timings live in MLflow.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from .fileio import read_json, write_json
from .paths import SUMMARY, TRAIN_SUMMARY, evaluation_path, parse_step

TABLE_COLUMNS = ["step", "tokens_seen", "val_loss", "val_perplexity", "val_bits_per_byte"]


# What summary.json reports of a checkpoint, headline first: bits per byte compares models
# whatever their tokenizer; loss and perplexity are per token, so they change with the vocabulary.
SUMMARY_FIGURES = ["val_bits_per_byte", "val_loss", "val_perplexity", "step", "tokens_seen"]


def collect(metrics_dir: Path, steps: list[int]) -> list[dict[str, Any]]:
    """The metrics of each listed checkpoint, in step order."""
    return [read_json(evaluation_path(metrics_dir, step)) for step in steps]


def summarize(rows: list[dict[str, Any]], train_summary: dict[str, Any]) -> dict[str, Any]:
    """The final and the best checkpoint's figures, and what the model cost."""
    best = min(rows, key=lambda row: row["val_bits_per_byte"])
    return {
        "final": {key: rows[-1][key] for key in SUMMARY_FIGURES},
        "best": {key: best[key] for key in SUMMARY_FIGURES},
        "parameters": rows[-1]["parameters"],
        "train_steps": train_summary.get("steps"),
        "train_flops": train_summary.get("train_flops"),
    }


def remove_unlisted(metrics_dir: Path, export_dir: Path, steps: list[int]) -> list[Path]:
    """Delete the evaluate and export outputs of checkpoint steps no longer listed."""
    listed, removed = set(steps), []
    candidates = [*(Path(metrics_dir) / "evaluate").glob("step-*.json"),
                  *(Path(metrics_dir) / "samples").glob("step-*.md"), *Path(export_dir).glob("step-*")]
    for path in candidates:
        step = parse_step(path.name.split(".")[0])
        if step is None or step in listed:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path)
    return sorted(removed)


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    lines = ["\t".join(TABLE_COLUMNS)]
    lines += ["\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in TABLE_COLUMNS)
              for row in rows]
    path.write_text("\n".join(lines) + "\n")


def results_markdown(rows: list[dict[str, Any]], train_summary: dict[str, Any]) -> str:
    """A markdown table of the checkpoints plus how and where they were made."""
    sliding = all("val_bits_per_byte_sliding" in row for row in rows)
    lines = [
        "| checkpoint | tokens seen | val loss (nats/token) | perplexity | bits per byte |"
        + (" bits per byte, sliding |" if sliding else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if sliding else ""),
    ]
    for row in rows:
        lines.append(f"| step-{row['step']} | {row['tokens_seen']:,} | {row['val_loss']:.4f} | "
                     f"{row['val_perplexity']:.2f} | {row['val_bits_per_byte']:.4f} |"
                     + (f" {row['val_bits_per_byte_sliding']:.4f} |" if sliding else ""))
    machine = train_summary.get("machine", {})
    lines += [
        "",
        f"Model: {train_summary.get('parameters', 0):,} parameters; trained {train_summary.get('steps')} steps "
        f"({train_summary.get('train_flops', 0):.2e} FLOPs) on {train_summary.get('device')} "
        f"({train_summary.get('precision')}, compiled: {train_summary.get('compiled')}, "
        f"{machine.get('threads')} threads) on {machine.get('cpu')} ({machine.get('cpu_count')} cores), "
        f"torch {machine.get('torch')}. Training time and speed: the MLflow run.",
        "Perplexity is exp(loss); bits per byte = total nats / (ln 2 x UTF-8 bytes of the validation text)"
        + (f", over {rows[-1]['val_protocol']}" if "val_protocol" in rows[-1] else "")
        + (f"; sliding: {rows[-1]['val_sliding_protocol']}" if sliding else "") + ".",
    ]
    return "\n".join(lines) + "\n"


def read_tsv(path: Path) -> dict[str, list[float]]:
    """Columns of a TSV log as lists of floats (empty cells are NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    names = rows[0].keys() if rows else []
    return {name: [float(row[name] or "nan") for row in rows] for name in names}


def draw_plots(rows: list[dict[str, Any]], metrics_dir: Path, plots_dir: Path) -> list[Path]:
    """Training curves and per-checkpoint figures as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    steps_path, evals_path = metrics_dir / "train_steps.tsv", metrics_dir / "train_evals.tsv"
    if steps_path.is_file():
        steps = read_tsv(steps_path)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps["step"], steps["train_loss"], label="train loss", linewidth=1)
        if evals_path.is_file():
            evals = read_tsv(evals_path)
            ax.plot(evals["step"], evals["val_loss"], "o-", label="validation loss")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="Training curves")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(plots_dir / "training_curves.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["val_bits_per_byte"] for r in rows], "o-")
        ax.set(xlabel="checkpoint step", ylabel="validation bits per byte", title="Bits per byte by checkpoint")
        ax.grid(alpha=0.3)
        written.append(plots_dir / "bits_per_byte.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return written


def build_report(metrics_dir: Path, steps: list[int]) -> dict[str, Any]:
    """Write the summary, table and plots; return the rows and the plot files."""
    rows = collect(metrics_dir, steps)
    write_table(rows, metrics_dir / "checkpoints.tsv")
    summary_path = metrics_dir / TRAIN_SUMMARY
    train_summary = read_json(summary_path) if summary_path.is_file() else {}
    write_json(metrics_dir / SUMMARY, summarize(rows, train_summary), sort_keys=False)
    (metrics_dir / "results.md").write_text(results_markdown(rows, train_summary))
    plots = draw_plots(rows, metrics_dir, metrics_dir / "plots")
    return {"rows": rows, "plots": plots}


def log_to_mlflow(experiment: str, run_id: str | None, metrics_dir: Path, plots: list[Path]) -> bool:
    """Add the plots and the results table to the training run, when the store has it."""
    from . import tracking

    if not run_id:
        return False
    mlflow = tracking.setup(experiment)
    try:
        mlflow.get_run(run_id)
    except Exception:  # another store, or the run was deleted: nothing to attach to
        return False
    with mlflow.start_run(run_id=run_id):
        for path in plots:
            mlflow.log_artifact(str(path), "plots")
        mlflow.log_artifact(str(metrics_dir / "results.md"))
    return True


def update_readme(readme: Path, results: str) -> None:
    """Replace the text between the results markers in the README with ``results``."""
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{results}{end}{tail}")
