"""Learning-rate schedules as multipliers of the peak LR (for torch's LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable

from megalong.config.schema import TrainConfig


def lr_multiplier(train: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant (LongLoRA's default) or cosine decay to ``min_lr``."""
    warmup, total = train.warmup_steps, max(1, train.max_steps)
    floor = train.min_lr / train.lr if train.lr > 0 else 0.0

    def mult(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if train.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return mult
