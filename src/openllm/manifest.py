"""The export manifest: ``config.json`` of an export folder, as a typed record.

Written by the export stage (:mod:`openllm.export`), read by the runtime, the server and the
app, so each of them knows a model's shape, files, checksums, default sampling and the
checkpoint's evaluation figures from one file. No PyTorch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OpenLLMError
from .fileio import read_json, write_json

MANIFEST_FILE = "config.json"
FORMAT = "openllm-onnx/1"
# Figures of the evaluate stage copied into the manifest (metrics/evaluate/step-N.json).
EVALUATION_KEYS = ("val_loss", "val_perplexity", "val_bits_per_byte", "val_tokens", "val_bytes",
                   "tokens_seen", "parameters")


class ManifestError(OpenLLMError):
    """An export folder's config.json is missing, unreadable or incomplete."""


@dataclass(frozen=True)
class ExportManifest:
    """What an export folder holds and how to run it (the fields of its config.json)."""

    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int
    intermediate_size: int
    context_length: int  # tokens the model attends over
    vocab_size: int
    rope_theta: float
    norm_eps: float
    bos_id: int
    eos_id: int
    unk_id: int
    sampling: dict[str, Any]  # default sampling (params.yaml evaluate.sampling at export time)
    files: dict[str, str | None]  # model, model_int8 (None without int8), tokenizer: paths in the folder
    sha256: dict[str, str]  # file name -> sha256, checked on load
    opset: int
    inputs: list[str]
    outputs: list[str]
    step: int | None = None  # the checkpoint's training step
    val_loss: float | None = None  # the checkpoint's validation loss during training
    checkpoint: dict[str, Any] = field(default_factory=dict)  # folder, meta (training metadata), sha256
    evaluation: dict[str, float] = field(default_factory=dict)  # the evaluate stage's figures, if it ran
    format: str = FORMAT

    def figures(self) -> dict[str, Any]:
        """Step, training metadata and evaluation figures merged (evaluation wins)."""
        meta = self.checkpoint.get("meta", {})
        return {**meta, "step": self.step, "val_loss": self.val_loss, "context_length": self.context_length,
                **self.evaluation}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_FILE) -> ExportManifest:
        """Validate a parsed config.json; ``source`` names it in errors."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{source}: not an OpenLLM export config (expected format {FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [key for key in required if key not in data]
        if missing:
            raise ManifestError(f"{source}: missing key(s) {missing}")
        if not isinstance(data["sampling"], dict) or not isinstance(data["files"], dict):
            raise ManifestError(f"{source}: 'sampling' and 'files' must be objects")
        return cls(**{k: v for k, v in data.items() if k in names})


def read_manifest(folder: Path, path: Path | None = None) -> ExportManifest:
    """The manifest of the export ``folder`` (or of the file ``path`` when given)."""
    path = Path(path or Path(folder) / MANIFEST_FILE)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise ManifestError(f"{path.parent}: {MANIFEST_FILE} is missing") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    return ExportManifest.from_dict(data, str(path))
