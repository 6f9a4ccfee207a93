"""Which saved training states a run may keep, and which folders go when it ends.

A state (a step checkpoint, the rolling ``resume`` state, the ``decay-start`` state) is reused
only when this run would have produced exactly the same bytes: the run that made it shares the
resume key (the settings that shape the weights, the data, the tokenizer, the process count)
and gave every update before it the same learning rate (:meth:`Schedule.digest`). Everything
else is trained again; nothing is deleted before the new run has replaced it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .paths import step_folder
from .closure import code_sha256
from .config import Params
from .schedule import Schedule

log = logging.getLogger("openllm.train")
TRAIN_CODE_SHA256 = code_sha256("openllm.stages.train")  # the files dvc.yaml lists for train

# Settings that do not change the weights a step produces: a state made under other values
# of these is still reused (the schedule is compared step by step instead).
NOT_IN_RESUME_KEY = (
    "train.max_steps", "train.checkpoint_steps", "train.eval_interval", "train.early_stopping_patience",
    "train.resume_interval", "train.sample_tokens", "train.max_nonfinite_batches", "train.schedule",
    "train.learning_rate", "train.min_learning_rate", "train.warmup_steps", "train.decay_fraction",
)



def weights_params_hash(params: Params) -> str:
    """sha256 of the model and train settings that shape the weights a step produces."""
    return params.section_hash("model", "train", exclude=NOT_IN_RESUME_KEY)


def resume_key(params: Params, data_meta: dict[str, Any], world_size: int) -> str:
    """What a saved state must share with this run to be continued (the schedule is compared apart):
    the settings, the data, the tokenizer, the process count and the code the train stage runs."""
    key = weights_params_hash(params)
    return (f"{key}:{data_meta['train']['sha256']}:{data_meta['tokenizer_sha256']}:world{world_size}:"
            f"code{TRAIN_CODE_SHA256[:16]}")


def reusable(folder: Path, key: str, schedule: Schedule) -> ckpt.CheckpointMeta | None:
    """The folder's meta when this run would have produced the same state, else None."""
    if not folder.is_dir():
        return None
    try:
        ckpt.verify_checkpoint(folder)
        meta = ckpt.CheckpointMeta.read(folder)
    except (ckpt.CheckpointError, OSError, ValueError) as exc:
        log.warning("not reusing %s", exc)
        return None
    if meta.resume_key != key or meta.step > schedule.max_steps:
        return None
    return meta if meta.learning_rates_sha256 == schedule.digest(meta.step) else None


@dataclass
class ResumePlan:
    kept_steps: set[int]  # checkpoint steps whose folders this run would write the same
    resume_from: Path | None  # the latest reusable state no later than the first missing step


def plan_resume(checkpoints_dir: Path, key: str, schedule: Schedule, steps: list[int]) -> ResumePlan:
    kept = {s for s in steps if reusable(step_folder(checkpoints_dir, s), key, schedule)}
    missing = [s for s in steps if s not in kept]
    limit = missing[0] if missing else schedule.max_steps
    best: tuple[int, Path] | None = None
    folders = [step_folder(checkpoints_dir, s) for s in sorted(kept)]
    for folder in folders + [checkpoints_dir / ckpt.RESUME, checkpoints_dir / ckpt.DECAY_START]:
        meta = reusable(folder, key, schedule) if (folder / ckpt.STATE_JSON).is_file() else None
        if meta and meta.step <= limit and (best is None or meta.step > best[0]):
            best = (meta.step, folder)
    if best is None and any(checkpoints_dir.glob("*/" + ckpt.META)):
        log.warning("no state in %s matches these params and data: training from scratch (the old folders "
                    "stay until this run replaces them)", checkpoints_dir)
    return ResumePlan(kept, best[1] if best else None)


def tidy_checkpoints(checkpoints_dir: Path, steps: list[int], schedule: Schedule) -> None:
    """After a finished run: drop the rolling state and every folder the params do not list."""
    keep = {step_folder(checkpoints_dir, s).name for s in steps}
    if schedule.kind == "wsd" and 0 < schedule.decay_start < schedule.max_steps:
        keep.add(ckpt.DECAY_START)
    for path in checkpoints_dir.iterdir():
        if path.is_dir() and path.name not in keep:
            log.info("removing %s (%s)", path, "the rolling state of a finished run" if path.name == ckpt.RESUME
                     else "not listed in train.checkpoint_steps")
            shutil.rmtree(path)
