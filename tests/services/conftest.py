"""Real services shared by the tests of this folder, each started once per session.

- ``mlflow_server``: ``python -m ops.mlflow_server`` (what ``make mlflow-server`` runs): the
  project's own PostgreSQL in a temporary state folder, ``mlflow server`` with proxied artifacts.
- ``prefect_api``: ``prefect server start`` on a temporary SQLite database.

Both listen on 127.0.0.1 on free ports, are polled until healthy, and are stopped by process
group at the end (every process they started included).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # servicekit, beside this file

from helpers import prefect_server, subprocess_env  # noqa: E402
from servicekit import (  # noqa: E402  (puts the repository root on sys.path, for ops/)
    PrefectApi, Service, TrackingServer, corpus_text, free_port, reachable_temp_dir, wait_until,
)

from ops.postgres import PostgresError, bin_dir  # noqa: E402


@pytest.fixture(scope="session")
def mlflow_server() -> TrackingServer:
    try:
        bin_dir()
    except PostgresError as exc:  # CI installs it (.ci/run): there a missing PostgreSQL is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(str(exc))
    state = reachable_temp_dir("openllm-mlflow-")
    port = free_port()
    service = Service("mlflow server", state / "server.log", extra_logs=[state / "pgdata" / "postgres.log"])
    service.start([sys.executable, "-m", "ops.mlflow_server", "--state-dir", str(state), "--port", str(port)],
                  subprocess_env(PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until("MLflow server", lambda: "tracking server ready" in service.log.read_text()
                   and httpx.get(f"{url}/health").status_code == 200, 180, service.tail)
        yield TrackingServer(url, state, service)
    finally:
        service.stop()
        assert not (state / "pgdata" / "postmaster.pid").exists(), "PostgreSQL still running"
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> PrefectApi:
    home = tmp_path_factory.mktemp("prefect-server")
    command, settings = prefect_server(home, free_port(), PREFECT_WORKER_QUERY_SECONDS="2",
                                       PREFECT_WORKER_HEARTBEAT_SECONDS="5", PYTHONUNBUFFERED="1")
    url = settings["PREFECT_API_URL"]
    service = Service("prefect server", home / "server.log")
    service.start(command, subprocess_env(**settings))
    try:
        wait_until("Prefect server", lambda: httpx.get(f"{url}/health").status_code == 200, 120, service.tail)
        yield PrefectApi(url, settings, home, service)
    finally:
        service.stop()


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory) -> Path:
    """``data/tokenized`` of a small pseudo-word corpus (vocabulary 400), for the training tests."""
    from openllm import data, tokenizer
    from openllm.config import DataConfig, TokenizerConfig

    root = tmp_path_factory.mktemp("services-corpus")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(corpus_text(i, 200), encoding="utf-8")
    data.download(DataConfig(source="files", folder=str(corpus), files={"glob": str(corpus / "*.txt")}), root / "raw")
    tokenizer.tokenize(root / "raw", root / "tokenized", TokenizerConfig(vocab_size=400, workers=1))
    return root / "tokenized"
