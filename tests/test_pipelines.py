"""The Prefect flows (pipelines/) on the real DVC pipeline in a throwaway git repository.

One temporary repository with tiny params is shared by the module, in this order: the
deployment's schedule (no server), the full flow under one Prefect test harness, an injected
stage failure (retried, reported, nothing lost), the data-change check, and finally a real
``prefect server`` with the data-check deployment served on a 5-second interval, restarted once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from helpers import (REPO_ROOT, TINY_PIPELINE, corpus_text, deep_merge, free_port, prefect_server, snapshot_tree,
                     subprocess_env, wait_until, write_params)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `pipelines` is a package at the repository root

from prefect.artifacts import Artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId  # noqa: E402
from prefect.logging.handlers import APILogWorker  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from openllm.config import ConfigError, load_params  # noqa: E402
from openllm.paths import run_id_path  # noqa: E402
from pipelines.data_source import read_source_record, source_fingerprint, write_source_record  # noqa: E402
from pipelines.dvc_commands import dvc_command  # noqa: E402
from pipelines.flows import check_data, check_params, dvc_stages, load_sections, pipeline  # noqa: E402
from pipelines.run_summary import SUMMARY_ARTIFACT  # noqa: E402
from pipelines.serve import build_deployments  # noqa: E402

EXPORT_READY = (REPO_ROOT / "src" / "openllm" / "export.py").is_file()
EXPORT_MISSING = "src/openllm/export.py does not exist yet: the export stage cannot run"
STAGES = [s for s in dvc_stages(REPO_ROOT) if EXPORT_READY or s != "export"]

TINY = deep_merge(TINY_PIPELINE, {"pipeline": {"retries": 2, "retry_delay_seconds": 0}})


def lock(repo: Path) -> dict[str, Any]:
    return yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"]


@pytest.fixture(scope="module")
def prefect_api():
    """One Prefect test harness (a temporary API and database) for the whole module."""
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository: the project's dvc.yaml, src/, .dvc/config, tiny params, a corpus."""
    tmp = tmp_path_factory.mktemp("pipelines")
    repo = tmp / "repo"
    shutil.copytree(REPO_ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo / "params.yaml", TINY)
    (repo / "corpus").mkdir()
    for i in range(8):
        (repo / "corpus" / f"doc{i}.txt").write_text(corpus_text(i, 500), encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        env.setenv("DVC_SITE_CACHE_DIR", str(tmp / "dvc-site-cache"))
        env.setenv("GIT_CONFIG_NOSYSTEM", "1")
        for who in ("AUTHOR", "COMMITTER"):
            env.setenv(f"GIT_{who}_NAME", "test")
            env.setenv(f"GIT_{who}_EMAIL", "test@example.com")
        for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
            subprocess.run(command, cwd=repo, env=subprocess_env(), check=True, capture_output=True)
        for name in ("config", "offline_plots.html"):
            shutil.copy2(REPO_ROOT / ".dvc" / name, repo / ".dvc" / name)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "pipeline under test"], cwd=repo, check=True)
        yield repo


@pytest.fixture(scope="module")
def trained(prefect_api, repo) -> dict[str, Any]:
    """The pipeline flow's summary after its first run on the tiny repository."""
    return pipeline(repo=str(repo), stages=STAGES)


def flow_logs(flow_run_id) -> str:
    APILogWorker.drain_all(timeout=5)  # send the logs still queued in this process
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


# --- schedule and configuration (no server) ------------------------------------------------


def test_deployments_carry_the_schedule_of_params_yaml(tmp_path):
    write_params(tmp_path, {"pipeline": {"cron": "15 4 * * 1", "timezone": "Europe/Paris",
                                         "data_check_cron": None, "deployment": "nightly"}})
    [deployment] = build_deployments(tmp_path)
    assert (deployment.flow_name, deployment.name) == ("openllm-pipeline", "nightly")
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("15 4 * * 1", "Europe/Paris")
    assert deployment.parameters == {"repo": str(tmp_path.resolve())}
    assert deployment.entrypoint == "pipelines/flows.py:pipeline"

    # The repository's own params.yaml: both deployments, each on its cron.
    settings = load_params(REPO_ROOT / "params.yaml").pipeline
    crons = {d.flow_name: (d.name, d.schedules[0].schedule.cron, d.schedules[0].schedule.timezone)
             for d in build_deployments(REPO_ROOT)}
    assert crons == {
        "openllm-pipeline": (settings.deployment, settings.cron, settings.timezone),
        "openllm-data-check": (settings.deployment, settings.data_check_cron, settings.timezone),
    }
    [trial] = build_deployments(REPO_ROOT, interval=5, only="data-check")
    assert trial.schedules[0].schedule.interval == timedelta(seconds=5)


@pytest.mark.parametrize("pipeline_params, message", [
    ({"timezone": "Mars/Olympus"}, "pipeline.timezone='Mars/Olympus' is not an IANA time zone"),
    ({"data_check_cron": "hourly"}, "pipeline.data_check_cron='hourly' must have 5 fields"),
    ({"deployment": "a b"}, "pipeline.deployment"),
])
def test_bad_pipeline_params_name_the_field(tmp_path, pipeline_params, message):
    path = write_params(tmp_path, {"pipeline": pipeline_params})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_params(path)


def test_dvc_command():
    assert dvc_command("train") == ["dvc", "repro", "train"]
    assert dvc_command("download", force=True) == ["dvc", "repro", "download", "--force", "--single-item"]
    assert dvc_command("train", {"train.max_steps": 40, "train.compile": "false"}) == [
        "dvc", "exp", "run", "train", "--set-param", "train.max_steps=40", "--set-param", "train.compile=false"]


# --- the flows under the Prefect test harness ----------------------------------------------


def test_pipeline_flow_runs_the_dvc_pipeline(trained, repo):
    summary = trained
    stages = lock(repo)
    expected = {"download", "tokenize", "train", "evaluate@10", "evaluate@20", "report"}
    assert expected <= set(stages) and expected <= set(summary["ran"]), summary["ran"]
    for step in (10, 20):
        assert (repo / "models" / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
        assert (repo / "metrics" / "evaluate" / f"step-{step}.json").is_file()
    assert (repo / "metrics" / "results.md").is_file()
    run_id = run_id_path(repo / "models" / "checkpoints").read_text().strip()
    assert summary["mlflow_run_id"] == run_id and summary["previous_mlflow_run_id"] is None
    assert [(row["step"], row["status"]) for row in summary["checkpoints"]] == [(10, "new"), (20, "new")]
    assert all(row["val_loss"] > 0 and row["previous_val_loss"] is None for row in summary["checkpoints"])

    artifact = Artifact.get(SUMMARY_ARTIFACT)
    assert artifact is not None and artifact.type == "markdown"
    assert run_id in artifact.data and "| step-20 | new |" in artifact.data, artifact.data


@pytest.mark.skipif(not EXPORT_READY, reason=EXPORT_MISSING)
def test_pipeline_flow_exports_every_checkpoint(trained, repo):
    assert {"export@10", "export@20"} <= set(lock(repo))
    for step in (10, 20):
        assert any((repo / "models" / "export" / f"step-{step}").iterdir())


def test_failing_stage_is_retried_then_fails_the_flow_and_keeps_the_outputs(trained, repo):
    params_text = (repo / "params.yaml").read_text(encoding="utf-8")
    lock_before = (repo / "dvc.lock").read_bytes()
    kept = {name: snapshot_tree(repo / name) for name in ("models", "metrics", "data/raw")}
    # a value params.yaml allows but this corpus cannot give: only the stage itself finds out
    write_params(repo / "params.yaml", deep_merge(TINY, {"tokenizer": {"vocab_size": 60000}}))

    state = pipeline(repo=str(repo), stages=STAGES, return_state=True)
    assert state.is_failed()
    assert "stage 'tokenize' failed" in state.message and "tokenizer.vocab_size" in state.message, state.message
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    attempts = {run.name: (run.run_count, run.state.type.value) for run in task_runs}
    # download succeeded once; tokenize ran 1 + pipeline.retries times; nothing after it ran
    assert attempts == {"dvc-download": (1, "COMPLETED"), "dvc-tokenize": (3, "FAILED")}, attempts
    assert flow_logs(flow_run_id).count("$ dvc repro tokenize") == 3
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert {name: snapshot_tree(repo / name) for name in kept} == kept

    # Fixed: the next run picks up from there (tokenize's outputs come back from DVC's cache).
    (repo / "params.yaml").write_text(params_text, encoding="utf-8")
    summary = pipeline(repo=str(repo), stages=STAGES)
    assert summary["ran"] == [], summary["ran"]
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert (repo / "data" / "tokenized" / "train.bin").is_file()
    assert [row["status"] for row in summary["checkpoints"]] == ["unchanged", "unchanged"]


def test_check_data_retrains_only_when_the_source_changed(trained, repo):
    # The first check in a workspace has nothing recorded: it forces download once and records.
    assert read_source_record(repo) is None
    assert check_data(repo=str(repo), stages=["download", "tokenize"]) is True
    assert read_source_record(repo) == source_fingerprint(repo, load_sections(repo, "data").data)
    lock_before = lock(repo)

    state = check_data(repo=str(repo), stages=["download", "tokenize"], return_state=True)
    assert state.is_completed() and state.result() is False
    assert "data unchanged (files: 8 files, sha256" in flow_logs(state.state_details.flow_run_id)
    assert lock(repo) == lock_before

    with open(repo / "corpus" / "doc3.txt", "a", encoding="utf-8") as f:
        f.write("Anew verse, never seen before.\n")
    assert check_data(repo=str(repo), stages=["download", "tokenize"]) is True
    stages = lock(repo)
    for stage in ("download", "tokenize"):
        assert stages[stage]["outs"] != lock_before[stage]["outs"], stage
    assert check_data(repo=str(repo), stages=["download", "tokenize"]) is False


def test_overrides_run_the_stages_as_one_dvc_experiment(trained, repo):
    summary = pipeline(repo=str(repo), stages=["download", "tokenize"], overrides={"tokenizer.vocab_size": 420})
    assert summary["ran"] == ["tokenize"] and summary["experiment"], summary
    listed = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=repo, env=subprocess_env(),
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == [summary["experiment"]]  # one experiment per flow run, not one per stage
    assert lock(repo)["tokenize"]["params"]["params.yaml"]["tokenizer"]["vocab_size"] == 420
    artifact = Artifact.get(SUMMARY_ARTIFACT)
    assert f"DVC experiment: `{summary['experiment']}`" in artifact.data


# --- a real Prefect server -----------------------------------------------------------------


def stop(process: subprocess.Popen) -> None:
    """Interrupt a process started in its own session, then make sure its group is gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def test_served_deployment_runs_on_schedule_and_survives_a_restart(repo, tmp_path):
    # The data did not change: every scheduled check completes quickly without retraining.
    write_source_record(repo, source_fingerprint(repo, load_sections(repo, "data").data))
    server_command, settings = prefect_server(tmp_path, free_port(), PREFECT_RUNNER_POLL_FREQUENCY="2")
    api = settings["PREFECT_API_URL"]
    env = subprocess_env(**settings)
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "serve")}

    def start(name: str, command: list[str]) -> subprocess.Popen:
        with open(logs[name], "a") as log:
            return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def diagnose() -> str:
        return "\n".join(f"--- {name}.log\n{path.read_text()[-3000:]}" for name, path in logs.items() if path.exists())

    serve_command = [sys.executable, "-m", "pipelines.serve", "--repo", str(repo), "--interval", "5", "--only", "data-check"]
    server = start("server", server_command)
    serve = None
    try:
        with httpx.Client(base_url=api, timeout=10) as http:
            wait_until("server", lambda: http.get("/health").status_code == 200, 90, diagnose)

            def deployment_id() -> str | None:
                response = http.get("/deployments/name/openllm-data-check/openllm")
                return response.json()["id"] if response.status_code == 200 else None

            def completed_runs() -> set[str]:
                body = {"flow_runs": {"deployment_id": {"any_": [first_id]}, "state": {"type": {"any_": ["COMPLETED"]}}}}
                runs = http.post("/flow_runs/filter", json=body).json()
                return {run["id"] for run in runs if run["state_type"] == "COMPLETED"}

            def logged(flow_run_id: str) -> str:
                body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
                return "\n".join(log["message"] for log in http.post("/logs/filter", json=body).json())

            serve = start("serve", serve_command)
            first_id = wait_until("deployment", deployment_id, 60, diagnose)
            done = wait_until("completed scheduled run", completed_runs, 120, diagnose)
            wait_until("'data unchanged' in the run's logs", lambda: "data unchanged" in logged(next(iter(done))),
                     30, diagnose)

            # Restart the serving process: same deployment, and the schedule keeps running.
            stop(serve)
            serve = start("serve", serve_command)
            wait_until("re-registered deployment", lambda: deployment_id() == first_id and
                     not http.get(f"/deployments/{first_id}").json()["paused"], 60, diagnose)
            wait_until("run after the restart", lambda: completed_runs() - done, 120, diagnose)
    finally:
        if serve is not None:
            stop(serve)
        stop(server)


def test_flow_validates_the_whole_params_file_before_dvc_runs(tmp_path: Path) -> None:
    """A typo in a section no stage reads, or a bad override, stops the flow before any stage."""
    write_params(tmp_path, {"trian": {"max_steps": 3}})
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        check_params(tmp_path)
    write_params(tmp_path, {})
    assert check_params(tmp_path, {"train.max_steps": 3000}).train.max_steps == 3000
    with pytest.raises(ConfigError, match=r"train.seed=-1"):
        check_params(tmp_path, {"train.seed": -1})
