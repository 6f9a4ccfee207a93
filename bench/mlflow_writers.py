"""Concurrent MLflow writers: SQLite file against the tracking server on PostgreSQL.

    python bench/mlflow_writers.py --out bench/results/mlflow_writers.json [--writers 2 4 8] [--steps 200]

Each writer is a process of its own, as concurrent trainings are: it opens a run and logs
``--steps`` batches of metrics one call at a time (what the train stage does every 10 steps,
without the training in between), and counts the calls that fail. Afterwards the store is read
back: a point is lost when it was logged without error and is not there, or when its call
failed (MLflow does not retry). For SQLite every writer opens the same ``mlflow.db`` in a fresh
folder; for the server ``python -m ops.mlflow_server`` is started in a temporary folder (its
own PostgreSQL) and the writers talk HTTP to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("train_loss", "learning_rate", "grad_norm", "tokens_per_second")  # per call, like training
EXPERIMENT = "concurrent-writers"


def write(uri: str, name: str, steps: int) -> dict[str, Any]:
    """One writer: a run named ``name``, ``steps`` calls of ``log_metrics``; errors by kind."""
    import mlflow

    errors: Counter[str] = Counter()
    client = mlflow.MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(EXPERIMENT)  # created by run_writers
        run = client.create_run(experiment.experiment_id, run_name=name)
    except Exception as exc:  # the whole run is lost
        run = None
        errors[_kind(exc, "create_run")] += 1
    print("ready", flush=True)
    sys.stdin.readline()  # every writer starts logging at once, after its imports
    started = time.perf_counter()
    if run is None:
        return {"run_id": None, "seconds": 0.0, "errors": dict(errors)}
    for step in range(1, steps + 1):
        metrics = [mlflow.entities.Metric(key, step * 0.5 + i, int(time.time() * 1000), step)
                   for i, key in enumerate(METRICS)]
        try:
            client.log_batch(run.info.run_id, metrics=metrics)
        except Exception as exc:
            errors[_kind(exc, "log_batch")] += 1
    try:
        client.set_terminated(run.info.run_id)
    except Exception as exc:
        errors[_kind(exc, "set_terminated")] += 1
    return {"run_id": run.info.run_id, "seconds": time.perf_counter() - started, "errors": dict(errors)}


def _kind(exc: Exception, call: str) -> str:
    """``call: database is locked``, else the exception's type and MLflow error code and message."""
    if "database is locked" in str(exc):
        return f"{call}: database is locked"
    first_line = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{call}: {type(exc).__name__} {getattr(exc, 'error_code', '')}: {first_line}"


def run_writers(uri: str, writers: int, steps: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start ``writers`` writer processes at once; read their points back from ``uri``."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:  # also creates a new store's tables, once
        client.create_experiment(EXPERIMENT)
    command = [sys.executable, __file__, "--writer", "--uri", uri, "--steps", str(steps)]
    processes = [subprocess.Popen([*command, "--name", f"writer-{i}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env or dict(os.environ))
                 for i in range(writers)]
    for process in processes:
        assert process.stdout.readline().strip() == "ready", "a writer failed to start"
    started = time.perf_counter()
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in processes]
    wall = time.perf_counter() - started
    logged = sum(len(client.get_metric_history(out["run_id"], key))
                 for out in outputs if out["run_id"] for key in METRICS)
    expected = writers * steps * len(METRICS)
    errors = Counter()
    for out in outputs:
        errors.update(out["errors"])
    return {"writers": writers, "calls": writers * steps, "failed_calls": sum(errors.values()),
            "errors": dict(errors), "points_expected": expected, "points_stored": logged,
            "points_lost": expected - logged, "wall_seconds": round(wall, 2),
            "calls_per_second": round(writers * steps / wall, 1)}


def sqlite_case(writers: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="openllm-sqlite-writers-") as tmp:
        return run_writers(f"sqlite:///{Path(tmp) / 'mlflow.db'}", writers, steps)


def server_cases(writer_counts: list[int], steps: int) -> list[dict[str, Any]]:
    """Start the project's tracking server once; run every case against it."""
    sys.path.insert(0, str(REPO_ROOT))
    from ops.mlflow_server import wait_healthy
    from ops.postgres import free_port
    from ops.processes import stop_group

    state = Path(tempfile.mkdtemp(prefix="openllm-bench-mlflow-"))
    state.chmod(0o755)  # the postgres user must enter it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(state / "server.log", "w") as log:  # a file: a full pipe would stall the server
        server = subprocess.Popen([sys.executable, "-m", "ops.mlflow_server", "--state-dir", str(state),
                                   "--port", str(port)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_healthy(url, server)
        return [run_writers(url, n, steps) for n in writer_counts]
    finally:
        stop_group(server)
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--writers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=200, help="log_metrics calls per writer")
    parser.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        print(json.dumps(write(args.uri, args.name, args.steps)))
        return 0
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    result = {
        "steps_per_writer": args.steps, "metrics_per_call": len(METRICS), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "sqlite": [sqlite_case(n, args.steps) for n in args.writers],
        "server_postgresql": server_cases(args.writers, args.steps),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
