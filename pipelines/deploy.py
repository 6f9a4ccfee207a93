"""Register the OpenLLM deployments in a process work pool, for ``prefect worker start``.

    python -m pipelines.deploy [--pool openllm] [--repo PATH] [--interval S] [--only pipeline]
    prefect worker start --pool openllm        # on each machine that may run the pipeline

The same two deployments and schedules as ``python -m pipelines.serve`` (see serve.py), but
stored in the Prefect server and run by whichever worker polls the pool: the deployments
outlive this command, workers can be restarted or moved without re-registering anything, and
each flow run is a process of its own that a cancel ends. The pool (type ``process``) is
created when missing, with a concurrency limit of 1: DVC locks the repository anyway. Flow
runs start in this checkout (the flows' code) and run DVC in ``--repo``; when
``MLFLOW_TRACKING_URI`` is set here, it is stored with the deployments so every run logs to
that server whatever the worker's environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.workers.process import ProcessWorker

from pipelines.flows import REPO_ROOT, load_sections
from pipelines.serve import FLOWS, build_deployments

POOL = "openllm"
POOL_CONCURRENCY = 1  # one flow run at a time: DVC locks the repository


class PoolError(RuntimeError):
    """The work pool exists with another type, or cannot be created."""


def ensure_pool(name: str) -> None:
    """Create the process work pool ``name`` when it is missing; refuse one of another type."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type, concurrency_limit=POOL_CONCURRENCY,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="OpenLLM pipeline runs (python -m pipelines.deploy)",
            ))
            return
    if pool.type != ProcessWorker.type:
        raise PoolError(f"work pool {name!r} has type {pool.type!r}, not {ProcessWorker.type!r}: "
                        "choose another --pool")


def deploy(pool: str = POOL, repo: Path = REPO_ROOT, interval: float | None = None,
           only: str | None = None) -> dict[str, UUID]:
    """Register the deployments in ``pool`` (created if missing); return their ids by flow name."""
    ensure_pool(pool)
    job_variables: dict = {"working_dir": str(REPO_ROOT)}  # where the flows' code is
    if os.environ.get("MLFLOW_TRACKING_URI"):
        job_variables["env"] = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    ids = {}
    for deployment in build_deployments(repo, interval, only):
        function = "check_data" if deployment.flow_name == "openllm-data-check" else "pipeline"
        deployment.entrypoint = f"pipelines/flows.py:{function}"  # relative to working_dir
        deployment.job_variables = job_variables
        ids[deployment.flow_name] = deployment.apply(work_pool_name=pool)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=POOL, help="process work pool (default: %(default)s)")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository to run (default: %(default)s)")
    parser.add_argument("--interval", type=float, help="run every N seconds instead of the crons (for trials)")
    parser.add_argument("--only", choices=FLOWS, help="register one deployment only")
    args = parser.parse_args(argv)
    if not get_current_settings().api.url:
        parser.error("PREFECT_API_URL is not set: start `prefect server start` and set "
                     "PREFECT_API_URL=http://127.0.0.1:4200/api (a temporary API would forget the deployments)")
    try:
        ids = deploy(args.pool, args.repo, args.interval, args.only)
    except PoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not ids:
        parser.error("nothing to deploy (pipeline.data_check_cron is null)")
    for flow_name, deployment_id in ids.items():
        print(f"{flow_name}/{load_name(args.repo)} -> work pool {args.pool!r} ({deployment_id})")
    print(f"start a worker: prefect worker start --pool {args.pool}")
    return 0


def load_name(repo: Path) -> str:
    return load_sections(Path(repo).resolve(), "pipeline").pipeline.deployment


if __name__ == "__main__":
    sys.exit(main())
