"""A real tiny checkpoint and its export, for tests/test_export.py and tests/test_runtime.py.

Built directly (no training run): a SentencePiece model trained on a slice of a play plus the
awkward texts of helpers.TINY_DOCS, and a randomly initialised 2-layer GPT. The builders skip
work already done, so the test files share one build per session.
"""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import TINY_DOCS
from openllm.checkpoint import CheckpointMeta, save_checkpoint
from openllm.paths import step_folder
from openllm.config import ExportConfig, TokenizerConfig
from openllm.sampling import Sampling
from openllm.data import shakespeare_documents
from openllm.export import export_checkpoint
from openllm.fileio import sha256_file
from openllm.model import GPT, GPTConfig
from openllm.tokenizer import load_tokenizer, train_tokenizer

CONTEXT = 128  # room for a prompt plus 64 new tokens


def build_tokenizer(root: Path) -> Path:
    path = root / "tokenizer.model"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        plays, _ = shakespeare_documents()
        docs = [plays[0][1][:40_000], *TINY_DOCS.values()]
        train_tokenizer(docs, TokenizerConfig(vocab_size=400), path)
    return path


def build_checkpoint(checkpoints_dir: Path, step: int = 10, val_loss: float = 5.0, seed: int = 0) -> Path:
    """``checkpoints_dir/step-<step>``: a random tiny GPT saved like a training checkpoint."""
    folder = step_folder(checkpoints_dir, step)
    if folder.is_dir():
        return folder
    tokenizer_path = build_tokenizer(checkpoints_dir.parent / "tokenizer")
    vocab = load_tokenizer(tokenizer_path).vocab_size()
    torch.manual_seed(seed)
    shape = dict(context_length=CONTEXT, n_layer=2, n_head=4, n_embd=32, intermediate_size=64)
    model = GPT(GPTConfig(vocab_size=vocab, **shape))
    meta = CheckpointMeta(
        step=step, tokens_seen=step * 1024, train_loss=val_loss, val_loss=val_loss,
        parameters=model.num_parameters(), params_sha256="0" * 64, resume_key="test", learning_rates_sha256="0" * 64,
        data_sha256="0" * 64, tokenizer_sha256=sha256_file(tokenizer_path), bytes_per_token_val=3.0,
        threads=1, world_size=1, precision="fp32", compiled=False,
    )
    return save_checkpoint(folder, model, tokenizer_path, meta=meta)


def build_export(root: Path, **export_options: bool) -> Path:
    """An export folder of the step-10 checkpoint (no MLflow registration)."""
    options = {"quantize": True, "huggingface": True, **export_options, "register_model": False}
    name = "export-" + "-".join(k for k, v in sorted(options.items()) if v)
    out = root / name / "step-10"
    if not out.is_dir():
        checkpoint = build_checkpoint(root / "checkpoints")
        export_checkpoint(checkpoint, out, ExportConfig(**options), Sampling(), None)
    return out
