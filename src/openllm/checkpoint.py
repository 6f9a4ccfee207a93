"""Checkpoint folders: self-contained, written atomically, verified on load, never pickled.

A checkpoint is one folder (``models/checkpoints/step-400``) holding:

- ``model.safetensors`` — the weights (tied embedding stored once);
- ``config.json`` — the :class:`~openllm.model.GPTConfig`;
- ``tokenizer.model`` — the SentencePiece model it was trained with;
- ``meta.json`` — a :class:`CheckpointMeta`: step, tokens seen, losses, hashes of the params,
  data and tokenizer, the learning-rate schedule, thread count, ... (nothing that differs from
  run to run, so two runs leave the same bytes);
- ``training_state.safetensors`` + ``training_state.json`` — optimizer, RNG and data-sampler
  state, so that training resumes exactly (tensors in safetensors, the rest in JSON);
- ``COMPLETE`` — written last: the sha256 of every other file. A folder without it, or whose
  files do not match it, is treated as corrupt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors_into

from .errors import OpenLLMError
from .fileio import atomic_dir, read_json, sha256_file
from .model import GPT, GPTConfig
from .paths import parse_step

WEIGHTS, CONFIG, META, TOKENIZER = "model.safetensors", "config.json", "meta.json", "tokenizer.model"
STATE_TENSORS, STATE_JSON, COMPLETE = "training_state.safetensors", "training_state.json", "COMPLETE"
RESUME = "resume"  # the rolling resumable state while training runs (removed when it ends)
DECAY_START = "decay-start"  # the state where the learning rate starts to decay (see schedule.py)


class CheckpointError(OpenLLMError, ValueError):
    """A checkpoint folder is missing, incomplete or corrupt."""


@dataclass
class CheckpointMeta:
    """What ``meta.json`` records about a checkpoint (typed; written and read only here).

    Training fills every field; the defaults serve checkpoints made by hand (tests, benchmarks).
    """

    step: int  # optimizer updates made
    tokens_seen: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    parameters: int = 0
    params_sha256: str = ""  # the params.yaml settings that shape the weights (train.NOT_IN_RESUME_KEY left out)
    resume_key: str = ""  # what a run must share to continue from this state (train.resume_key)
    learning_rates_sha256: str = ""  # the rates of updates 1..step (Schedule.digest): how it got here
    data_sha256: str = ""
    tokenizer_sha256: str = ""
    code_sha256: str = ""  # the train stage's source files (openllm.closure.code_sha256)
    bytes_per_token_val: float | None = None
    threads: int = 0
    world_size: int = 1
    precision: str = "fp32"
    compiled: bool = False
    early_stopped: bool = False  # a later step's folder holding the weights of an earlier stop

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> "CheckpointMeta":
        data = read_meta(folder)
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise CheckpointError(f"{folder}: {META} lacks a field ({exc})") from None


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
    meta: CheckpointMeta | dict[str, Any],
    training_state: dict[str, Any] | None = None,
    replace: bool = False,
) -> Path:
    """Write a checkpoint folder atomically (temp folder, fsync, ``COMPLETE`` last, rename)."""
    folder = Path(folder)
    meta = meta if isinstance(meta, CheckpointMeta) else CheckpointMeta(**meta)  # a typo is a TypeError
    with atomic_dir(folder, replace=replace) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        (tmp / META).write_text(meta.to_json())
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
    check_shapes(config, folder / WEIGHTS)  # before allocating what a hostile config asks for
    model = GPT(config)
    try:
        load_model_weights(model, folder / WEIGHTS, device)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot load {WEIGHTS} ({exc})") from None
    return model.to(device).eval()


def check_shapes(config: GPTConfig, weights: Path) -> None:
    """Compare the config's tensor shapes (built on the meta device: no memory) with the file's."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights.parent}: cannot load {weights.name} ({exc})") from None
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    # (a tied tensor is stored under one of its names; load_model_weights checks names strictly)
    wrong = sorted(n for n in expected.keys() & found.keys() if expected[n] != found[n])
    if wrong:
        raise CheckpointError(f"{weights.parent}: {weights.name} does not match {CONFIG} ({wrong[0]}: the config needs "
                              f"{expected[wrong[0]]}, the file has {found[wrong[0]]})")


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
            if (step := parse_step(path.name)) is not None:
                found.append((step, path))
    return sorted(found)
