"""Text generation with a PyTorch model (training samples, evaluation, the export check).

A small adapter turns :class:`openllm.model.GPT` into the ``forward(ids, mask, positions,
past)`` function of :mod:`openllm.decode`, so PyTorch runs the same decode loop and sampler as
onnxruntime and the server: a seed means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sentencepiece as spm
import torch

from .decode import DecodeBatch, Forward, Row
from .model import GPT
from .sampling import Sampling


def torch_forward(model: GPT) -> Forward:
    """``model`` as a decode-loop ``forward``: numpy in, numpy logits out, the cache kept as tensors."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def forward(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        pairs = None if past is None else list(zip(past[0::2], past[1::2]))  # flat list -> per-layer (k, v)
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (ids, positions, mask)]
        logits, present = model(tensors[0], pairs, tensors[1], tensors[2])
        return logits.float().cpu().numpy(), [t for pair in present for t in pair]

    return forward


def generate_ids(model: GPT, prompt_ids: list[int], sampling: Sampling, eos_id: int | None = None) -> list[int]:
    """New token ids after ``prompt_ids`` (an over-long prompt keeps its end)."""
    context = model.config.context_length
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    row = Row(list(prompt_ids[-(context - 1):]), sampling)
    DecodeBatch(torch_forward(model), context, eos_id).run([row])
    return row.tokens


def generate_text(model: GPT, tokenizer: spm.SentencePieceProcessor, prompt: str, sampling: Sampling) -> str:
    """The continuation of ``prompt`` as text."""
    ids = generate_ids(model, tokenizer.encode(prompt), sampling, eos_id=tokenizer.eos_id())
    return tokenizer.decode(ids)
