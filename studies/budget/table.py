"""Stage ``table`` of the budget study: one table and two plots from the grid's cell results.

Reads ``results/cells/<name>.json`` for every cell of params.yaml's grid (files of cells no
longer in the grid are left out), writes ``results/table.md`` and ``results/plots/*.png`` and
attaches them to the study run in MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openllm.errors import exit_status
from openllm.study import collect_results, draw_plots, grid_cells, load_study, log_study_files, study_fits, \
    table_markdown


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
