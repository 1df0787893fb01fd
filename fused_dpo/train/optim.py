"""The optimizer of a run, by transformers' and TRL's `optim` name."""

from __future__ import annotations

import torch


def build(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.optim` names, over the trainable `params`."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
