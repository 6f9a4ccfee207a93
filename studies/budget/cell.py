"""Stage ``cell@<name>`` (or ``lever@<name>``) of the budget study: train one cell for its FLOPs, score it, log it to MLflow.

DVC's ``matrix`` passes the cell's values; the settings every cell shares come from this
folder's params.yaml. Writes ``results/cells/<name>.json`` (only what a rerun reproduces) and
a child run of the study run in MLflow (with the wall-clock time and speed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from openllm.errors import exit_status
from openllm.fileio import write_json
from openllm.study import Cell, StudyError, load_study, log_cell, run_cell


def number(text: str) -> int | float:
    """6 stays an int and 0.004 a float, as in params.yaml, so the cell's name is DVC's."""
    return int(text) if text.isdigit() else float(text)


AXES = {"tflops": number, "n_layer": int, "n_embd": int, "optimizer": str, "learning_rate": number, "schedule": str,
        "batch_size": int}


def run(args: argparse.Namespace) -> None:
    study = load_study(args.params)
    cell = Cell(**{axis: getattr(args, axis) for axis in AXES}, levers=args.levers)
    if args.out.stem != cell.name:  # the table finds each cell's file by the cell's name
        raise StudyError(f"--out {args.out} must be named after the cell: {cell.name}.json")
    result, timings = run_cell(study, cell, args.data)
    write_json(args.out, result)
    log_cell(study, result, timings)
    bits = "diverged" if result["diverged"] else f"{result['val_bits_per_byte']:.4f} bits/byte"
    print(f"cell {cell.name}: {result['parameters']:,} parameters, {result['steps']:,} steps, "
          f"{result['train_flops']:.3g} FLOPs in {timings['train_seconds']:.0f} s -> {bits} -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the study's parameters (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("../../data/tokenized"), help="the tokenized corpus")
    parser.add_argument("--out", type=Path, required=True, help="results/cells/<name>.json")
    for axis, kind in AXES.items():
        parser.add_argument(f"--{axis.replace('_', '-')}", dest=axis, type=kind, required=True)
    parser.add_argument("--levers", default="", help="one entry of grid.levers (the lever stage); default: none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
