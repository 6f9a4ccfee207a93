"""Stage ``table`` of the budget study: one table and two plots from the grid's cell results.

Reads ``results/cells/<name>.json`` for every cell of params.yaml's grid (files of cells no
longer in the grid are left out), writes ``results/table.md`` and ``results/plots/*.png`` and
attaches them to the study run in MLflow. The figures (results, power-law fits) come from
openllm.study; how they are laid out on the page and in the plots lives here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from openllm.errors import exit_status
from openllm.study import collect_results, grid_cells, load_study, log_study_files, study_fits


def table_markdown(rows: list[dict[str, Any]], fits: dict[str, dict[str, float] | None]) -> str:
    """One row per cell, best first, then the protocol and the fitted power laws."""
    sliding = any("val_bits_per_byte_sliding" in r for r in rows)
    lines = ["| cell | TFLOPs | layers | width | parameters | optimizer | lr | schedule | batch | steps | tokens "
             "| val bits/byte |" + (" sliding |" if sliding else ""), "|" + " --- |" * (13 if sliding else 12)]
    for r in sorted(rows, key=lambda r: (r.get("val_bits_per_byte") is None, r.get("val_bits_per_byte") or 0)):
        c, bpb = r["cell"], r.get("val_bits_per_byte")
        lines.append(f"| {r['name']} | {c['tflops']:g} | {c['n_layer']} | {c['n_embd']} | {r['parameters']:,} "
                     f"| {c['optimizer']} | {c['learning_rate']:g} | {c['schedule']} | {c['batch_size']} "
                     f"| {r['steps']:,} | {r['tokens']:,} | {'diverged' if bpb is None else f'{bpb:.4f}'} |"
                     + (f" {r['val_bits_per_byte_sliding']:.4f} |" if "val_bits_per_byte_sliding" in r
                        else " – |" if sliding else ""))
    if rows:
        p = rows[0]["val_protocol"]
        lines += ["", f"Scored on the validation split ({p['tokens']} tokens): consecutive windows of {p['window']} "
                      f"tokens, stride {p['stride']}. Budget: model training FLOPs "
                      "(6 x non-embedding parameters and head + attention, per token)."]
        if sliding:
            q = next(r["val_sliding_protocol"] for r in rows if "val_sliding_protocol" in r)
            lines.append(f"Sliding: windows of {q['window']} tokens, stride {q['stride']}, every token scored once "
                         f"with at least {q['window'] - q['stride']} tokens before it.")
    lines += ["", "| power law | a | exponent | R² |", "| --- | --- | --- | --- |"]
    for label, fit in fits.items():
        lines.append(f"| bits/byte vs {label} | " + (f"{fit['a']:.4g} | {fit['b']:.4f} | {fit['r2']:.3f} |"
                                                    if fit else "does not fit (fewer than 3 points or R² < 0.9) | | |"))
    return "\n".join(lines) + "\n"


def draw_plots(rows: list[dict[str, Any]], fits: dict[str, dict[str, float] | None], folder: Path) -> list[Path]:
    """Bits per byte against parameters and against training FLOPs, with the power laws that fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if r.get("val_bits_per_byte") is not None]
    written = []
    for x_key, label, fit_prefix, name in (("parameters", "parameters", "parameters", "bpb_vs_parameters.png"),
                                           ("train_flops", "training FLOPs", "compute", "bpb_vs_compute.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for tflops in sorted({r["cell"]["tflops"] for r in scored}):
            same = [r for r in scored if r["cell"]["tflops"] == tflops]
            ax.scatter([r[x_key] for r in same], [r["val_bits_per_byte"] for r in same], label=f"{tflops:g} TFLOPs")
        for fit_label, fit in fits.items():
            if fit and fit_label.startswith(fit_prefix):
                xs = np.geomspace(min(r[x_key] for r in scored), max(r[x_key] for r in scored), 50)
                ax.plot(xs, fit["a"] * xs ** fit["b"], "--", label=f"{fit_label}: exponent {fit['b']:.3f}")
        ax.set(xscale="log", xlabel=label, ylabel="validation bits per byte", title=f"Bits per byte against {label}")
        ax.grid(alpha=0.3)
        if scored:
            ax.legend(fontsize=7)
        written.append(folder / name)
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return written


def run(args: argparse.Namespace) -> None:
    study = load_study(args.params)
    rows = collect_results(args.results / "cells", grid_cells(study.grid))
    fits = study_fits(rows)
    table = args.results / "table.md"
    table.write_text(table_markdown(rows, fits), encoding="utf-8")
    plots = draw_plots(rows, fits, args.results / "plots")
    run_id = log_study_files(study, rows[0]["data_sha256"], [table, *plots])
    print(f"{len(rows)} cells -> {table}, {', '.join(map(str, plots))} (MLflow run {run_id})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the study's parameters (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="the study's results folder")
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
