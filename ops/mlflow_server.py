"""A shared MLflow tracking server: PostgreSQL backend store, proxied artifact storage.

    python -m ops.mlflow_server [--state-dir .mlflow-server] [--port 5000] [--host 127.0.0.1]
                                [--artifacts-destination DIR | s3://bucket/prefix] [-- MLFLOW SERVER OPTIONS]

Starts the project's own PostgreSQL (ops/postgres.py, in ``<state>/pgdata``) unless
``--backend-store-uri`` names another database, then ``mlflow server --serve-artifacts``: clients
send artifacts to the server, which writes them to ``--artifacts-destination`` (default
``<state>/artifacts``; an ``s3://`` bucket needs boto3 and the usual AWS variables, plus
``MLFLOW_S3_ENDPOINT_URL`` for an S3-compatible store). Clients need only
``MLFLOW_TRACKING_URI=http://HOST:PORT``: no database driver, password or bucket credentials.
Runs in the foreground until Ctrl-C or SIGTERM, then stops the server and its PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ops import postgres
from ops.processes import stop_group

HEALTH_TIMEOUT_SECONDS = 120  # the first start creates MLflow's tables (about 20 s on 2 cores)


def server_command(host: str, port: int, workers: int, artifacts_destination: str, extra: list[str]) -> list[str]:
    """``mlflow server`` with proxied artifacts (the backend store comes from the environment)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow), "server", "--host", host, "--port", str(port), "--workers", str(workers),
            "--serve-artifacts", "--artifacts-destination", artifacts_destination, *extra]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = HEALTH_TIMEOUT_SECONDS) -> None:
    """Poll ``url/health`` until it answers OK; fail early when the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {process.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer {url}/health within {timeout:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.mlflow_server", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path(".mlflow-server"),
                        help="PostgreSQL cluster and local artifacts (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default: %(default)s)")
    parser.add_argument("--artifacts-destination", help="folder or s3://bucket/prefix (default: <state-dir>/artifacts)")
    parser.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI"),
                        help="an existing database instead of the project's PostgreSQL")
    parser.add_argument("--postgres-port", type=int, help="port of the project's PostgreSQL (default: a free one)")
    parser.add_argument("extra", nargs="*", help="after --: more `mlflow server` options (e.g. --allowed-hosts)")
    args = parser.parse_args(argv)
    if args.port <= 0 or args.workers <= 0:
        parser.error("--port and --workers must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = args.state_dir.resolve()
    destination = args.artifacts_destination or str(state / "artifacts")
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI job runners: unused here, 8 processes
    pg = None
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, _: stopping.append(sig))
    signal.signal(signal.SIGINT, lambda sig, _: stopping.append(sig))
    try:
        if not args.backend_store_uri:
            pg = postgres.start(postgres.Postgres(state), args.postgres_port)
            env.update(pg.client_env())
            print(f"PostgreSQL on 127.0.0.1:{pg.port} (data: {pg.data_dir})", flush=True)
        env["MLFLOW_BACKEND_STORE_URI"] = args.backend_store_uri or pg.uri()  # not on the command line
        command = server_command(args.host, args.port, args.workers, destination, args.extra)
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
            wait_healthy(url, server)
            print(f"MLflow tracking server ready: export MLFLOW_TRACKING_URI={url}", flush=True)
            while not stopping and server.poll() is None:
                time.sleep(0.5)
        finally:
            stop_group(server)
        return 0 if stopping else (server.returncode or 1)
    except (postgres.PostgresError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if pg is not None:
            postgres.stop(pg)


if __name__ == "__main__":
    sys.exit(main())
