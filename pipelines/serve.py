"""Serve the OpenLLM deployments: ``python -m pipelines.serve [--repo PATH] [--interval S]``.

Two deployments, both named ``pipeline.deployment`` in params.yaml:

- ``openllm-pipeline/<name>``: the whole DVC pipeline on ``pipeline.cron``;
- ``openllm-data-check/<name>``: retrain only when the data source changed, on
  ``pipeline.data_check_cron`` (left out when that is null).

Schedules live in the Prefect server and fire only with a real one (``prefect server start``
and ``PREFECT_API_URL=http://127.0.0.1:4200/api``), not with the temporary API Prefect starts
when no URL is set. Restarting this process registers the same deployments again (same ids);
stopping it pauses their schedules, so runs do not pile up while nothing can run them. One
flow run at a time: DVC locks the repository.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval, Schedule
from prefect.settings import get_current_settings

from pipelines.flows import REPO_ROOT, check_data, load_sections, pipeline

FLOWS = ("pipeline", "data-check")


def build_deployments(
    repo: Path = REPO_ROOT, interval: float | None = None, only: str | None = None
) -> list[RunnerDeployment]:
    """The deployments for ``repo``, scheduled from its params.yaml.

    ``interval`` (seconds) replaces both crons, for trying things out; ``only`` keeps one of
    ``FLOWS``.
    """
    repo = Path(repo).resolve()
    settings = load_sections(repo, "pipeline").pipeline

    def schedule(cron: str) -> Schedule:
        if interval:
            return Interval(timedelta(seconds=interval), timezone=settings.timezone)
        return Cron(cron, timezone=settings.timezone)

    parameters = {"repo": str(repo)}
    deployments = []
    if only in (None, "pipeline"):
        deployments.append(pipeline.to_deployment(
            name=settings.deployment, schedules=[schedule(settings.cron)], parameters=parameters,
            tags=["openllm"], description="The OpenLLM DVC pipeline, stage by stage (dvc repro).",
        ))
    if only in (None, "data-check") and (settings.data_check_cron or interval):
        deployments.append(check_data.to_deployment(
            name=settings.deployment, schedules=[schedule(settings.data_check_cron or "")],
            parameters=parameters, tags=["openllm"],
            description="Retrain only when the data source changed.",
        ))
    return deployments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository to run (default: %(default)s)")
    parser.add_argument("--interval", type=float, help="run every N seconds instead of the crons (for trials)")
    parser.add_argument("--only", choices=FLOWS, help="serve one deployment only")
    args = parser.parse_args(argv)
    if not get_current_settings().api.url:
        print("warning: PREFECT_API_URL is not set: serving against a temporary API where schedules "
              "never fire; start `prefect server start` and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
    deployments = build_deployments(args.repo, args.interval, args.only)
    if not deployments:
        parser.error("nothing to serve (pipeline.data_check_cron is null)")
    serve(*deployments, limit=1)


if __name__ == "__main__":
    main()
