"""The ``train`` stage: turn ``data/tokenized/`` into step checkpoints.

One process (``openllm train``) or many (``torchrun --nproc_per_node=N -m openllm train``,
PyTorch DistributedDataParallel). Every rank draws the same global batch of random windows
and takes its own slice, so N processes see exactly the data one process would; rank 0 logs
and writes checkpoints.

Resuming is exact: the model, optimizer, RNG and data-sampler state are saved at every
checkpoint step and every ``train.resume_interval`` steps (and when SIGTERM arrives), so a
rerun after a crash or kill continues from the latest complete state and, on CPU with the
same thread count, ends with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import tracking
from .config import Params, TrainConfig
from .errors import OpenLLMError, TrainingInterrupted
from .fileio import read_json, write_json
from .model import GPT, GPTConfig
from .perf import bf16_supported
from .sampling import Sampling
from .tokenizer import load_tokenizer, load_tokens
from .torch_generate import generate_text

log = logging.getLogger("openllm.train")
STEP_LOG, EVAL_LOG = "train_steps.tsv", "train_evals.tsv"
STEP_COLUMNS = ["step", "train_loss", "learning_rate", "grad_norm", "tokens_per_second", "tokens_seen"]
EVAL_COLUMNS = ["step", "val_loss", "val_perplexity"]


class TrainingError(OpenLLMError):
    """Training cannot go on (bad data, non-finite loss, ...)."""


# --- where and how we run ------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = plain fp32
    compile: bool
    rank: int = 0
    world_size: int = 1

    @property
    def precision_name(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device, precision and compile setting; join the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"train.device={cfg.device} but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.precision == "auto":
        dtype = torch.bfloat16 if bf16_supported(device) else None
    else:
        dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    if cfg.compile == "auto":
        # On CPU, torch.compile writes C++ kernels, so it needs a compiler. On a 2-core CPU the
        # default model trains ~1.4x faster after ~30 s of compiling (README, Benchmarks).
        use_compile = device.type == "cuda" or (device.type == "cpu" and cpp_compiler_available())
    else:
        use_compile = cfg.compile == "true"
    return Runtime(device, dtype, use_compile, rank, world_size)


def cpp_compiler_available() -> bool:
    """True when the C++ compiler torch.compile looks for on CPU ($CXX, else g++) is on PATH."""
    return shutil.which(os.environ.get("CXX") or "g++") is not None


def compile_model(forward_model: torch.nn.Module, x: torch.Tensor, runtime: Runtime,
                  required: bool) -> torch.nn.Module:
    """``torch.compile`` the model and compile it now, on one forward/backward of ``x``.

    Compiling up front means a failure (no working compiler, an unsupported platform) shows
    before training starts: with ``train.compile: auto`` training then goes on without it;
    with ``true`` it is an error. The gradients of the trial pass are dropped.
    """
    log.info("compiling the model with torch.compile (about half a minute on a small CPU)")
    compiled = torch.compile(forward_model)
    try:
        with runtime.autocast():
            logits, _ = compiled(x, use_cache=False)
        logits.float().mean().backward()
    except Exception as exc:  # compiler errors come in many types, from many libraries
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if required:
            raise TrainingError(f"train.compile=true but torch.compile failed: {reason}") from exc
        log.warning("torch.compile failed (%s): training without it (set train.compile=false to skip)", reason)
        return forward_model
    finally:
        forward_model.zero_grad(set_to_none=True)
    return compiled


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for update number ``step`` (0-based): linear warmup, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_learning_rate + cosine * (cfg.learning_rate - cfg.min_learning_rate)


# --- data ----------------------------------------------------------------------------------


class WindowSampler:
    """Draws random windows of ``context + 1`` tokens; its generator state is the data position."""

    def __init__(self, tokens: np.ndarray, context: int, seed: int):
        if len(tokens) <= context + 1:
            raise TrainingError(
                f"the training split has {len(tokens)} tokens, fewer than model.context_length+1="
                f"{context + 1}: use more data or a shorter context"
            )
        self.tokens, self.context = tokens, context
        self.generator = torch.Generator().manual_seed(seed)

    def next_starts(self, batch: int) -> torch.Tensor:
        return torch.randint(0, len(self.tokens) - self.context - 1, (batch,), generator=self.generator)

    def batch(self, starts: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each ``(B, T)``."""
        windows = np.stack([self.tokens[s : s + self.context + 1] for s in starts.tolist()])
        windows = torch.from_numpy(windows.astype(np.int64)).to(device)
        return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def validation_loss(model: GPT, tokens: np.ndarray, context: int, batches: int, batch_size: int,
                    runtime: Runtime) -> float:
    """Mean loss over fixed, evenly spaced validation windows (the same at every evaluation)."""
    count = batches * batch_size
    span = len(tokens) - context - 1
    if span <= 0:
        raise TrainingError(f"the validation split has {len(tokens)} tokens, too few for context {context}")
    starts = torch.from_numpy(np.linspace(0, span, count).astype(np.int64))
    sampler = WindowSampler.__new__(WindowSampler)
    sampler.tokens, sampler.context = tokens, context
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size):
        x, y = sampler.batch(chunk, runtime.device)
        with runtime.autocast():
            logits, _ = model(x, use_cache=False)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
    model.train()
    return total / (count * context)


# --- state -----------------------------------------------------------------------------------


def resume_key(params: Params, data_meta: dict[str, Any], world_size: int) -> str:
    """What a checkpoint must share with this run to be continued (not max_steps/checkpoint_steps)."""
    key = params.section_hash(
        "model", "train",
        exclude=("train.max_steps", "train.checkpoint_steps", "train.eval_interval",
                 "train.early_stopping_patience", "train.resume_interval", "train.sample_tokens",
                 "train.max_nonfinite_batches"),
    )
    return f"{key}:{data_meta['train']['sha256']}:{data_meta['tokenizer_sha256']}:world{world_size}"


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class _TsvLog:
    """A TSV file of rows keyed by step; on resume rows past the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_until: int):
        self.path, self.columns = path, columns
        rows = []
        if path.is_file() and keep_until > 0:
            lines = path.read_text().splitlines()
            if lines and lines[0].split("\t") == columns:
                rows = [line for line in lines[1:] if line and int(line.split("\t")[0]) <= keep_until]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\t".join(columns) + "\n" + "".join(row + "\n" for row in rows))

    def append(self, **values: Any) -> None:
        with open(self.path, "a") as f:
            f.write("\t".join(_format(values[c]) for c in self.columns) + "\n")


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# --- the training loop ------------------------------------------------------------------------


@dataclass
class _Progress:
    """Everything besides weights and optimizer that a resumed run must restore."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_in_row: int = 0
    last_train_loss: float = math.nan
    last_val_loss: float = math.nan


def _prepare_checkpoints_dir(checkpoints_dir: Path, key: str, steps: list[int]) -> Path | None:
    """Find the state to resume from; wipe checkpoints made with other params or data."""
    existing = ckpt.list_checkpoints(checkpoints_dir)
    resumable = ckpt.latest_resumable(checkpoints_dir, warn=log.warning)
    stale = False
    for _, folder in existing + ([(0, resumable)] if resumable else []):
        try:
            folder_key = ckpt.read_meta(folder).get("resume_key")
        except (OSError, ValueError):
            continue  # incomplete or corrupt: never resumed from, rewritten when its step comes
        stale = stale or folder_key != key
    if stale:
        log.warning("params or data changed since %s was written: training from scratch", checkpoints_dir)
        shutil.rmtree(checkpoints_dir)
        return None
    # A newly listed step below the resumable state can only be made by going back before it.
    missing = [s for s in steps if not (ckpt.step_folder(checkpoints_dir, s) / ckpt.COMPLETE).is_file()]
    if resumable and missing and ckpt.read_meta(resumable)["step"] > missing[0]:
        earlier = [p for s, p in existing if s <= missing[0] and (p / ckpt.STATE_JSON).is_file()]
        resumable = None
        for folder in reversed(earlier):
            try:
                ckpt.verify_checkpoint(folder)
                resumable = folder
                break
            except ckpt.CheckpointError as exc:
                log.warning("skipping %s", exc)
    return resumable


def _needs_saving(folder: Path) -> bool:
    """True when a checkpoint folder is missing, or incomplete/corrupt (then it is replaced)."""
    if not folder.exists():
        return True
    try:
        ckpt.verify_checkpoint(folder)
        return False
    except ckpt.CheckpointError as exc:
        log.warning("replacing %s", exc)
        return True


def train(params: Params, tokenized_dir: Path, checkpoints_dir: Path, metrics_dir: Path,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; return a summary written to ``metrics/train.json``."""
    cfg = params.train
    runtime = resolve_runtime(cfg)
    if not (tokenized_dir / "meta.json").is_file():
        raise TrainingError(f"{tokenized_dir / 'meta.json'} not found: run the tokenize stage first")
    data_meta = read_json(tokenized_dir / "meta.json")
    train_tokens, val_tokens = load_tokens(tokenized_dir, "train"), load_tokens(tokenized_dir, "val")
    model_config = GPTConfig(vocab_size=data_meta["vocab_size"], rope_theta=params.model.rope_theta,
                             **params.model.resolved())
    context = model_config.context_length
    micro_batch, remainder = divmod(cfg.batch_size, runtime.world_size * cfg.gradient_accumulation_steps)
    if remainder or micro_batch == 0:
        raise TrainingError(
            f"train.batch_size={cfg.batch_size} must be a multiple of processes ({runtime.world_size}) "
            f"x train.gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
        )
    key = resume_key(params, data_meta, runtime.world_size)
    resume_from = _prepare_checkpoints_dir(checkpoints_dir, key, cfg.checkpoint_steps) if runtime.is_main else None
    if runtime.world_size > 1:  # every rank resumes from the folder rank 0 chose
        shared = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(shared, src=0)
        resume_from = Path(shared[0]) if shared[0] else None

    torch.manual_seed(cfg.seed)
    sampler = WindowSampler(train_tokens, context, cfg.seed)
    state = _Progress()
    if resume_from is not None:
        model = ckpt.load_model(resume_from, runtime.device, verify=False)
        saved = ckpt.load_training_state(resume_from)
        state = _Progress(**saved["progress"])
        if saved["threads"] != torch.get_num_threads():
            log.warning("resuming with %d threads, the state was saved with %d: results may differ "
                        "in the last bits", torch.get_num_threads(), saved["threads"])
    else:
        model = GPT(model_config).to(runtime.device)
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.optimizer)
    if resume_from is not None:
        optimizer.load_state_dict(saved["optimizer"])
        sampler.generator.set_state(saved["sampler"])
        restore_rng(saved["rng"])
        log.info("resuming from %s (step %d)", resume_from, state.step)

    forward_model: torch.nn.Module = model
    if runtime.world_size > 1:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    started = time.perf_counter()  # the training time includes compiling
    if runtime.compile:
        x, _ = sampler.batch(torch.zeros(micro_batch, dtype=torch.long), runtime.device)
        eager = forward_model
        forward_model = compile_model(forward_model, x, runtime, required=cfg.compile == "true")
        runtime.compile = forward_model is not eager  # False when auto fell back to eager

    tokenizer_path = tokenized_dir / data_meta["tokenizer"]
    tokenizer = load_tokenizer(tokenizer_path)
    mlflow = run = None
    if runtime.is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        steps_log = _TsvLog(metrics_dir / STEP_LOG, STEP_COLUMNS, state.step)
        evals_log = _TsvLog(metrics_dir / EVAL_LOG, EVAL_COLUMNS, state.step)
        mlflow = tracking.setup(params.mlflow.experiment)
        run = tracking.open_run(mlflow, tracking.read_run_id(checkpoints_dir), log_system_metrics=True)
        (checkpoints_dir / tracking.RUN_ID_FILE).write_text(run.info.run_id + "\n")
        mlflow.set_tags(tracking.run_tags({
            "data_sha256": data_meta["train"]["sha256"], "tokenizer_sha256": data_meta["tokenizer_sha256"],
            "parameters": str(model.num_parameters()), "device": str(runtime.device),
            "precision": runtime.precision_name, "world_size": str(runtime.world_size),
        }))
        with contextlib.suppress(Exception):  # MLflow refuses to change a param of a resumed run
            mlflow.log_params(tracking.flatten(params.model_dump(exclude={"pipeline", "serve"})))

    stop_signal: list[int] = []
    previous_handlers = {s: signal.signal(s, lambda sig, _: stop_signal.append(sig))
                         for s in (signal.SIGTERM, signal.SIGINT)}
    sample_settings = Sampling(**params.evaluate.sampling.model_dump() | {"max_new_tokens": max(1, cfg.sample_tokens)})

    def save(folder: Path, replace: bool, early_stopped: bool = False) -> None:
        meta = {
            "step": state.step, "tokens_seen": state.tokens_seen, "train_loss": state.last_train_loss,
            "val_loss": state.last_val_loss, "git_sha": tracking.git_sha(),
            "params_sha256": params.section_hash("model", "train"), "resume_key": key,
            "threads": torch.get_num_threads(), "world_size": runtime.world_size,
            "precision": runtime.precision_name, "parameters": model.num_parameters(),
            "data_sha256": data_meta["train"]["sha256"], "tokenizer_sha256": data_meta["tokenizer_sha256"],
            "mlflow_run_id": run.info.run_id if run else None, "early_stopped": early_stopped,
            "bytes_per_token_val": data_meta["bytes_per_token"]["val"], "created": time.time(),
        }
        training_state = {
            "progress": state.__dict__, "optimizer": optimizer.state_dict(), "sampler": sampler.generator.get_state(),
            "rng": capture_rng(), "threads": torch.get_num_threads(),
        }
        ckpt.save_checkpoint(folder, model, tokenizer_path, meta, training_state, replace=replace)

    def evaluate_now() -> None:
        # eval_batches global batches of windows, in micro-batches: the same windows (and loss)
        # whatever the number of processes and accumulation steps
        state.last_val_loss = validation_loss(
            model, val_tokens, context, cfg.eval_batches * runtime.world_size * cfg.gradient_accumulation_steps,
            micro_batch, runtime)
        improved = state.last_val_loss < state.best_val_loss - 1e-4
        state.best_val_loss = min(state.best_val_loss, state.last_val_loss)
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
        if runtime.is_main:
            evals_log.append(step=state.step, val_loss=state.last_val_loss,
                             val_perplexity=math.exp(min(state.last_val_loss, 700)))
            mlflow.log_metrics({"val_loss": state.last_val_loss}, step=state.step)
            model.eval()
            samples = "\n\n".join(
                f"### {prompt!r}\n\n{prompt}{generate_text(model, tokenizer, prompt, sample_settings)}"
                for prompt in params.evaluate.prompts)
            model.train()
            mlflow.log_text(f"# Samples at step {state.step}\n\n{samples}\n", f"samples/step-{state.step}.md")

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step",
               disable=not (progress and runtime.is_main))
    patience = cfg.early_stopping_patience
    tokens_at_start = state.tokens_seen
    early_stopped = patience > 0 and state.evals_without_improvement >= patience  # resumed after stopping
    tokens_per_step = cfg.batch_size * context
    try:
        while state.step < cfg.max_steps and not early_stopped:
            step_started = time.perf_counter()
            lr = learning_rate(state.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = sampler.next_starts(cfg.batch_size)[runtime.rank :: runtime.world_size]
            loss_sum = torch.zeros((), device=runtime.device)
            for index, chunk in enumerate(starts.split(micro_batch)):
                x, y = sampler.batch(chunk, runtime.device)
                sync_now = index == cfg.gradient_accumulation_steps - 1
                no_sync = (forward_model.no_sync if runtime.world_size > 1 and not sync_now and
                           hasattr(forward_model, "no_sync") else contextlib.nullcontext)
                with no_sync(), runtime.autocast():
                    logits, _ = forward_model(x, use_cache=False)
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                    (loss / cfg.gradient_accumulation_steps).backward()
                loss_sum += loss.detach() / cfg.gradient_accumulation_steps
            if runtime.world_size > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            train_loss = loss_sum.item()
            state.step += 1
            state.tokens_seen += tokens_per_step
            if not math.isfinite(train_loss):
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_in_row += 1
                log.warning("step %d: non-finite loss (%s), batch skipped", state.step, train_loss)
                if state.nonfinite_in_row > cfg.max_nonfinite_batches:
                    raise TrainingError(
                        f"non-finite loss at step {state.step} ({state.nonfinite_in_row} in a row; "
                        f"train.max_nonfinite_batches={cfg.max_nonfinite_batches}); the last good "
                        f"checkpoint in {checkpoints_dir} is kept. Try a lower train.learning_rate.")
                grad_norm = math.nan
            else:
                state.nonfinite_in_row = 0
                state.last_train_loss = train_loss
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens_per_second = tokens_per_step / (time.perf_counter() - step_started)
            if runtime.is_main:
                steps_log.append(step=state.step, train_loss=train_loss, learning_rate=lr, grad_norm=grad_norm,
                                 tokens_per_second=tokens_per_second, tokens_seen=state.tokens_seen)
                if state.step % 10 == 0 or state.step == cfg.max_steps:
                    mlflow.log_metrics({"train_loss": train_loss, "learning_rate": lr, "grad_norm": grad_norm,
                                        "tokens_per_second": tokens_per_second}, step=state.step)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
                bar.update(1)
            is_checkpoint = state.step in cfg.checkpoint_steps
            if is_checkpoint or state.step % cfg.eval_interval == 0:
                evaluate_now()
            early_stopped = patience > 0 and state.evals_without_improvement >= patience
            stop = torch.tensor([len(stop_signal)], device=runtime.device)
            if runtime.world_size > 1:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if runtime.is_main:
                folder = ckpt.step_folder(checkpoints_dir, state.step)
                if is_checkpoint and _needs_saving(folder):
                    save(folder, replace=True)
                elif state.step % cfg.resume_interval == 0 or stop.item():
                    save(checkpoints_dir / ckpt.RESUME, replace=True)
            if stop.item():
                raise TrainingInterrupted(
                    f"stopped by signal at step {state.step}; the state is saved, rerun to resume")
            if early_stopped:
                log.warning("early stopping at step %d: validation loss has not improved for %d evaluations",
                            state.step, patience)
                break
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if run is not None:
            mlflow.end_run("KILLED" if stop_signal else "FINISHED")

    elapsed = time.perf_counter() - started
    summary = {
        "steps": state.step, "tokens_seen": state.tokens_seen, "train_loss": state.last_train_loss,
        "val_loss": state.last_val_loss, "best_val_loss": state.best_val_loss,
        "parameters": model.num_parameters(), "wall_seconds": round(elapsed, 2),
        "tokens_per_second": (state.tokens_seen - tokens_at_start) / elapsed if elapsed else 0.0,
        "flops_per_token": model.estimate_flops_per_token(), "early_stopped": early_stopped,
        "device": str(runtime.device), "precision": runtime.precision_name,
        "compiled": runtime.compile, "optimizer": cfg.optimizer, "world_size": runtime.world_size,
        "threads": torch.get_num_threads(),
    }
    if runtime.is_main:
        for step in cfg.checkpoint_steps:  # after early stopping, later steps hold the final weights
            if not ckpt.step_folder(checkpoints_dir, step).exists():
                save(ckpt.step_folder(checkpoints_dir, step), replace=False, early_stopped=True)
        write_json(metrics_dir / "train.json", summary)
    if runtime.world_size > 1:
        dist.barrier()
    return summary
