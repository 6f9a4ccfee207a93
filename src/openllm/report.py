"""The ``report`` stage: one table and a few pictures across every evaluated checkpoint.

Writes ``metrics/checkpoints.tsv`` (a DVC plot of loss / bits per byte against step),
``metrics/results.md`` (the table the README shows) and PNG charts in ``metrics/plots/``,
which open offline (DVC's interactive plots load their JavaScript from a CDN).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from .fileio import read_json

TABLE_COLUMNS = ["step", "tokens_seen", "val_loss", "val_perplexity", "val_bits_per_byte"]


def collect(evaluate_dir: Path, steps: list[int]) -> list[dict[str, Any]]:
    """The metrics of each listed checkpoint, in step order."""
    return [read_json(evaluate_dir / f"step-{step}.json") for step in steps]


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    lines = ["\t".join(TABLE_COLUMNS)]
    lines += ["\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in TABLE_COLUMNS)
              for row in rows]
    path.write_text("\n".join(lines) + "\n")


def results_markdown(rows: list[dict[str, Any]], train_summary: dict[str, Any]) -> str:
    """A markdown table of the checkpoints plus how, where and how fast they were made."""
    lines = [
        "| checkpoint | tokens seen | val loss (nats/token) | perplexity | bits per byte |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| step-{row['step']} | {row['tokens_seen']:,} | {row['val_loss']:.4f} | "
                     f"{row['val_perplexity']:.2f} | {row['val_bits_per_byte']:.4f} |")
    machine = f"{cpu_name()} ({os.cpu_count()} cores)"
    lines += [
        "",
        f"Model: {train_summary.get('parameters', 0):,} parameters; trained {train_summary.get('steps')} steps on "
        f"{train_summary.get('device')} ({train_summary.get('precision')}, {train_summary.get('threads')} threads, "
        f"compiled: {train_summary.get('compiled')}) at {train_summary.get('tokens_per_second', 0):,.0f} tokens/s "
        f"in {train_summary.get('wall_seconds', 0) / 60:.1f} min on {machine}.",
        "Perplexity is exp(loss); bits per byte = total nats / (ln 2 x UTF-8 bytes of the validation text).",
    ]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_tsv(path: Path) -> dict[str, list[float]]:
    lines = [line.split("\t") for line in path.read_text().splitlines() if line]
    header, rows = lines[0], lines[1:]
    return {name: [float(r[i]) if r[i] not in ("", "nan") else float("nan") for r in rows]
            for i, name in enumerate(header)}


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
    """Run the report stage; return the rows."""
    rows = collect(metrics_dir / "evaluate", steps)
    write_table(rows, metrics_dir / "checkpoints.tsv")
    summary_path = metrics_dir / "train.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    (metrics_dir / "results.md").write_text(results_markdown(rows, summary))
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
