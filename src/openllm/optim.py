"""Optimizers: AdamW, or Muon for the hidden matrices with AdamW for everything else.

Muon (PyTorch's ``torch.optim.Muon``) replaces each hidden weight matrix's momentum update by
its nearest orthogonal matrix (a few Newton-Schulz iterations in bf16), so every direction of
the matrix moves by about the same amount. It only applies to 2-D weights inside the
transformer blocks; the embedding (tied with the output head) and the norm scales stay with
AdamW. With ``adjust_lr_fn="match_rms_adamw"`` Muon's updates have the size AdamW's would, so
one learning rate and one schedule drive both (bench/README.md, "Choosing the defaults").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def adamw_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings (dim >= 2), none on norm scales."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class MuonWithAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped as one optimizer.

    Offers what the training loop uses: ``param_groups`` (to set the learning rate),
    ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict``.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW optimizer state (was the run trained with another optimizer?)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(
    model: nn.Module,
    kind: str,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.AdamW | MuonWithAdamW:
    """``kind`` is "adamw" or "muon"; the tied embedding/head weight is counted once."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    fused = len(params) > 0 and all(p.is_cuda for p in params)  # the fused AdamW kernel is free speed on GPU
    if kind == "adamw":
        return torch.optim.AdamW(adamw_groups(params, weight_decay), lr=learning_rate, betas=betas, fused=fused)
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}: use 'adamw' or 'muon'")
    hidden = [p for name, p in named if p.dim() == 2 and name.startswith("layers.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(adamw_groups(rest, weight_decay), lr=learning_rate, betas=betas, fused=fused)
    return MuonWithAdamW(muon, adamw)
