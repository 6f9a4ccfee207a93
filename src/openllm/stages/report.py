"""Stage ``report``: the summary metrics, table and plots across the listed checkpoints.

It also removes the evaluate and export outputs of checkpoints no longer listed in
``train.checkpoint_steps``, so nothing stale is left for the app, the server or the flows.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import load_params
from ..paths import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_DIR, SUMMARY
from ..report import build_report, log_to_mlflow, remove_unlisted, update_readme
from ..tracking import read_run_id
from . import stage_main


def run(args) -> None:
    params = load_params(args.params)
    steps = params.train.checkpoint_steps
    for path in remove_unlisted(METRICS_DIR, EXPORT_DIR, steps):
        print(f"removed {path} (step not in train.checkpoint_steps)")
    report = build_report(METRICS_DIR, steps)
    log_to_mlflow(params.mlflow.experiment, read_run_id(CHECKPOINTS_DIR), METRICS_DIR, report["plots"])
    if getattr(args, "readme", None):
        update_readme(Path(args.readme), (METRICS_DIR / "results.md").read_text())
    print(f"{len(report['rows'])} checkpoints -> {METRICS_DIR / SUMMARY}, {METRICS_DIR / 'results.md'}, "
          f"{METRICS_DIR / 'plots'}")


main = stage_main(run, __doc__)

if __name__ == "__main__":
    sys.exit(main())
