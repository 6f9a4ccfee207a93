"""Training batches and the quick validation loss: windows of ``context + 1`` tokens.

Training draws random windows with its own generator, whose state is the data position (saved
with every resumable state). The validation loss uses fixed, evenly spaced windows, so every
evaluation during training scores the same text.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .device import DeviceSetup
from .errors import OpenLLMError
from .tokenizer import EOS_ID


class DataTooShortError(OpenLLMError):
    """A split has fewer tokens than one window needs."""


def check_length(tokens: np.ndarray, context: int, split: str) -> None:
    if len(tokens) <= context + 1:
        raise DataTooShortError(
            f"the {split} split has {len(tokens):,} tokens, fewer than model.context_length+1="
            f"{context + 1:,}: use more data or a shorter context")


class WindowSampler:
    """Draws random windows of ``context + 1`` tokens; its generator state is the data position.

    ``start="random"`` lets a window start at any token; ``start="document"`` only at the first
    token of a document: position 0 and every position after the end-of-text id the tokenizer
    appends to each document (``train.window_start``).
    """

    def __init__(self, tokens: np.ndarray, context: int, seed: int, start: str = "random"):
        check_length(tokens, context, "training")
        self.tokens, self.context = tokens, context
        self.generator = torch.Generator().manual_seed(seed)
        self.document_starts = document_starts(tokens, context) if start == "document" else None

    def next_starts(self, batch: int) -> torch.Tensor:
        if self.document_starts is not None:
            picks = torch.randint(0, len(self.document_starts), (batch,), generator=self.generator)
            return self.document_starts[picks]
        return torch.randint(0, len(self.tokens) - self.context - 1, (batch,), generator=self.generator)

    def batch(self, starts: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each ``(B, T)``."""
        return window_batch(self.tokens, self.context, starts, device)


def document_starts(tokens: np.ndarray, context: int) -> torch.Tensor:
    """Positions that begin a document and leave room for a whole window after them."""
    last = len(tokens) - context - 1  # the random sampler's bound: starts in [0, last)
    starts = np.concatenate(([0], np.flatnonzero(np.asarray(tokens[:last]) == EOS_ID) + 1))
    return torch.from_numpy(starts[starts < last].astype(np.int64))  # never empty: check_length left 0


def window_batch(tokens: np.ndarray, context: int, starts: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([tokens[s : s + context + 1] for s in starts.tolist()])
    windows = torch.from_numpy(windows.astype(np.int64)).to(device)
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: np.ndarray, context: int, batches: int, batch_size: int,
                    setup: DeviceSetup) -> float:
    """Mean loss (nats/token) over fixed, evenly spaced validation windows."""
    check_length(tokens, context, "validation")
    count = batches * batch_size
    starts = torch.from_numpy(np.linspace(0, len(tokens) - context - 1, count).astype(np.int64))
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size):
        x, y = window_batch(tokens, context, chunk, setup.device)
        with setup.autocast():
            logits, _ = model(x, use_cache=False)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (count * context)
