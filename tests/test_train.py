"""Tests for the train stage (openllm.train, openllm.checkpoint): schedule, checkpoints,
exact resume after SIGKILL/SIGTERM, continuing, corrupt checkpoints, changed params,
non-finite losses, early stopping, DDP (torchrun, gloo) and MLflow tracking.

Every run uses a ~33k-parameter model (2 layers, 32 wide, context 32) on a tokenized corpus of
eight Shakespeare plays built once per session; a step takes ~10 ms on one CPU thread.
Runs that must be interrupted or go through the CLI are subprocesses in a temporary project
folder (params.yaml, data/tokenized -> the session's corpus, models/checkpoints, metrics/),
each with its own sqlite MLflow store and one thread (OMP_NUM_THREADS=1) so that bit-exact
comparisons between processes hold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, safe_open, save_file

from helpers import snapshot_tree, subprocess_env
from openllm import checkpoint as ckpt
from openllm import train as train_mod
from openllm.paths import EVAL_LOG, STEP_LOG, run_id_path, step_folder
from openllm.runlog import STEP_COLUMNS
from openllm.config import ConfigError, DataConfig, TokenizerConfig, TrainConfig, parse_params
from openllm import device as device_mod
from openllm.device import DeviceError, DeviceSetup, resolve_device
from openllm.schedule import Schedule
from openllm.train import TrainingError, train
from openllm.windows import DataTooShortError, WindowSampler

TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, intermediate_size=64, context_length=32)
CONTEXT, BATCH = TINY_MODEL["context_length"], 4
BASE_TRAIN = dict(
    batch_size=BATCH, max_steps=20, checkpoint_steps=[10, 20], eval_interval=10, eval_batches=2,
    warmup_steps=2, resume_interval=5, compile="false", precision="fp32", sample_tokens=4,
    learning_rate=3e-3, min_learning_rate=3e-4, device="cpu", early_stopping_patience=0,
    max_nonfinite_batches=0,
)
EXPERIMENT = "train-tests"
CHECKPOINT_FILES = {ckpt.WEIGHTS, ckpt.CONFIG, ckpt.TOKENIZER, ckpt.META, ckpt.STATE_TENSORS,
                    ckpt.STATE_JSON, ckpt.COMPLETE}
SUBPROCESS_TIMEOUT = 240


def overrides(**train_overrides: Any) -> dict[str, Any]:
    return {
        "model": dict(TINY_MODEL),
        "train": {**BASE_TRAIN, **train_overrides},
        "evaluate": {"prompts": ["ROMEO:"]},
        "mlflow": {"experiment": EXPERIMENT},
    }


def make_params(**train_overrides: Any):
    """The Params a CLI run reads from the params.yaml that ``Project.write_params`` writes.

    Sections not given (data, tokenizer, export, ...) take their defaults, so these tests do
    not depend on the repository's params.yaml.
    """
    return parse_params(overrides(**train_overrides))


def write_yaml(path: Path, values: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory) -> Path:
    """data/tokenized for 8 plays (~550k train tokens, ~70k val tokens), vocabulary 384."""
    from openllm import data, tokenizer

    root = tmp_path_factory.mktemp("train-corpus")
    documents, _ = data.shakespeare_documents()
    corpus = root / "corpus"
    corpus.mkdir()
    for i, (_, text) in enumerate(documents[:8]):
        (corpus / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    data.download(DataConfig(source="files", folder=str(corpus), files={"glob": str(corpus / "*.txt")}), root / "raw")
    tokenizer.tokenize(root / "raw", root / "tokenized", TokenizerConfig(vocab_size=384, workers=1))
    return root / "tokenized"


class Project:
    """A folder laid out like the repository, for in-process and CLI runs alike."""

    started: list[subprocess.Popen] = []  # killed (with their children) after each test

    def __init__(self, root: Path, tokenized: Path):
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / "tokenized").symlink_to(tokenized, target_is_directory=True)
        self.tokenized = root / "data" / "tokenized"
        self.ck = root / "models" / "checkpoints"
        self.metrics = root / "metrics"
        self.mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"

    def step(self, n: int) -> Path:
        return step_folder(self.ck, n)

    def run_id(self) -> str:
        return run_id_path(self.ck).read_text().strip()

    def write_params(self, **train_overrides: Any) -> None:
        write_yaml(self.root / "params.yaml", overrides(**train_overrides))

    # in-process
    def train(self, monkeypatch, **train_overrides: Any) -> dict[str, Any]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.mlflow_uri)
        return train(make_params(**train_overrides), self.tokenized, self.ck, self.metrics, progress=False)

    # subprocesses
    def env(self) -> dict[str, str]:
        return subprocess_env(MLFLOW_TRACKING_URI=self.mlflow_uri, PYTHONUNBUFFERED="1",
                              OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def start(self, log_name: str, command: list[str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.root / log_name
        with open(log, "w") as out:  # a file, not a pipe: tqdm output never blocks the child
            proc = subprocess.Popen(command or [sys.executable, "-m", "openllm", "train"], cwd=self.root,
                                    env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        Project.started.append(proc)
        return proc, log

    def cli(self, log_name: str, command: list[str] | None = None) -> tuple[int, str]:
        proc, log = self.start(log_name, command)
        try:
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, log.read_text(errors="replace")

    def steps_log(self) -> list[dict[str, str]]:
        return read_tsv(self.metrics / STEP_LOG)

    def evals_log(self) -> list[dict[str, str]]:
        return read_tsv(self.metrics / EVAL_LOG)

    def weights(self) -> dict[str, str]:
        """sha256 of every kept folder's weights, by folder name."""
        return {p.name: sha256(p / ckpt.WEIGHTS) for p in sorted(self.ck.iterdir()) if p.is_dir()}


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process runs use one thread, like the subprocesses (2 shared cores; tiny matrices)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reap_processes():
    """A failing test must not leave a training run (or torchrun's workers) behind."""
    yield
    while Project.started:
        proc = Project.started.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def project(tmp_path: Path, tokenized: Path) -> Project:
    return Project(tmp_path / "project", tokenized)


@pytest.fixture
def train_log(caplog):
    caplog.set_level(logging.INFO, logger="openllm.train")
    return caplog


def read_tsv(path: Path) -> list[dict[str, str]]:
    header, *rows = path.read_text().splitlines()
    columns = header.split("\t")
    return [dict(zip(columns, row.split("\t"), strict=True)) for row in rows]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_same_weights(a: Path, b: Path) -> None:
    """Byte-identical files and bit-identical tensors (torch.equal)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [name for name in ta if not torch.equal(ta[name], tb[name])]
    assert not different, f"{a} and {b} differ in {different}"
    assert sha256(a) == sha256(b)


def rewrite_complete(folder: Path) -> None:
    """Recompute the COMPLETE marker after deliberately editing a checkpoint's files."""
    checksums = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name != ckpt.COMPLETE}
    (folder / ckpt.COMPLETE).write_text(json.dumps({"sha256": checksums}))


def resume_step(checkpoints: Path) -> int:
    """Step of the rolling resume state (-1 while there is none or it is being replaced)."""
    try:
        return int(json.loads((checkpoints / ckpt.RESUME / ckpt.META).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the awaited state:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for the run:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.005)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def resumed_at(output: str) -> tuple[str, int] | None:
    match = re.search(r"resuming from (\S+) \(step (\d+)\)", output)
    return (Path(match.group(1)).name, int(match.group(2))) if match else None


def losses(rows: list[dict[str, str]], column: str = "train_loss") -> list[float]:
    return [float(r[column]) for r in rows]


# --------------------------------------------------------------------------- 1. schedule


def test_learning_rate_warmup_then_cosine_to_min() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4,
                      checkpoint_steps=[100], schedule="cosine")
    schedule = Schedule.from_config(cfg)
    lrs = [schedule.lr(step) for step in range(cfg.max_steps + 1)]
    # linear warmup: update s (0-based) gets peak * (s + 1) / warmup, so the first is not 0
    for s in range(10):
        assert lrs[s] == pytest.approx(1e-3 * (s + 1) / 10, rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)  # peak at the end of warmup
    assert max(lrs) == pytest.approx(1e-3)
    # cosine: halfway between peak and min halfway through the decay, min at max_steps
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-9)
    assert lrs[100] == pytest.approx(1e-4, rel=1e-12)
    assert 1e-4 < lrs[99] < 1.01e-4
    after = lrs[10:]
    assert all(b < a for a, b in zip(after, after[1:])), "the decay stalls"
    assert schedule.lr(250) == pytest.approx(1e-4)  # continuing past max_steps stays at min
    # every step depends on max_steps: a longer cosine run shares nothing after warmup
    longer = Schedule.from_config(cfg.model_copy(update={"max_steps": 200}))
    assert longer.agrees_with(schedule, 11) and not longer.agrees_with(schedule, 12)


def test_wsd_schedule_is_stable_until_its_decay_and_extends() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4,
                      checkpoint_steps=[100], schedule="wsd", decay_fraction=0.2)
    schedule = Schedule.from_config(cfg)
    assert schedule.decay_start == 80
    lrs = [schedule.lr(step) for step in range(100)]
    assert lrs[:10] == [1e-3 * (s + 1) / 10 for s in range(10)]
    assert lrs[10:80] == [1e-3] * 70  # stable: exactly the peak
    decay = lrs[80:]
    assert all(b < a for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(1e-4, rel=1e-12)
    assert decay[10] == pytest.approx(1e-3 + (11 / 20) * (1e-4 - 1e-3), rel=1e-12)  # linear
    # a run twice as long gives the same rate to every update before this run's decay start
    longer = Schedule.from_config(cfg.model_copy(update={"max_steps": 200}))
    assert longer.decay_start == 160
    assert longer.agrees_with(schedule, 80) and not longer.agrees_with(schedule, 81)
    assert Schedule.from_dict(schedule.to_dict()) == schedule


def test_window_sampler_is_deterministic_and_resumable() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = WindowSampler(tokens, 16, seed=3), WindowSampler(tokens, 16, seed=3)
    first = a.next_starts(8)
    assert torch.equal(first, b.next_starts(8))
    assert int(first.min()) >= 0 and int(first.max()) <= 1000 - 17
    state = a.generator.get_state()
    expected = a.next_starts(8)
    c = WindowSampler(tokens, 16, seed=99)
    c.generator.set_state(state)
    assert torch.equal(c.next_starts(8), expected)
    x, y = a.batch(torch.tensor([0, 100]), torch.device("cpu"))
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and x[1, 0].item() == 100 and y[1, -1].item() == 116
    with pytest.raises(DataTooShortError, match="fewer than model.context_length"):
        WindowSampler(np.arange(10, dtype=np.uint16), 32, seed=0)


# --------------------------------------------------------------------------- 2. checkpoints


def test_short_run_writes_verified_checkpoints_and_metrics(project: Project, monkeypatch) -> None:
    params = make_params(max_steps=40, checkpoint_steps=[10, 20, 40], resume_interval=15)
    summary = project.train(monkeypatch, max_steps=40, checkpoint_steps=[10, 20, 40], resume_interval=15)
    data_meta = json.loads((project.tokenized / "meta.json").read_text())

    names = sorted(p.name for p in project.ck.iterdir())
    # the rolling resume state is gone once training ends; the decay start stays (step 32 of 40)
    assert names == ["decay-start", "step-10", "step-20", "step-40"]  # no temp folders left
    for step in (10, 20, 40):
        folder = project.step(step)
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
        checksums = ckpt.verify_checkpoint(folder)
        assert set(checksums) == CHECKPOINT_FILES - {ckpt.COMPLETE}
        meta = ckpt.read_meta(folder)
        assert meta["step"] == step and meta["tokens_seen"] == step * BATCH * CONTEXT
        assert math.isfinite(meta["train_loss"]) and math.isfinite(meta["val_loss"])
        assert meta["params_sha256"] == train_mod.weights_params_hash(params)
        assert meta["threads"] == torch.get_num_threads() and meta["world_size"] == 1
        assert meta["precision"] == "fp32" and meta["early_stopped"] is False
        assert meta["data_sha256"] == data_meta["train"]["sha256"]
        assert meta["tokenizer_sha256"] == data_meta["tokenizer_sha256"]
        # nothing that differs from run to run: those facts go to MLflow
        assert not {"mlflow_run_id", "git_sha", "created"} & set(meta), meta
        assert meta["learning_rates_sha256"] == Schedule.from_config(params.train).digest(step)
        assert (folder / ckpt.TOKENIZER).read_bytes() == (project.tokenized / "tokenizer.model").read_bytes()
        config = json.loads((folder / ckpt.CONFIG).read_text())
        assert config["vocab_size"] == data_meta["vocab_size"] and config["n_layer"] == 2
        # the weights load with safetensors alone, and through load_model, to the same tensors
        tensors = load_file(str(folder / ckpt.WEIGHTS))
        model = ckpt.load_model(folder)
        state = model.state_dict()
        for name, tensor in tensors.items():
            assert torch.equal(state[name], tensor), name
        assert model.num_parameters() == meta["parameters"] == summary["parameters"]
        training_state = ckpt.load_training_state(folder)
        assert training_state["progress"]["step"] == step
        assert training_state["optimizer"]["muon"]["state"] and training_state["optimizer"]["adamw"]["state"]
    assert ckpt.read_meta(project.ck / ckpt.DECAY_START)["step"] == 32
    assert not torch.equal(load_file(str(project.step(10) / ckpt.WEIGHTS))["norm.weight"],
                           load_file(str(project.step(40) / ckpt.WEIGHTS))["norm.weight"])

    steps = project.steps_log()
    assert [int(r["step"]) for r in steps] == list(range(1, 41))
    assert list(steps[0]) == STEP_COLUMNS
    assert [int(r["tokens_seen"]) for r in steps] == [s * BATCH * CONTEXT for s in range(1, 41)]
    assert losses(steps, "learning_rate") == pytest.approx(
        [Schedule.from_config(params.train).lr(s) for s in range(40)], rel=1e-5)
    assert all(math.isfinite(v) and v > 0 for v in losses(steps) + losses(steps, "grad_norm"))
    evals = project.evals_log()
    assert [int(r["step"]) for r in evals] == [10, 20, 30, 40]
    for row in evals:
        assert float(row["val_perplexity"]) == pytest.approx(math.exp(float(row["val_loss"])), rel=1e-4)

    timings = {"train_wall_seconds", "train_tokens_per_second"}
    assert timings <= set(summary) and all(summary[k] > 0 for k in timings)
    written = json.loads((project.metrics / "train.json").read_text())
    assert written == json.loads(json.dumps({k: v for k, v in summary.items() if k not in timings}))
    assert written["machine"]["threads"] == torch.get_num_threads() and written["machine"]["torch"]
    assert summary["steps"] == 40 and summary["tokens_seen"] == 40 * BATCH * CONTEXT
    assert summary["early_stopped"] is False and summary["world_size"] == 1
    assert summary["val_loss"] == pytest.approx(float(evals[-1]["val_loss"]), rel=1e-5)
    assert summary["best_val_loss"] == pytest.approx(min(losses(evals, "val_loss")), rel=1e-5)
    # it learns: validation loss falls from the first checkpoint to the last (ln 384 = 5.95 at start)
    first, last = ckpt.read_meta(project.step(10))["val_loss"], ckpt.read_meta(project.step(40))["val_loss"]
    assert last < first - 0.2, (first, last)
    assert sum(losses(steps)[-5:]) / 5 < sum(losses(steps)[:5]) / 5 - 0.5


# --------------------------------------------------------------------------- 3. exact resume


RESUME_TRAIN = dict(max_steps=300, checkpoint_steps=[100, 200, 300], eval_interval=50,
                    resume_interval=25, precision="bf16")


def test_resume_after_sigkill_and_sigterm_is_bit_exact(tmp_path: Path, tokenized: Path) -> None:
    a, b, c = (Project(tmp_path / name, tokenized) for name in "abc")
    for p in (a, b, c):
        p.write_params(**RESUME_TRAIN)
    proc_a, log_a = a.start("a.log")  # the uninterrupted reference, alongside the others

    # B: SIGKILL once the rolling resume state exists (before the first step checkpoint)
    proc_b, log_b = b.start("b1.log")
    wait_for(lambda: resume_step(b.ck) >= 50, proc_b, log_b)
    proc_b.kill()
    proc_b.wait()
    assert proc_b.returncode == -signal.SIGKILL
    saved = resume_step(b.ck)
    assert 50 <= saved < 300 and not b.step(300).exists()
    rc, out = b.cli("b2.log")
    assert rc == 0, out
    assert resumed_at(out) == ("resume", saved)
    assert "training from scratch" not in out

    # C: SIGTERM after the step-100 checkpoint: finish the step, save, exit 143, then resume
    proc_c, log_c = c.start("c1.log")
    wait_for(lambda: (c.step(100) / ckpt.COMPLETE).is_file(), proc_c, log_c)
    proc_c.send_signal(signal.SIGTERM)
    proc_c.wait(timeout=SUBPROCESS_TIMEOUT)
    out = log_c.read_text()
    assert proc_c.returncode == 143, out
    stopped = resume_step(c.ck)
    assert 100 < stopped < 300, out
    errors = error_lines(out)
    assert errors == [f"error: stopped by signal at step {stopped}; the state is saved, rerun to resume"]
    assert "Traceback" not in out
    assert int(c.steps_log()[-1]["step"]) == stopped  # the step in flight was finished and logged
    ckpt.verify_checkpoint(c.ck / ckpt.RESUME)
    rc, out = c.cli("c2.log")
    assert rc == 0, out
    assert resumed_at(out) == ("resume", stopped)

    assert proc_a.wait(timeout=SUBPROCESS_TIMEOUT) == 0, log_a.read_text()[-3000:]
    assert resumed_at(log_a.read_text()) is None
    for step in (100, 200, 300):
        for other in (b, c):
            assert_same_weights(a.step(step) / ckpt.WEIGHTS, other.step(step) / ckpt.WEIGHTS)
    assert ckpt.read_meta(b.step(300))["val_loss"] == ckpt.read_meta(a.step(300))["val_loss"]
    # the metric logs are the same too: rows after the resumed step were dropped, then rewritten
    deterministic = ["step", "train_loss", "learning_rate", "grad_norm", "tokens_seen"]
    rows_a = [[r[k] for k in deterministic] for r in a.steps_log()]
    assert len(rows_a) == 300
    for other in (b, c):
        assert [[r[k] for k in deterministic] for r in other.steps_log()] == rows_a
        assert other.evals_log() == a.evals_log()


# --------------------------------------------------------------------------- 4. continuing


def test_extended_run_equals_a_fresh_longer_run(tmp_path: Path, tokenized: Path, monkeypatch, train_log) -> None:
    """20 steps then 40 leaves exactly what 40 from scratch leaves, weights and logs alike."""
    extended, fresh = Project(tmp_path / "extended", tokenized), Project(tmp_path / "fresh", tokenized)
    extended.train(monkeypatch, max_steps=20, checkpoint_steps=[10, 20])
    step10 = snapshot_tree(extended.step(10))
    assert ckpt.read_meta(extended.ck / ckpt.DECAY_START)["step"] == 16
    train_log.clear()
    summary = extended.train(monkeypatch, max_steps=40, checkpoint_steps=[10, 20, 40])
    # the 20-step run decayed from step 16; a 40-step run is still at its peak there
    assert resumed_at(train_log.text) == ("decay-start", 16)
    assert summary["steps"] == 40
    assert snapshot_tree(extended.step(10)) == step10, "a reusable checkpoint was rewritten"
    fresh.train(monkeypatch, max_steps=40, checkpoint_steps=[10, 20, 40])
    assert extended.weights() == fresh.weights()
    assert sorted(extended.weights()) == ["decay-start", "step-10", "step-20", "step-40"]
    for name in extended.weights():
        assert ckpt.read_meta(extended.ck / name) == ckpt.read_meta(fresh.ck / name), name
    assert extended.steps_log() == fresh.steps_log() and extended.evals_log() == fresh.evals_log()
    assert (extended.metrics / "train.json").read_bytes() == (fresh.metrics / "train.json").read_bytes()


def test_new_checkpoint_step_between_others_equals_listing_it_from_the_start(
        tmp_path: Path, tokenized: Path, monkeypatch, train_log) -> None:
    later, upfront = Project(tmp_path / "later", tokenized), Project(tmp_path / "upfront", tokenized)
    later.train(monkeypatch, max_steps=30, checkpoint_steps=[10, 30])
    kept = {s: snapshot_tree(later.step(s)) for s in (10, 30)}
    train_log.clear()
    later.train(monkeypatch, max_steps=30, checkpoint_steps=[10, 15, 30])
    assert resumed_at(train_log.text) == ("step-10", 10)  # the latest state before step 15
    for s in (10, 30):
        assert snapshot_tree(later.step(s)) == kept[s], f"step-{s} was rewritten"
    upfront.train(monkeypatch, max_steps=30, checkpoint_steps=[10, 15, 30])
    assert later.weights() == upfront.weights()
    assert {p.name: p.read_bytes() for p in sorted(later.step(15).iterdir())} == \
        {p.name: p.read_bytes() for p in sorted(upfront.step(15).iterdir())}

    # dropping a step removes its folder when training ends (nothing to train: all reusable)
    later.train(monkeypatch, max_steps=30, checkpoint_steps=[10, 30])
    assert sorted(later.weights()) == ["decay-start", "step-10", "step-30"]


# --------------------------------------------------------------------------- 5. corrupt checkpoints


def test_corrupt_latest_checkpoint_falls_back_to_previous(project: Project, monkeypatch, train_log) -> None:
    project.train(monkeypatch)
    good_weights = sha256(project.step(20) / ckpt.WEIGHTS)
    step10 = snapshot_tree(project.step(10))
    weights = project.step(20) / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # a folder left without its COMPLETE marker (and without meta.json), e.g. by a copy cut short
    partial = project.step(30)
    partial.mkdir()
    (partial / ckpt.WEIGHTS).write_bytes(weights.read_bytes()[:100])

    with pytest.raises(ckpt.CheckpointError, match=r"step-20: model\.safetensors is corrupt \(sha256 mismatch\)"):
        ckpt.load_model(project.step(20))
    with pytest.raises(ckpt.CheckpointError, match=r"step-20: cannot load model\.safetensors"):
        ckpt.load_model(project.step(20), verify=False)
    with pytest.raises(ckpt.CheckpointError, match=r"step-30: incomplete checkpoint \(no COMPLETE marker\)"):
        ckpt.load_model(partial)

    train_log.clear()
    summary = project.train(monkeypatch)
    text = train_log.text
    assert re.search(r"not reusing .*step-20: model\.safetensors is corrupt", text), text
    assert resumed_at(text) == ("decay-start", 16), text  # the latest good state before step 20
    assert "from scratch" not in text
    assert summary["steps"] == 20
    assert snapshot_tree(project.step(10)) == step10
    # the corrupt checkpoint is made again, identical to the one that was damaged
    ckpt.verify_checkpoint(project.step(20))
    assert sha256(project.step(20) / ckpt.WEIGHTS) == good_weights
    assert not partial.exists()  # not a listed step: removed when training ended


def test_resume_folder_without_complete_marker_is_ignored(project: Project, monkeypatch, train_log) -> None:
    project.train(monkeypatch, max_steps=20, checkpoint_steps=[10], resume_interval=3)
    assert not (project.ck / ckpt.RESUME).exists()  # removed when training ended
    # a rolling state cut short (as a kill during its write could leave it, before the rename)
    resume = project.ck / ckpt.RESUME
    shutil.copytree(project.ck / ckpt.DECAY_START, resume)
    (resume / ckpt.COMPLETE).unlink()
    train_log.clear()
    project.train(monkeypatch, max_steps=30, checkpoint_steps=[10, 30], resume_interval=3)
    assert re.search(r"not reusing .*resume: incomplete checkpoint \(no COMPLETE marker\)", train_log.text)
    assert resumed_at(train_log.text) == ("decay-start", 16)
    assert not resume.exists()


# --------------------------------------------------------------------------- 6. changed params


def test_changed_training_param_trains_from_scratch(project: Project, monkeypatch, train_log) -> None:
    project.train(monkeypatch, learning_rate=3e-3)
    old_meta, old_weights = ckpt.read_meta(project.step(20)), sha256(project.step(20) / ckpt.WEIGHTS)
    old_run = project.run_id()
    train_log.clear()

    summary = project.train(monkeypatch, learning_rate=2e-3)
    assert re.search(r"no state in .*checkpoints matches these params and data: training from scratch",
                     train_log.text)
    assert resumed_at(train_log.text) is None
    assert summary["steps"] == 20
    new_params = make_params(learning_rate=2e-3)
    for step in (10, 20):
        meta = ckpt.read_meta(project.step(step))
        assert meta["params_sha256"] == train_mod.weights_params_hash(new_params)
        assert meta["learning_rates_sha256"] != old_meta["learning_rates_sha256"]
        ckpt.verify_checkpoint(project.step(step))
    assert sha256(project.step(20) / ckpt.WEIGHTS) != old_weights
    steps = project.steps_log()
    assert [int(r["step"]) for r in steps] == list(range(1, 21))
    assert float(steps[2]["learning_rate"]) == pytest.approx(2e-3)  # the whole log is the new run's
    assert project.run_id() != old_run  # and so is the MLflow run

    # settings that do not shape the weights (eval_interval, ...) are no reason to start again;
    # a longer run continues from this one's decay start (steps 16 to 19 decayed here)
    train_log.clear()
    project.train(monkeypatch, learning_rate=2e-3, eval_interval=5, max_steps=25, checkpoint_steps=[10, 20, 25])
    assert resumed_at(train_log.text) == ("decay-start", 16)


# --------------------------------------------------------------------------- 7. non-finite loss


def poison(folder: Path, tensor: str = "norm.weight") -> None:
    """Set one weight tensor of a checkpoint to NaN and re-seal the folder (COMPLETE).

    With the weight average on (the default), the checkpoint's weights are the average and a
    resumed run trains on from the live weights in its training state: both are poisoned.
    """
    path = folder / ckpt.WEIGHTS
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors[tensor] = torch.full_like(tensors[tensor], float("nan"))
    save_file(tensors, str(path), metadata=metadata)
    structure = dict(json.loads((folder / ckpt.STATE_JSON).read_text())["__dict__"])
    if "ema" in structure:
        live = dict(dict(structure["ema"]["__dict__"])["live_weights"]["__dict__"])
        state = load_file(str(folder / ckpt.STATE_TENSORS))
        key = live[tensor]["__tensor__"]
        state[key] = torch.full_like(state[key], float("nan"))
        save_file(state, str(folder / ckpt.STATE_TENSORS))
    rewrite_complete(folder)


def test_nonfinite_loss_stops_training_and_keeps_checkpoints(project: Project, monkeypatch, train_log) -> None:
    project.train(monkeypatch)
    poison(project.ck / ckpt.DECAY_START)  # the state a longer run resumes from gives NaN next
    ckpt.verify_checkpoint(project.ck / ckpt.DECAY_START)
    before = snapshot_tree(project.ck)

    # the CLI: exit status 2, one line naming the step, nothing written or removed
    project.write_params(max_steps=30, checkpoint_steps=[10, 20, 30])
    rc, out = project.cli("nan.log")
    assert rc == 2, out
    assert "Traceback" not in out
    assert error_lines(out) == [
        f"error: non-finite loss at step 17 (1 in a row; train.max_nonfinite_batches=0); the last good "
        f"checkpoint in models/checkpoints is kept. Try a lower train.learning_rate."]
    assert resumed_at(out) == ("decay-start", 16)
    assert snapshot_tree(project.ck) == before
    assert not project.step(30).exists()

    # skipping: two non-finite batches in a row are skipped (no update), the third stops it
    train_log.clear()
    with pytest.raises(TrainingError, match=r"non-finite loss at step 19 \(3 in a row; train.max_nonfinite_batches=2\)"):
        project.train(monkeypatch, max_steps=30, checkpoint_steps=[10, 20, 30], max_nonfinite_batches=2)
    skipped = [r.getMessage() for r in train_log.records if "batch skipped" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == ["step 17", "step 18", "step 19"]
    rows = project.steps_log()
    assert [int(r["step"]) for r in rows] == list(range(1, 19))  # 17 and 18 logged as skipped
    assert all(math.isnan(float(r["train_loss"])) and math.isnan(float(r["grad_norm"])) for r in rows[16:])
    assert snapshot_tree(project.step(20)) == {k.removeprefix("step-20/"): v for k, v in before.items()
                                               if k.startswith("step-20/")}
    assert not project.step(30).exists()


# --------------------------------------------------------------------------- 8. early stopping


EARLY = dict(learning_rate=1e-9, min_learning_rate=0.0, max_steps=60, checkpoint_steps=[10, 40, 60],
             eval_interval=10, early_stopping_patience=2)


def test_early_stopping_writes_remaining_checkpoints(project: Project, monkeypatch, train_log) -> None:
    summary = project.train(monkeypatch, **EARLY)
    # evaluations at 10 (first: improves on inf), 20 and 30 (no improvement) -> stop at 30
    assert summary["early_stopped"] is True and summary["steps"] == 30
    assert "early stopping at step 30" in train_log.text
    assert [int(r["step"]) for r in project.steps_log()] == list(range(1, 31))
    assert [int(r["step"]) for r in project.evals_log()] == [10, 20, 30]
    meta10 = ckpt.read_meta(project.step(10))
    assert meta10["early_stopped"] is False and meta10["step"] == 10
    for step in (40, 60):
        meta = ckpt.read_meta(project.step(step))
        assert meta["early_stopped"] is True and meta["step"] == 30
        ckpt.verify_checkpoint(project.step(step))
    assert_same_weights(project.step(40) / ckpt.WEIGHTS, project.step(60) / ckpt.WEIGHTS)
    assert json.loads((project.metrics / "train.json").read_text())["early_stopped"] is True

    # rerunning the finished stage (e.g. dvc repro --force) trains no further step
    folders = snapshot_tree(project.ck)
    summary = project.train(monkeypatch, **EARLY)
    assert summary["steps"] == 30 and summary["early_stopped"] is True
    assert [int(r["step"]) for r in project.steps_log()] == list(range(1, 31))
    after = snapshot_tree(project.ck)
    assert {k: v for k, v in after.items() if k.startswith("step-")} == \
        {k: v for k, v in folders.items() if k.startswith("step-")}


def test_early_stopping_off_runs_all_steps(project: Project, monkeypatch, train_log) -> None:
    summary = project.train(monkeypatch, **(EARLY | dict(early_stopping_patience=0, max_steps=30,
                                                         checkpoint_steps=[30])))
    assert summary["steps"] == 30 and summary["early_stopped"] is False
    # without a progress bar (output to a file), one log line per 1/20 of the steps (here every 2)
    lines = [r.getMessage() for r in train_log.records if re.match(r"step \d+/30: loss", r.getMessage())]
    assert [line.split(":")[0] for line in lines] == [f"step {s}/30" for s in range(2, 31, 2)]
    assert ckpt.read_meta(project.step(30))["early_stopped"] is False


# --------------------------------------------------------------------------- 9. DDP


def test_ddp_two_processes_match_one_process(tmp_path: Path, tokenized: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    single, ddp = Project(tmp_path / "single", tokenized), Project(tmp_path / "ddp", tokenized)
    for p in (single, ddp):
        p.write_params(precision="fp32", max_steps=20, checkpoint_steps=[10, 20])
    proc, log = ddp.start("ddp.log", [str(torchrun), "--standalone", "--nproc_per_node=2",
                                      "-m", "openllm", "train"])
    rc, out_single = single.cli("single.log")
    assert rc == 0, out_single
    assert proc.wait(timeout=SUBPROCESS_TIMEOUT) == 0, log.read_text()[-4000:]
    out = log.read_text()

    # same global batch of 4 (2 per rank): losses agree to float rounding (fp32, TSV's 6 digits)
    rows, rows_single = ddp.steps_log(), single.steps_log()
    assert [r["step"] for r in rows] == [r["step"] for r in rows_single] == [str(s) for s in range(1, 21)]
    assert losses(rows) == pytest.approx(losses(rows_single), rel=1e-4)
    assert losses(rows, "learning_rate") == losses(rows_single, "learning_rate")
    assert [r["tokens_seen"] for r in rows] == [r["tokens_seen"] for r in rows_single]
    assert losses(ddp.evals_log(), "val_loss") == pytest.approx(losses(single.evals_log(), "val_loss"), rel=1e-4)
    wa, wb = load_file(str(ddp.step(20) / ckpt.WEIGHTS)), load_file(str(single.step(20) / ckpt.WEIGHTS))
    for name in wa:  # Muon orthogonalises in bf16: a rounding flip moves a weight by ~1e-4 per step
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-3)

    # only rank 0 wrote: one set of checkpoints, one summary line, one MLflow run
    assert sorted(p.name for p in ddp.ck.iterdir()) == ["decay-start", "step-10", "step-20"]
    for step in (10, 20):
        meta = ckpt.read_meta(ddp.step(step))
        assert meta["world_size"] == 2 and ":world2:" in meta["resume_key"]
        ckpt.verify_checkpoint(ddp.step(step))
    assert out.count("trained 20 steps") == 1
    assert json.loads((ddp.metrics / "train.json").read_text())["world_size"] == 2
    with sqlite3.connect(ddp.root / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid FROM runs").fetchall()
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", runs[0]).fetchall())
    assert len(runs) == 1 and runs[0][0] == ddp.run_id()
    assert tags["world_size"] == "2"


# --------------------------------------------------------------------------- 10. MLflow


def test_mlflow_run_params_metrics_tags_and_samples(project: Project, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    project.train(monkeypatch, max_steps=20, checkpoint_steps=[10, 20])
    client = MlflowClient(tracking_uri=project.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert project.run_id() == run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "20"
    assert run.data.params["train.learning_rate"] == "0.003"
    assert run.data.params["model.n_embd"] == "32"
    assert run.data.params["train.schedule"] == "wsd" and run.data.params["data.source"] == "shakespeare"
    assert not any(k.startswith(("serve.", "pipeline.", "app.")) for k in run.data.params)
    for name in ("train_loss", "val_loss", "learning_rate", "tokens_per_second", "grad_norm"):
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [10, 20], name
        assert all(math.isfinite(m.value) for m in history), name
    steps = {int(r["step"]): r for r in project.steps_log()}
    train_loss = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert train_loss[20] == pytest.approx(float(steps[20]["train_loss"]), rel=1e-5)
    val_loss = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert val_loss[20] == pytest.approx(ckpt.read_meta(project.step(20))["val_loss"], rel=1e-9)
    tags = run.data.tags
    assert tags["git_sha"] and tags["version.torch"] == torch.__version__
    assert tags["world_size"] == "1" and tags["precision"] == "fp32" and tags["device"] == "cpu"
    assert tags["data_sha256"] == json.loads((project.tokenized / "meta.json").read_text())["train"]["sha256"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert artifacts == {"samples/step-10.md", "samples/step-20.md"}
    sample = Path(client.download_artifacts(run_id, "samples/step-10.md", str(project.root))).read_text()
    assert sample.startswith("# Samples at step 10") and "ROMEO:" in sample

    # a resumed run (max_steps raised) logs into the same MLflow run
    project.train(monkeypatch, max_steps=30, checkpoint_steps=[10, 20, 30])
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    # steps 17-20 were trained again (the longer run is still at its peak there): logged again
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [10, 20, 20, 30]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [10, 20, 20, 30]
    assert "samples/step-30.md" in {a.path for a in client.list_artifacts(run_id, "samples")}
    assert client.get_run(run_id).info.status == "FINISHED"
    assert project.run_id() == run_id
    assert client.get_metric_history(run_id, "train_wall_seconds")[0].value > 0  # timings: MLflow only


# --------------------------------------------------------------------------- 11. bad input


def test_cli_without_tokenized_data_fails_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    write_yaml(root / "params.yaml", overrides())
    proc = subprocess.run([sys.executable, "-m", "openllm", "train"], cwd=root, capture_output=True, text=True,
                          env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        "error: data/tokenized/meta.json not found: run the tokenize stage first"]
    assert not (root / "models").exists() and not (root / "metrics").exists()


def test_batch_size_must_divide_over_processes(project: Project, monkeypatch) -> None:
    # world size 3 without starting 3 processes: the check runs before any process-group call
    monkeypatch.setattr(train_mod, "resolve_device",
                        lambda *args, **kwargs: DeviceSetup(torch.device("cpu"), None, False, rank=0, world_size=3))
    with pytest.raises(TrainingError, match=r"train.batch_size=4 must be a multiple of processes \(3\) x "
                                            r"train.gradient_accumulation_steps \(1\)"):
        project.train(monkeypatch)
    assert not project.ck.exists() and not project.metrics.exists()
    with pytest.raises(ConfigError, match="train.batch_size=4 must be divisible by train.gradient_accumulation_steps=3"):
        make_params(gradient_accumulation_steps=3)


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, tokenized: Path, monkeypatch) -> None:
    """batch 4 as 2 micro-batches of 2 takes the same steps as one batch of 4 (fp32)."""
    one, two = Project(tmp_path / "one", tokenized), Project(tmp_path / "two", tokenized)
    one.train(monkeypatch, max_steps=10, checkpoint_steps=[10])
    two.train(monkeypatch, max_steps=10, checkpoint_steps=[10], gradient_accumulation_steps=2)
    assert losses(two.steps_log()) == pytest.approx(losses(one.steps_log()), rel=1e-4)
    # validation uses the same windows (eval_batches global batches), in micro-batches of 2
    assert losses(two.evals_log(), "val_loss") == pytest.approx(losses(one.evals_log(), "val_loss"), rel=1e-5)


# --------------------------------------------------------------------------- compile and optimizers


def test_compile_auto_needs_a_cpp_compiler_on_cpu(monkeypatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert resolve_device("cpu", compile="auto").compile is False
    monkeypatch.delenv("CXX")
    found = shutil.which("g++") is not None
    assert resolve_device("cpu", compile="auto").compile is found
    assert resolve_device("cpu", compile="false").compile is False


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs g++")
def test_compiled_training_matches_eager(tmp_path: Path, tokenized: Path, monkeypatch) -> None:
    # Compiling is real (inductor writes and builds C++ kernels) and counted in the training time.
    eager, compiled = Project(tmp_path / "eager", tokenized), Project(tmp_path / "compiled", tokenized)
    run = dict(max_steps=10, checkpoint_steps=[10])
    assert eager.train(monkeypatch, **run)["compiled"] is False
    summary = compiled.train(monkeypatch, **run, compile="true")
    assert summary["compiled"] is True
    assert losses(compiled.steps_log()) == pytest.approx(losses(eager.steps_log()), rel=2e-3)
    # the compiled run's checkpoint is a plain model (no torch.compile prefixes in the weights)
    assert set(load_file(str(compiled.step(10) / ckpt.WEIGHTS))) == set(load_file(str(eager.step(10) / ckpt.WEIGHTS)))


def test_failed_compile_falls_back_under_auto_and_stops_when_required(project: Project, monkeypatch, train_log) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(device_mod, "cpp_compiler_available", lambda: True)  # while `auto` believes it works
    # No kernels built by an earlier test may be reused: a fresh cache, and shapes of their own.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(project.root / "inductor-cache"))
    run = dict(max_steps=4, checkpoint_steps=[4], batch_size=3)
    # inductor's own patch() restores its settings (monkeypatch would delete them on undo)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        with pytest.raises(DeviceError, match="train.compile=true but torch.compile failed"):
            project.train(monkeypatch, **run, compile="true")
        torch._dynamo.reset()
        summary = project.train(monkeypatch, **run, compile="auto")
    torch._dynamo.reset()
    assert summary["compiled"] is False and summary["steps"] == 4
    assert "training without it" in train_log.text


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_both_optimizers_learn_and_resume_from_their_own_state(project: Project, monkeypatch, kind) -> None:
    project.train(monkeypatch, optimizer=kind, max_steps=10, checkpoint_steps=[10])
    first = losses(project.steps_log())
    assert sum(first[-3:]) < sum(first[:3])
    state = ckpt.load_training_state(project.step(10))["optimizer"]
    assert (set(state) == {"muon", "adamw"}) is (kind == "muon")
    project.train(monkeypatch, optimizer=kind, max_steps=20, checkpoint_steps=[10, 20])  # continues
    assert [r["step"] for r in project.steps_log()] == [str(s) for s in range(1, 21)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs g++")
def test_compiled_runs_are_bit_identical(tmp_path: Path, tokenized: Path, monkeypatch) -> None:
    """train.deterministic (the default) makes compiled training repeatable on one machine."""
    a, b = Project(tmp_path / "a", tokenized), Project(tmp_path / "b", tokenized)
    run = dict(max_steps=8, checkpoint_steps=[4, 8], compile="true", precision="bf16")
    assert a.train(monkeypatch, **run)["compiled"] is True
    torch._dynamo.reset()
    b.train(monkeypatch, **run)
    assert a.weights() == b.weights()
    assert a.steps_log() == b.steps_log()


# --------------------------------------------------------------------------- nothing lost


@pytest.mark.parametrize("bad, message", [
    ({"model": {"context_length": 1_000_000}}, "the training split has"),  # longer than the corpus
    ({"model": {"context_length": 50_000_000}}, "model.context_length=50000000"),
    ({"train": {"weight_decay": float("inf")}}, "train.weight_decay=inf"),
    ({"train": {"seed": 2**64}}, "train.seed=18446744073709551616"),
    ({"train": {"batch_size": True}}, "train.batch_size=True"),
], ids=["context_longer_than_data", "context_too_long", "infinite_weight_decay", "seed_too_big", "bool_batch"])
def test_params_that_cannot_train_leave_the_checkpoints_alone(project: Project, monkeypatch, bad, message) -> None:
    project.train(monkeypatch, max_steps=10, checkpoint_steps=[10])
    before = snapshot_tree(project.root / "models")
    values = overrides(max_steps=10, checkpoint_steps=[10])
    for section, changes in bad.items():
        values[section] = {**values.get(section, {}), **changes}
    write_yaml(project.root / "params.yaml", values)
    rc, out = project.cli("bad.log")
    assert rc == 2 and "Traceback" not in out, out
    assert len(error_lines(out)) == 1 and message in error_lines(out)[0], out
    assert snapshot_tree(project.root / "models") == before


def test_leftovers_of_a_killed_checkpoint_write_are_removed(project: Project, monkeypatch) -> None:
    project.ck.mkdir(parents=True)
    litter = project.ck / ".step-10.tmp-abc123"
    litter.mkdir()
    (litter / ckpt.WEIGHTS).write_bytes(b"half a file")
    project.train(monkeypatch, max_steps=10, checkpoint_steps=[10])
    assert not litter.exists()
    assert sorted(p.name for p in project.ck.iterdir()) == ["decay-start", "step-10"]


def test_hostile_config_is_refused_before_allocating(project: Project, monkeypatch) -> None:
    """A config.json asking for a huge model fails on the shape check, not on a 4 TB allocation."""
    project.train(monkeypatch, max_steps=10, checkpoint_steps=[10])
    folder = project.step(10)
    config = json.loads((folder / ckpt.CONFIG).read_text())
    config["n_embd"], config["intermediate_size"] = 1 << 20, 1 << 22
    (folder / ckpt.CONFIG).write_text(json.dumps(config))
    rewrite_complete(folder)
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors does not match config.json"):
        ckpt.load_model(folder)  # building this model first would need terabytes
