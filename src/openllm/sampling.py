"""Choosing the next token from logits: the one sampler every generator uses.

Plain numpy, so the ONNX runtime, the app and the server use it without importing torch;
the PyTorch paths (training samples, evaluation) call it on ``logits.numpy()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# The bounds of every sampling setting, here only: params.yaml's evaluate.sampling (openllm.config),
# the app's controls and the runtime check against them. The HTTP server takes OpenAI's narrower
# temperature range (0 to 2) at its edge.
MAX_TEMPERATURE = 5.0
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int = 50  # 0 = no top-k cut
    top_p: float = 0.95  # 1 = no nucleus cut
    max_new_tokens: int = 64
    seed: int | None = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature={self.temperature} must be between 0 and {MAX_TEMPERATURE:g}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be a non-negative integer")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not (isinstance(self.max_new_tokens, int) and 0 < self.max_new_tokens <= MAX_NEW_TOKENS):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer from 1 to {MAX_NEW_TOKENS}")


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
