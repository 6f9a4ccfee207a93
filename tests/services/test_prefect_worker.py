"""Prefect beyond ``serve``: a process work pool, ``prefect worker start`` and cancellation.

Against a real ``prefect server``: ``python -m pipelines.deploy`` registers the deployments in a
process work pool, a worker runs the scheduled one, and cancelling a flow run in the middle
of training ends ``dvc repro`` and every process under it (training saves its state first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from servicekit import Service, make_dvc_repo, repo_env, wait_until

from helpers import REPO_ROOT, VENV_BIN

from pipelines.data_source import source_fingerprint, write_source_record  # noqa: E402
from pipelines.flows import load_sections  # noqa: E402


def deploy(prefect_api, repo: Path, pool: str, *options: str) -> dict[str, str]:
    """Run ``python -m pipelines.deploy``; return deployment ids by flow name (read back from the API)."""
    result = subprocess.run([sys.executable, "-m", "pipelines.deploy", "--pool", pool, "--repo", str(repo), *options],
                            cwd=REPO_ROOT, env=repo_env(repo, **prefect_api.settings), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with httpx.Client(base_url=prefect_api.url, timeout=10) as http:
        body = {"work_pools": {"name": {"any_": [pool]}}}
        return {http.get(f"/flows/{d['flow_id']}").json()["name"]: d["id"]
                for d in http.post("/deployments/filter", json=body).json()}


def start_worker(prefect_api, repo: Path, pool: str, tmp_path: Path) -> Service:
    worker = Service(f"worker of {pool}", tmp_path / f"worker-{pool}.log")
    return worker.start([str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                        repo_env(repo, **prefect_api.settings))


def flow_runs(http: httpx.Client, deployment_id: str, state: str | None = None) -> list[dict]:
    body: dict = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    if state:
        body["flow_runs"]["state"] = {"type": {"any_": [state]}}
    return http.post("/flow_runs/filter", json=body).json()


def logged(http: httpx.Client, flow_run_id: str) -> str:
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
    return "\n".join(log["message"] for log in http.post("/logs/filter", json=body).json())


def test_deploy_refuses_without_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([sys.executable, "-m", "pipelines.deploy"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "PREFECT_API_URL is not set" in result.stderr


def test_worker_runs_the_scheduled_deployment_from_the_pool(prefect_api, tmp_path):
    repo = make_dvc_repo(tmp_path / "repo")
    # The data is downloaded and as recorded: each scheduled check finishes quickly without retraining.
    subprocess.run(["dvc", "repro", "download"], cwd=repo, env=repo_env(repo), check=True, capture_output=True)
    write_source_record(repo, source_fingerprint(repo, load_sections(repo, "data").data))
    pool = "openllm-scheduled"
    ids = deploy(prefect_api, repo, pool, "--interval", "5", "--only", "data-check")
    worker = start_worker(prefect_api, repo, pool, tmp_path)
    diagnose = lambda: worker.tail() + prefect_api.service.tail(2000)  # noqa: E731
    try:
        with httpx.Client(base_url=prefect_api.url, timeout=10) as http:
            assert http.get(f"/work_pools/{pool}").json()["type"] == "process"
            runs = wait_until("completed scheduled run", lambda: flow_runs(http, ids["openllm-data-check"], "COMPLETED"),
                              180, diagnose)
            run = runs[0]
            assert run["work_pool_name"] == pool and run["auto_scheduled"], run
            wait_until("'data unchanged' in its logs", lambda: "data unchanged" in logged(http, run["id"]), 30, diagnose)
            http.patch(f"/deployments/{ids['openllm-data-check']}", json={"paused": True})
    finally:
        worker.stop()


def session_members(session_id: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def dvc_process(repo: Path) -> psutil.Process | None:
    """The ``dvc repro`` running in ``repo`` (the leader of its own session), if any."""
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = process.info["cmdline"] or []
        if process.info["cwd"] == str(repo) and any(Path(part).name == "dvc" for part in cmdline[:2]):
            return process
    return None


def test_cancelling_a_flow_run_ends_dvc_and_every_child(prefect_api, tmp_path):
    endless = {"train": {"max_steps": 1_000_000, "checkpoint_steps": [1_000_000], "eval_interval": 100_000,
                         "resume_interval": 100_000}}
    repo = make_dvc_repo(tmp_path / "repo", endless)
    pool = "openllm-cancel"
    ids = deploy(prefect_api, repo, pool, "--only", "pipeline")
    worker = start_worker(prefect_api, repo, pool, tmp_path)
    diagnose = lambda: worker.tail() + prefect_api.service.tail(2000)  # noqa: E731
    steps_log = repo / "metrics" / "train_steps.tsv"
    try:
        with httpx.Client(base_url=prefect_api.url, timeout=10) as http:
            parameters = {"repo": str(repo), "stages": ["download", "tokenize", "train"]}
            run = http.post(f"/deployments/{ids['openllm-pipeline']}/create_flow_run",
                            json={"parameters": parameters}).json()
            wait_until("training steps", lambda: steps_log.is_file() and len(steps_log.read_text().splitlines()) > 3,
                       300, diagnose)
            dvc = dvc_process(repo)
            assert dvc is not None and os.getsid(dvc.pid) == dvc.pid, "dvc repro does not lead its own session"
            members = session_members(dvc.pid)
            assert len(members) >= 2, members  # dvc, the stage's shell and/or the training process

            cancel = subprocess.run([str(VENV_BIN / "prefect"), "flow-run", "cancel", run["id"]],
                                    env=repo_env(repo, **prefect_api.settings), capture_output=True,
                                    text=True, timeout=60)
            assert cancel.returncode == 0, cancel.stdout + cancel.stderr
            wait_until("cancelled flow run",
                       lambda: http.get(f"/flow_runs/{run['id']}").json()["state_type"] == "CANCELLED", 120, diagnose)
            wait_until("the end of every process of dvc's session", lambda: not session_members(dvc.pid), 30,
                       lambda: f"left: {session_members(dvc.pid)}\n{diagnose()}")
            assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in members)
            # The flow run's own output, as the worker streamed it (its API logs may still be queued).
            wait_until("the flow run's report", lambda: f"process group {dvc.pid} ended (sent SIGINT"
                       in worker.log.read_text(errors="replace"), 30, diagnose)
            # SIGINT reached the training, which saved a state to resume from before it exited.
            assert (repo / "models" / "checkpoints" / "resume").is_dir()
            assert worker.process.poll() is None, "the worker went down with the flow run"
    finally:
        worker.stop()
