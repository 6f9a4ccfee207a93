"""An exponential moving average of the weights over training (``train.ema_decay``).

The average is kept in float32 beside the model. Checkpoints and evaluations use it: while one is
written or run, the averaged weights stand in the model and the trained ("live") weights are put
back afterwards. A checkpoint therefore holds the average as its weights and the live weights in
its training state, so a resumed run continues both exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


class WeightAverage:
    """``average = decay x average + (1 - decay) x weights`` after every update.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` so that the random
    initialisation does not linger in the average of a short run.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.average = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after update number ``step`` (1 for the first)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, p in self.model.named_parameters():
            self.average[name].lerp_(p.detach().float(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block."""
        params = dict(self.model.named_parameters())
        live = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(live[name])

    def state_dict(self) -> dict[str, Any]:
        """The live weights (the checkpoint's own weights are the average)."""
        return {"live_weights": {name: p.detach().clone() for name, p in self.model.named_parameters()}}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Resume: the model was loaded from a checkpoint, whose weights are the average."""
        self.average = {name: p.detach().float().clone() for name, p in self.model.named_parameters()}
        for name, p in self.model.named_parameters():
            p.copy_(saved["live_weights"][name])
