"""The train stage as two torchrun nodes on one machine (gloo, c10d rendezvous on 127.0.0.1).

Each node runs in a folder of its own, as on two machines with local disks, and both log to
the shared MLflow server. The losses must equal one process with the same global batch, and
only the node that got rank 0 may write checkpoints, metrics or MLflow runs.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servicekit import free_port

from helpers import VENV_BIN, subprocess_env

from openllm.tracking import read_run_id

EXPERIMENT = "services-two-nodes"
TIMEOUT = 600
STEPS = 20


def project(root: Path, tokenized: Path) -> Path:
    """A folder laid out like the repository: params.yaml and data/tokenized (a link)."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "tokenized").symlink_to(tokenized, target_is_directory=True)
    params = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "context_length": 32},
        "train": {"max_steps": STEPS, "checkpoint_steps": [10, STEPS], "batch_size": 4, "eval_interval": 10,
                  "eval_batches": 2, "warmup_steps": 2, "compile": "false", "precision": "fp32",
                  "sample_tokens": 4, "device": "cpu", "resume_interval": 1000},
        "evaluate": {"prompts": ["Ka"]},
        "mlflow": {"experiment": EXPERIMENT},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def losses(folder: Path, column: str = "train_loss") -> list[float]:
    with open(folder / "metrics" / "train_steps.tsv", newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f, delimiter="\t")]


def test_two_nodes_train_like_one_process_and_only_rank_0_writes(tokenized, tmp_path, mlflow_server):
    single = project(tmp_path / "single", tokenized)
    nodes = [project(tmp_path / f"node-{i}", tokenized) for i in range(2)]
    port = free_port()
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_server.url, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def torchrun(node: int) -> list[str]:
        # is_host: which agent hosts the rendezvous store (on two machines, the one named in the endpoint)
        return [str(VENV_BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=openllm-two-nodes", "--max_restarts=0",
                f"--rdzv_conf=is_host={'true' if node == 0 else 'false'}", "-m", "openllm", "train"]

    logs = [open(tmp_path / f"node-{i}.log", "w") for i in range(2)]
    runs = [subprocess.Popen(torchrun(i), cwd=nodes[i], env=env, stdout=logs[i], stderr=subprocess.STDOUT,
                             start_new_session=True) for i in range(2)]
    try:
        reference = subprocess.run([sys.executable, "-m", "openllm", "train"], cwd=single, capture_output=True,
                                   text=True, timeout=TIMEOUT,
                                   env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{single / 'mlflow.db'}",
                                                      OMP_NUM_THREADS="1"))
        assert reference.returncode == 0, reference.stderr[-3000:]
        codes = [run.wait(timeout=TIMEOUT) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], "\n".join((tmp_path / f"node-{i}.log").read_text()[-3000:] for i in range(2))

    # Exactly one node wrote anything: the one whose worker got rank 0.
    writers = [node for node in nodes if (node / "models").exists() or (node / "metrics").exists()]
    assert len(writers) == 1, [sorted(p.name for p in node.iterdir()) for node in nodes]
    [rank0] = writers
    written = {p.name for p in (rank0 / "models" / "checkpoints").iterdir()}
    assert {"step-10", f"step-{STEPS}"} <= written, written
    assert not any((node / "mlflow.db").exists() for node in nodes)

    # Same global batch of 4 (2 per node) as the one process: the same losses, to float rounding.
    assert len(losses(rank0)) == STEPS
    assert losses(rank0) == pytest.approx(losses(single), rel=1e-4)
    assert losses(rank0, "learning_rate") == losses(single, "learning_rate")

    # One MLflow run on the shared server, from rank 0.
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == read_run_id(rank0 / "models" / "checkpoints")
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [10, STEPS]
