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
    return [(length, starts) for length, _, starts in sliding_windows(n_tokens, context, context, batch_size)]


def sliding_windows(n_tokens: int, context: int, stride: int, batch_size: int) -> list[tuple[int, int, list[int]]]:
    """Overlapping windows: ``[(length, skip, [start, ...]), ...]``, a window every ``stride`` tokens.

    Window ``s`` reads ``tokens[s : s + length]`` and scores its predictions after the first
    ``skip`` (those the window before already scored), so every token but the first is still
    predicted exactly once, but with at least ``context - stride`` tokens before it (fewer only at
    the start of the text). ``stride == context`` gives :func:`score_windows`' windows.
    """
    if n_tokens < 2:
        raise ValueError("need at least 2 tokens to score (the first one has no context)")
    if not 0 < stride <= context:
        raise ValueError(f"the stride must be from 1 to the context ({context}), not {stride}")
    groups: dict[tuple[int, int], list[int]] = {}
    scored, start = 0, 0  # tokens[1 : scored + 1] are scored
    while scored < n_tokens - 1:
        length = min(context, n_tokens - 1 - start)
        groups.setdefault((length, scored - start), []).append(start)
        scored, start = start + length, start + stride
    return [(length, skip, starts[i : i + batch_size])
            for (length, skip), starts in groups.items() for i in range(0, len(starts), batch_size)]


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
