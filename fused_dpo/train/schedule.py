"""Learning-rate schedule: linear warm-up, then constant, linear or cosine decay to 0."""

from __future__ import annotations

import math

from .config import DPOConfig


def lr_lambda(cfg: DPOConfig, steps: int):
    """The multiplier of the base learning rate at each step (for torch's LambdaLR)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    return f
