"""The model the generation benchmarks time: a random preset, saved as a checkpoint and exported.

Speed does not depend on the weights' values, so a random model of the preset stands in for a
trained one; the tokenizer (4,096 pieces) is trained on a slice of the built-in Shakespeare text.
The export is :func:`openllm.export.export_checkpoint`'s, so the ONNX files are the ones users get
and their outputs are checked against PyTorch first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from openllm.checkpoint import CheckpointMeta, save_checkpoint
from openllm.config import MODEL_PRESETS, ExportConfig, TokenizerConfig
from openllm.data import shakespeare_documents
from openllm.export import export_checkpoint
from openllm.fileio import sha256_file
from openllm.model import GPT, GPTConfig
from openllm.sampling import Sampling
from openllm.tokenizer import train_tokenizer

VOCAB = 4096


def random_export(workdir: Path, preset: str) -> tuple[GPT, Path]:
    """A random model of ``preset`` (seed 0) and its export folder: fp32, int8 and the
    onnxruntime-genai configs (bench/genai.py runs them). A tokenizer already in ``workdir`` is reused."""
    tokenizer = workdir / "tokenizer.model"
    if not tokenizer.is_file():
        plays, _ = shakespeare_documents()
        train_tokenizer([text for _, text in plays[:6]], TokenizerConfig(vocab_size=VOCAB), tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, **MODEL_PRESETS[preset])).eval()
    meta = CheckpointMeta(step=0, parameters=model.num_parameters(), tokenizer_sha256=sha256_file(tokenizer))
    checkpoint = save_checkpoint(workdir / "checkpoints" / "step-0", model, tokenizer, meta=meta, replace=True)
    out = workdir / "export" / "step-0"
    config = ExportConfig(quantize=True, genai=True, huggingface=False, register_model=False)
    export_checkpoint(checkpoint, out, config, Sampling(), None)
    return model, out
