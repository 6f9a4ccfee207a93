"""Choosing the next token from logits: the one sampler every generator uses.

Plain numpy, so the ONNX runtime, the app and the server use it without importing torch;
the PyTorch paths (training samples, evaluation) call it on ``logits.numpy()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError


# The bounds of every sampling setting live in Sampling's fields, here only: params.yaml's
# evaluate.sampling (openllm.config) is a Sampling, and the app's controls, the runtime and the
# server check against it. The HTTP server takes OpenAI's narrower temperature range (0 to 2).
MAX_TEMPERATURE = 5.0
MAX_NEW_TOKENS = 4096


class Sampling(BaseModel):
    """How to pick tokens: params.yaml's ``evaluate.sampling``, an export's defaults, a request's.

    Immutable and validated: a bad value raises pydantic's ``ValidationError`` (a ValueError;
    :func:`one_line` words it for people). :meth:`replace` gives a changed copy, validated too.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.8, ge=0, le=MAX_TEMPERATURE, description="0 = greedy")
    top_k: int = Field(50, ge=0, description="0 = off")
    top_p: float = Field(0.95, gt=0, le=1, description="1 = off")
    max_new_tokens: int = Field(64, gt=0, le=MAX_NEW_TOKENS, description="tokens generated per prompt")
    seed: int | None = Field(0, ge=0, description="same seed, same text (null: a fresh draw each time)")

    def replace(self, **changes: Any) -> "Sampling":
        """A copy with ``changes`` applied, validated like a new one."""
        return Sampling(**{**self.model_dump(), **changes})


def one_line(exc: ValidationError) -> str:
    """``field=value: what is wrong`` for each error of a Sampling's ``exc``, joined by '; '."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}={e['input']!r}: {e['msg']}" for e in exc.errors())


def sample_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Pick one token id per row of ``logits`` (B, V); returns int64 (B,)."""
    if sampling.temperature == 0:
        return np.asarray(logits).argmax(axis=-1).astype(np.int64)
    probs = token_probabilities(logits, sampling)
    return draw(probs, rng.random((probs.shape[0], 1)))


def token_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution each row of ``logits`` (B, V) is sampled from: temperature, top-k, top-p.

    Rows are independent, so rows with the same settings are computed together (the server's
    batch) and get the same values as one at a time. ``sampling.temperature`` must be > 0.
    """
    logits = np.asarray(logits, dtype=np.float64) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        # Everything below the k-th largest logit of each row is dropped.
        kth = np.partition(logits, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        sorted_probs = np.where(mass_before < sampling.top_p, sorted_probs, 0.0)
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_probs, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def draw(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw: the token of each row of ``probs`` (B, V) where its cumulative mass
    passes that row's uniform number in ``uniforms`` (B, 1); int64 (B,)."""
    ids = (np.cumsum(probs, axis=-1) < uniforms).sum(axis=-1)
    return np.minimum(ids, probs.shape[-1] - 1).astype(np.int64)
