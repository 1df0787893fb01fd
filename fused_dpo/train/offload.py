"""Activation offloading: the tensors autograd saves for the backward pass."""

from __future__ import annotations

import contextlib


def for_config(cfg, device):
    """A reusable context manager around one micro-batch's forward and backward."""
    return contextlib.nullcontext()
