"""Text generation with a PyTorch model and its KV cache (training samples, evaluation).

Token choice goes through :func:`openllm.sampling.sample_next`, the same sampler that the
onnxruntime generator uses, so a seed means the same thing everywhere.
"""

from __future__ import annotations

import numpy as np
import sentencepiece as spm
import torch

from .model import GPT
from .sampling import Sampling, sample_next


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], sampling: Sampling, eos_id: int | None = None) -> list[int]:
    """New token ids after ``prompt_ids`` (prefill once, then one token per step)."""
    device = next(model.parameters()).device
    context = model.config.context_length
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    prompt_ids = prompt_ids[-(context - 1):]  # keep the end of an over-long prompt
    budget = min(sampling.max_new_tokens, context - len(prompt_ids))
    rng = np.random.default_rng(sampling.seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits, past = model(ids)
    new: list[int] = []
    for _ in range(budget):
        token = int(sample_next(logits[:, -1].float().cpu().numpy(), sampling, rng)[0])
        if token == eos_id:
            break
        new.append(token)
        logits, past = model(torch.tensor([[token]], device=device), past_key_values=past)
    return new


def generate_text(model: GPT, tokenizer: spm.SentencePieceProcessor, prompt: str, sampling: Sampling) -> str:
    """The continuation of ``prompt`` as text."""
    ids = generate_ids(model, tokenizer.encode(prompt), sampling, eos_id=tokenizer.eos_id())
    return tokenizer.decode(ids)
