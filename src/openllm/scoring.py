"""How a text is scored: the windows a token sequence is cut into, and the figures from totals.

Shared by the evaluate stage (PyTorch) and the runtime (onnxruntime), so both compute the same
numbers the same way. No torch import here.

- loss: mean cross-entropy in nats per predicted token;
- perplexity: exp(loss);
- bits per byte: total nats / (ln 2 × UTF-8 bytes of the text). Unlike the loss it does not
  depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import math


def score_windows(n_tokens: int, context: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """Batches of window starts, each with its length: ``[(length, [start, ...]), ...]``.

    The sequence is cut into consecutive windows of ``context`` tokens; window ``s`` predicts
    ``tokens[s + 1 : s + length + 1]`` from ``tokens[s : s + length]``, so every token but the
    first is predicted exactly once. Full windows are batched; the shorter last one is alone.
    """
    if n_tokens < 2:
        raise ValueError("need at least 2 tokens to score (the first one has no context)")
    starts = range(0, n_tokens - 1, context)
    full = [s for s in starts if s + context + 1 <= n_tokens]
    batches = [(context, full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [(n_tokens - 1 - s, [s]) for s in starts if s + context + 1 > n_tokens]
    return batches


def language_metrics(total_nats: float, tokens: int, text_bytes: int) -> dict[str, float]:
    """Loss, perplexity and bits per byte from totals (the one place these formulas live)."""
    loss = total_nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total_nats / (math.log(2) * text_bytes),
        "tokens": tokens,
        "bytes": text_bytes,
    }
