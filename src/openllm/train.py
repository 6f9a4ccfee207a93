"""Training: a state that saves and restores itself, one optimizer step, and the loop.

One process or many (``torchrun``, PyTorch DistributedDataParallel): every rank draws the same
global batch of random windows and takes its own slice, so N processes see exactly the data one
process would; rank 0 logs and writes checkpoints.

What a run leaves depends on params.yaml, the code and the data alone:

- a saved state is reused only when the run that made it shares this run's resume key (every
  setting that shapes the trajectory) and gave the same learning rate to every update before it
  (:meth:`Schedule.agrees_with`), so raising ``train.max_steps`` under the ``wsd`` schedule
  continues from the old decay start and ends with the checkpoints a fresh run writes;
- with ``train.deterministic`` (the default) two runs on one machine, or a killed and resumed
  run, give bit-identical weights, compiled or not;
- nothing is deleted before the new run has replaced it: stale checkpoints stay until the
  same step is rewritten, and unlisted ones go only when training ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import tracking
from .config import Params
from .device import DeviceSetup, compile_model, resolve_device
from .ema import WeightAverage
from .errors import OpenLLMError, TrainingInterrupted
from .fileio import read_json, write_json
from .model import GPT, GPTConfig
from .optim import build_optimizer
from .paths import TRAIN_SUMMARY, step_folder
from .perf import fingerprint
from .runlog import RunLogger
from .resume import TRAIN_CODE_SHA256, ResumePlan, plan_resume, resume_key, tidy_checkpoints, weights_params_hash
from .schedule import Schedule
from .tokenizer import load_tokenizer, load_tokens
from .torch_generate import generate_text
from .windows import WindowSampler, check_length, validation_loss

log = logging.getLogger("openllm.train")

class TrainingError(OpenLLMError):
    """Training cannot go on (bad data, non-finite loss, ...)."""


# --- state ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """Counters a resumed run restores besides weights, optimizer, data position and RNG."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_in_row: int = 0
    last_train_loss: float = math.nan
    last_val_loss: float = math.nan


class TrainingState:
    """Everything besides the weights that a resumed run needs, saved and restored as one."""

    def __init__(self, optimizer, sampler: WindowSampler, ema: WeightAverage | None = None):
        self.optimizer, self.sampler, self.progress, self.ema = optimizer, sampler, Progress(), ema

    def state_dict(self) -> dict[str, Any]:
        state = {"progress": asdict(self.progress), "optimizer": self.optimizer.state_dict(),
                 "sampler": self.sampler.generator.get_state(), "rng": _capture_rng(),
                 "threads": torch.get_num_threads()}
        return state | ({"ema": self.ema.state_dict()} if self.ema is not None else {})

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.progress = Progress(**saved["progress"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.sampler.generator.set_state(saved["sampler"])
        _restore_rng(saved["rng"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        if saved["threads"] != torch.get_num_threads():
            log.warning("resuming with %d threads, the state was saved with %d: results may differ "
                        "in the last bits", torch.get_num_threads(), saved["threads"])


def _capture_rng() -> dict[str, Any]:
    # Only PyTorch's generator: training draws from it (and from the sampler's own generator)
    # alone. Python's and NumPy's global generators are left out on purpose: libraries such as
    # MLflow draw from them, so saving them would make the state depend on what was logged.
    return {"torch": torch.get_rng_state()}


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])


# --- one step ------------------------------------------------------------------------------


def train_step(forward_model: torch.nn.Module, model: torch.nn.Module, optimizer,
               micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float, grad_clip: float,
               setup: DeviceSetup) -> tuple[float, float]:
    """One optimizer update over gradient-accumulated micro-batches: ``(loss, grad_norm)``.

    A non-finite loss skips the update (gradients dropped) and gives ``grad_norm`` NaN.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=setup.device)
    for index, (x, y) in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = getattr(forward_model, "no_sync", None) if setup.world_size > 1 and not last else None
        with (sync() if sync else contextlib.nullcontext()), setup.autocast():
            logits, _ = forward_model(x, use_cache=False)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            (loss / len(micro_batches)).backward()
        loss_sum += loss.detach() / len(micro_batches)
    if setup.world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    loss_value = loss_sum.item()
    grad_norm = math.nan
    if math.isfinite(loss_value):
        max_norm = grad_clip if grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


# --- the run -------------------------------------------------------------------------------------


def train(params: Params, tokenized_dir: Path, checkpoints_dir: Path, metrics_dir: Path,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; return a summary (``metrics/train.json`` plus timings)."""
    trainer = Trainer(params, tokenized_dir, checkpoints_dir, metrics_dir)
    return trainer.fit(progress)


class Trainer:
    """Setup (``__init__``: everything checkable, before any file is touched) and ``fit``."""

    def __init__(self, params: Params, tokenized_dir: Path, checkpoints_dir: Path, metrics_dir: Path):
        self.params, self.cfg = params, params.train
        self.checkpoints_dir, self.metrics_dir = Path(checkpoints_dir), Path(metrics_dir)
        self.tokenized_dir = Path(tokenized_dir)
        meta_path = self.tokenized_dir / "meta.json"
        if not meta_path.is_file():
            raise TrainingError(f"{meta_path} not found: run the tokenize stage first")
        self.data_meta = read_json(meta_path)
        self.model_config = GPTConfig(vocab_size=self.data_meta["vocab_size"], rope_theta=params.model.rope_theta,
                                      qk_norm=params.model.qk_norm, logit_softcap=params.model.logit_softcap,
                                      mlp=params.model.mlp, value_embeds=params.model.value_embeds,
                                      **params.model.resolved())
        self.context = self.model_config.context_length
        self.train_tokens = load_tokens(tokenized_dir, "train")
        self.val_tokens = load_tokens(tokenized_dir, "val")
        check_length(self.train_tokens, self.context, "training")
        check_length(self.val_tokens, self.context, "validation")
        self.tokenizer_path = Path(tokenized_dir) / self.data_meta["tokenizer"]
        cfg = self.cfg
        self.setup = resolve_device(cfg.device, cfg.precision, cfg.compile, cfg.deterministic)
        self.micro_batch, remainder = divmod(cfg.batch_size, self.setup.world_size * cfg.gradient_accumulation_steps)
        if remainder or self.micro_batch == 0:
            raise TrainingError(
                f"train.batch_size={cfg.batch_size} must be a multiple of processes ({self.setup.world_size}) "
                f"x train.gradient_accumulation_steps ({cfg.gradient_accumulation_steps})")
        self.schedule = Schedule.from_config(cfg)
        self.key = resume_key(params, self.data_meta, self.setup.world_size)
        self.plan = ResumePlan(set(), None)
        if self.setup.is_main:
            self.plan = plan_resume(self.checkpoints_dir, self.key, self.schedule, cfg.checkpoint_steps)
        self._share_plan()
        self._build()

    def _share_plan(self) -> None:
        if self.setup.world_size > 1:  # every rank resumes from the folder rank 0 chose
            shared = [str(self.plan.resume_from) if self.plan.resume_from else None]
            dist.broadcast_object_list(shared, src=0)
            self.plan.resume_from = Path(shared[0]) if shared[0] else None

    def _build(self) -> None:
        cfg, setup = self.cfg, self.setup
        torch.manual_seed(cfg.seed)
        self.sampler = WindowSampler(self.train_tokens, self.context, cfg.seed, cfg.window_start)
        resume_from = self.plan.resume_from
        if resume_from is not None:
            self.model = ckpt.load_model(resume_from, setup.device, verify=False)
        else:
            self.model = GPT(self.model_config).to(setup.device)
        self.model.train()
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        optimizer = build_optimizer(self.model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay,
                                    (cfg.beta1, cfg.beta2))
        ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.state = TrainingState(optimizer, self.sampler, ema)
        if resume_from is not None:
            self.state.load_state_dict(ckpt.load_training_state(resume_from))
            log.info("resuming from %s (step %d)", resume_from, self.state.progress.step)
        self.forward_model: torch.nn.Module = self.model
        if setup.world_size > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None)

    # --- saving and evaluating

    def save(self, folder: Path, early_stopped: bool = False) -> None:
        p = self.state.progress
        meta = ckpt.CheckpointMeta(
            step=p.step, tokens_seen=p.tokens_seen, train_loss=p.last_train_loss, val_loss=p.last_val_loss,
            parameters=self.model.num_parameters(), params_sha256=weights_params_hash(self.params),
            resume_key=self.key, learning_rates_sha256=self.schedule.digest(p.step),
            data_sha256=self.data_meta["train"]["sha256"], code_sha256=TRAIN_CODE_SHA256,
            tokenizer_sha256=self.data_meta["tokenizer_sha256"],
            bytes_per_token_val=self.data_meta["bytes_per_token"]["val"], threads=torch.get_num_threads(),
            world_size=self.setup.world_size, precision=self.setup.precision_name, compiled=self.setup.compile,
            early_stopped=early_stopped)
        state = self.state.state_dict()  # before the average stands in: it holds the live weights
        with self._averaged():
            ckpt.save_checkpoint(folder, self.model, self.tokenizer_path, meta, state, replace=True)

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The weight average in the model (``train.ema_decay``), else the weights as trained."""
        return self.state.ema.applied() if self.state.ema is not None else contextlib.nullcontext()

    def evaluate(self, logger: RunLogger) -> None:
        """Validation loss on fixed windows (the same whatever the process count) and samples."""
        cfg, p = self.cfg, self.state.progress
        batches = cfg.eval_batches * self.setup.world_size * cfg.gradient_accumulation_steps
        with self._averaged():
            p.last_val_loss = validation_loss(self.model, self.val_tokens, self.context, batches, self.micro_batch,
                                              self.setup)
            samples = self._samples() if logger.enabled else None
        improved = p.last_val_loss < p.best_val_loss - 1e-4
        p.best_val_loss = min(p.best_val_loss, p.last_val_loss)
        p.evals_without_improvement = 0 if improved else p.evals_without_improvement + 1
        if logger.enabled:
            logger.evaluation(p.step, p.last_val_loss, samples)

    def _samples(self) -> str | None:
        if self.cfg.sample_tokens == 0:
            return None
        settings = self.params.evaluate.sampling.replace(max_new_tokens=self.cfg.sample_tokens)
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.model.eval()
        text = "\n\n".join(f"### {prompt!r}\n\n{prompt}{generate_text(self.model, tokenizer, prompt, settings)}"
                           for prompt in self.params.evaluate.prompts)
        self.model.train()
        return text

    # --- the loop

    def fit(self, progress: bool = True) -> dict[str, Any]:
        cfg, setup = self.cfg, self.setup
        started = time.perf_counter()  # the training time includes compiling
        if setup.compile:
            x, _ = self.sampler.batch(torch.zeros(self.micro_batch, dtype=torch.long), setup.device)
            eager = self.forward_model
            self.forward_model = compile_model(eager, x, setup, required=cfg.compile == "true")
            setup.compile = self.forward_model is not eager  # False when auto fell back to eager
        logger = RunLogger(setup.is_main, self.metrics_dir, self.checkpoints_dir, self.state.progress.step)
        if setup.is_main:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        logger.start(self.params.mlflow.experiment, self.plan.resume_from is not None,
                     tracking.run_name(self.params.model.preset, cfg.max_steps),
                     tracking.flatten(self.params.model_dump(include={"data", "tokenizer", "model", "train"})),
                     self._tags(), self.tokenized_dir, self.data_meta)
        stop_signal: list[int] = []
        handlers = {s: signal.signal(s, lambda sig, _: stop_signal.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
        tokens_at_start = self.state.progress.tokens_seen
        try:
            early_stopped = self._loop(logger, stop_signal, progress)
            seconds = time.perf_counter() - started
            summary = self._finish(early_stopped)
            timings = {"train_wall_seconds": seconds,
                       "train_tokens_per_second": (self.state.progress.tokens_seen - tokens_at_start) / seconds}
            logger.metrics(timings)  # timings differ between runs: MLflow, not metrics/train.json
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            logger.end(interrupted=bool(stop_signal))
        return summary | timings

    def _loop(self, logger: RunLogger, stop_signal: list[int], progress: bool) -> bool:
        from tqdm import tqdm

        cfg, setup, p = self.cfg, self.setup, self.state.progress
        patience = cfg.early_stopping_patience
        early_stopped = patience > 0 and p.evals_without_improvement >= patience  # resumed after stopping
        tokens_per_step = cfg.batch_size * self.context
        bar = tqdm(total=cfg.max_steps, initial=p.step, desc="train", unit="step",
                   disable=not (progress and setup.is_main))
        with bar:
            while p.step < cfg.max_steps and not early_stopped:
                step_started = time.perf_counter()
                lr = self.schedule.lr(p.step)
                starts = self.sampler.next_starts(cfg.batch_size)[setup.rank :: setup.world_size]
                batches = [self.sampler.batch(chunk, setup.device) for chunk in starts.split(self.micro_batch)]
                loss, grad_norm = train_step(self.forward_model, self.model, self.state.optimizer, batches, lr,
                                             cfg.grad_clip, setup)
                p.step += 1
                p.tokens_seen += tokens_per_step
                self._check_finite(loss)
                if self.state.ema is not None and math.isfinite(loss):
                    self.state.ema.update(p.step)
                tokens_per_second = tokens_per_step / (time.perf_counter() - step_started)
                logger.step(p.step, loss, lr, grad_norm, p.tokens_seen, tokens_per_second, p.step == cfg.max_steps)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
                bar.update(1)
                if bar.disable and setup.is_main and p.step % math.ceil(cfg.max_steps / 20) == 0:  # 20 lines
                    log.info("step %d/%d: loss %.3f, %.0f tokens/s", p.step, cfg.max_steps, loss, tokens_per_second)
                is_checkpoint = p.step in cfg.checkpoint_steps
                if is_checkpoint or p.step % cfg.eval_interval == 0:
                    self.evaluate(logger)
                early_stopped = patience > 0 and p.evals_without_improvement >= patience
                stop = self._any_rank_stopped(stop_signal)
                if setup.is_main:
                    self._save_due(is_checkpoint, stop)
                if stop:
                    raise TrainingInterrupted(f"stopped by signal at step {p.step}; the state is saved, rerun to resume")
        if early_stopped:
            log.warning("early stopping at step %d: validation loss has not improved for %d evaluations",
                        p.step, patience)
        return early_stopped

    def _check_finite(self, loss: float) -> None:
        p = self.state.progress
        if math.isfinite(loss):
            p.nonfinite_in_row, p.last_train_loss = 0, loss
            return
        p.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss (%s), batch skipped", p.step, loss)
        if p.nonfinite_in_row > self.cfg.max_nonfinite_batches:
            raise TrainingError(
                f"non-finite loss at step {p.step} ({p.nonfinite_in_row} in a row; train.max_nonfinite_batches="
                f"{self.cfg.max_nonfinite_batches}); the last good checkpoint in {self.checkpoints_dir} is kept. "
                "Try a lower train.learning_rate.")

    def _any_rank_stopped(self, stop_signal: list[int]) -> bool:
        stop = torch.tensor([len(stop_signal)], device=self.setup.device)
        if self.setup.world_size > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    def _save_due(self, is_checkpoint: bool, stop: bool) -> None:
        step = self.state.progress.step
        if is_checkpoint and step not in self.plan.kept_steps:
            self.save(step_folder(self.checkpoints_dir, step))
        if step == self.schedule.decay_start and self.schedule.kind == "wsd" and step < self.cfg.max_steps:
            self.save(self.checkpoints_dir / ckpt.DECAY_START)
        if step % self.cfg.resume_interval == 0 or stop:
            self.save(self.checkpoints_dir / ckpt.RESUME)

    def _finish(self, early_stopped: bool) -> dict[str, Any]:
        cfg, p = self.cfg, self.state.progress
        summary = {
            "steps": p.step, "tokens_seen": p.tokens_seen, "train_loss": p.last_train_loss,
            "val_loss": p.last_val_loss, "best_val_loss": p.best_val_loss,
            "parameters": self.model.num_parameters(), "flops_per_token": self.model.estimate_flops_per_token(),
            "train_flops": self.model.estimate_flops_per_token() * p.tokens_seen, "early_stopped": early_stopped,
            "schedule": cfg.schedule, "optimizer": cfg.optimizer, "device": str(self.setup.device),
            "precision": self.setup.precision_name, "compiled": self.setup.compile,
            "world_size": self.setup.world_size, "machine": fingerprint(),
        }
        if self.setup.is_main:
            for step in cfg.checkpoint_steps:  # after early stopping, later steps hold the final weights
                folder = step_folder(self.checkpoints_dir, step)
                if step > p.step and step not in self.plan.kept_steps:
                    self.save(folder, early_stopped=True)
            tidy_checkpoints(self.checkpoints_dir, cfg.checkpoint_steps, self.schedule)
            write_json(self.metrics_dir / TRAIN_SUMMARY, summary)
        if self.setup.world_size > 1:
            dist.barrier()
        return summary

    def _tags(self) -> dict[str, str]:
        return {"data_sha256": self.data_meta["train"]["sha256"], "tokenizer_sha256": self.data_meta["tokenizer_sha256"],
                "parameters": str(self.model.num_parameters()), "device": str(self.setup.device),
                "precision": self.setup.precision_name, "world_size": str(self.setup.world_size),
                "resume_key": self.key}
