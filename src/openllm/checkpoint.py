"""Checkpoint folders: self-contained, written atomically, verified on load, never pickled.

A checkpoint is one folder (``models/checkpoints/step-400``) holding:

- ``model.safetensors`` — the weights (tied embedding stored once);
- ``config.json`` — the :class:`~openllm.model.GPTConfig`;
- ``tokenizer.model`` — the SentencePiece model it was trained with;
- ``meta.json`` — step, tokens seen, losses, git sha, params hash, thread count, ...;
- ``training_state.safetensors`` + ``training_state.json`` — optimizer, RNG and data-sampler
  state, so that training resumes exactly (tensors in safetensors, the rest in JSON);
- ``COMPLETE`` — written last: the sha256 of every other file. A folder without it, or whose
  files do not match it, is treated as corrupt.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors_into

from .errors import OpenLLMError
from .fileio import atomic_dir, read_json, sha256_file
from .model import GPT, GPTConfig

WEIGHTS, CONFIG, META, TOKENIZER = "model.safetensors", "config.json", "meta.json", "tokenizer.model"
STATE_TENSORS, STATE_JSON, COMPLETE = "training_state.safetensors", "training_state.json", "COMPLETE"
RESUME = "resume"  # the rolling resumable state, replaced as training goes on
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


class CheckpointError(OpenLLMError, ValueError):
    """A checkpoint folder is missing, incomplete or corrupt."""


def step_folder(checkpoints_dir: Path, step: int) -> Path:
    """The folder of the checkpoint kept at ``step`` (names equal DVC's foreach items)."""
    return Path(checkpoints_dir) / f"step-{step}"


# --- nested state <-> (tensors, JSON) -----------------------------------------------------


def _split_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested structure by a reference, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep their type
        return {"__dict__": [[k, _split_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_split_state(v, tensors) for v in obj]
    return obj


def _join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_state(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


# --- saving ---------------------------------------------------------------------------


def save_checkpoint(
    folder: Path,
    model: GPT,
    tokenizer_path: Path,
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
    replace: bool = False,
) -> Path:
    """Write a checkpoint folder atomically (temp folder, fsync, ``COMPLETE`` last, rename)."""
    folder = Path(folder)
    with atomic_dir(folder, replace=replace) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if training_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            structure = _split_state(training_state, tensors)
            save_file(tensors, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(structure))
        checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / COMPLETE).write_text(json.dumps({"sha256": checksums}, indent=2) + "\n")
    return folder


# --- loading --------------------------------------------------------------------------


def verify_checkpoint(folder: Path) -> dict[str, str]:
    """Check that ``folder`` is a complete checkpoint whose files match their sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint not found")
    try:
        checksums = read_json(folder / COMPLETE)["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {COMPLETE} marker)") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{folder}: corrupt {COMPLETE} marker") from None
    for name in (WEIGHTS, CONFIG, TOKENIZER, META):
        if name not in checksums:
            raise CheckpointError(f"{folder}: {name} is missing")
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{folder}: {name} is corrupt (sha256 mismatch)")
    return checksums


def read_meta(folder: Path) -> dict[str, Any]:
    return read_json(Path(folder) / META)


def load_model(folder: Path, device: str | torch.device = "cpu", verify: bool = True) -> GPT:
    """Build the model from ``config.json`` and load its weights (safetensors, no pickle)."""
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    try:
        config = GPTConfig.from_dict(read_json(folder / CONFIG))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: invalid {CONFIG} ({exc})") from None
    model = GPT(config)
    try:
        load_model_weights(model, folder / WEIGHTS, device)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot load {WEIGHTS} ({exc})") from None
    return model.to(device).eval()


def load_model_weights(model: GPT, path: Path, device: str | torch.device = "cpu") -> None:
    missing, unexpected = load_safetensors_into(model, str(path), strict=True, device=str(device))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config ({missing or unexpected})")


def load_training_state(folder: Path) -> dict[str, Any]:
    """The optimizer / RNG / sampler state saved with a checkpoint."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        raise CheckpointError(f"{folder}: has no training state to resume from")
    tensors = load_file(str(folder / STATE_TENSORS))
    return _join_state(json.loads((folder / STATE_JSON).read_text()), tensors)


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-N`` folder, sorted by step (not verified)."""
    found = []
    if Path(checkpoints_dir).is_dir():
        for path in Path(checkpoints_dir).iterdir():
            if match := _STEP_FOLDER.match(path.name):
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_resumable(checkpoints_dir: Path, warn=lambda msg: None) -> Path | None:
    """The newest verified folder (a step checkpoint or the rolling ``resume`` state).

    Corrupt or incomplete folders are skipped with a warning, so training falls back to
    the previous good state.
    """
    candidates = [(step, path) for step, path in list_checkpoints(checkpoints_dir)]
    resume = Path(checkpoints_dir) / RESUME
    if resume.is_dir() and (resume / META).is_file():
        try:
            candidates.append((int(read_meta(resume)["step"]), resume))
        except (ValueError, KeyError, TypeError):
            pass
    for _, path in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping {exc}")
            continue
        if (path / STATE_JSON).is_file():
            return path
    return None
