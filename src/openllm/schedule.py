"""The learning-rate schedule: a pure function of the step, and when two schedules agree.

``wsd`` (the default) is warmup, a stable phase at the peak rate, then a linear decay to the
floor over the last ``decay_fraction`` of the steps. Before the decay starts, the rate does not
depend on ``max_steps``, so a longer run shares every state of a shorter one up to the shorter
run's decay start: raising ``train.max_steps`` resumes from there instead of from scratch.

``cosine`` decays from the end of warmup to ``max_steps``: every step depends on ``max_steps``,
so changing it retrains from the start.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    kind: str  # "wsd" | "cosine"
    peak: float  # learning rate after warmup
    floor: float  # learning rate at the last step
    warmup_steps: int
    max_steps: int
    decay_fraction: float  # wsd: share of max_steps spent decaying

    @classmethod
    def from_config(cls, cfg: Any) -> "Schedule":
        """From a :class:`~openllm.config.TrainConfig`."""
        return cls(cfg.schedule, cfg.learning_rate, cfg.min_learning_rate, cfg.warmup_steps,
                   cfg.max_steps, cfg.decay_fraction)

    @property
    def decay_start(self) -> int:
        """Updates made before the rate leaves its peak (the last state a longer run shares)."""
        if self.kind == "cosine":
            return self.warmup_steps
        return max(self.warmup_steps, self.max_steps - math.ceil(self.decay_fraction * self.max_steps))

    def lr(self, step: int) -> float:
        """Learning rate of update number ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        start = self.decay_start
        if step < start:
            return self.peak
        if self.kind == "cosine":
            progress = min(1.0, (step - start) / max(1, self.max_steps - start))
            return self.floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak - self.floor)
        progress = min(1.0, (step - start + 1) / max(1, self.max_steps - start))
        return self.peak + progress * (self.floor - self.peak)

    def agrees_with(self, other: "Schedule", steps: int) -> bool:
        """True when both give the same rate to each of the first ``steps`` updates."""
        return all(self.lr(t) == other.lr(t) for t in range(steps))

    def digest(self, steps: int) -> str:
        """sha256 of the rates of the first ``steps`` updates: equal digests, equal histories."""
        return hashlib.sha256(struct.pack(f"<{steps}d", *(self.lr(t) for t in range(steps)))).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schedule":
        return cls(**data)
