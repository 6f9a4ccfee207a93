"""The research levers a study cell may set (``grid.levers``): their names, and parsing an entry.

The levers themselves live where they act: QK-norm, logit soft-capping, value embeddings and the
ReLU-squared MLP in :mod:`openllm.model`, the weight average in :mod:`openllm.ema`, document-start windows in
:mod:`openllm.windows`; their settings are ``model.*`` and ``train.*`` fields of params.yaml.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from .config import ModelConfig, TrainConfig

# Each lever by the params.yaml section that holds it.
# ``seed`` is no lever: it trains a cell again under another seed, to measure run-to-run noise.
LEVER_SECTIONS = {"qk_norm": "model", "logit_softcap": "model", "mlp": "model", "value_embeds": "model",
                  "ema_decay": "train", "window_start": "train", "seed": "train"}


def parse_levers(spec: str) -> dict[str, dict[str, Any]]:
    """``"qk_norm+ema_decay=0.999"`` -> ``{"model": {"qk_norm": True}, "train": {"ema_decay": 0.999}}``.

    A name alone means true; a value is read as YAML. Names and values are checked against
    :class:`ModelConfig` and :class:`TrainConfig`; a bad one raises ValueError naming it.
    """
    settings: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for part in spec.split("+"):
        name, _, text = part.partition("=")
        if name not in LEVER_SECTIONS:
            raise ValueError(f"grid.levers: unknown lever {name!r} in {spec!r}; known: {sorted(LEVER_SECTIONS)}")
        settings[LEVER_SECTIONS[name]][name] = yaml.safe_load(text) if text else True
    try:
        ModelConfig(**settings["model"])
        TrainConfig(**settings["train"])
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"grid.levers: {spec!r}: {errors}") from None
    return settings
