"""Argument checking and backend choice shared by the logits and hidden-state paths."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64) + FLOAT_DTYPES
REDUCTIONS = ("sum", "mean", "none")
IMPLS = ("auto", "triton", "torch", "reference")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of float32, bfloat16, float16, float64")


@dataclass
class Targets:
    """Shifted targets for positions 0..T-2 (position t predicts token t+1)."""

    targets: torch.Tensor  # (B, T-1) ids, a view
    kernel_weights: torch.Tensor | None  # (B, T-1) mask view handed to the kernel, or None
    ignore_index: int | None  # set in the labels convention
    weights: torch.Tensor  # (B, T-1) float32 weights; 0 = not a response position


def check_options(reduction: str, temperature: float, softcap: float | None, impl: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if softcap is not None and not (
        isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def prepare_targets(
    BT: tuple[int, int],
    V: int,
    device: torch.device,
    input_ids: torch.Tensor | None,
    response_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    validate: bool,
    what: str,
) -> Targets:
    """Check ids/mask/labels against the (B, T) of `what` and build the shifted targets."""
    if labels is not None and response_mask is not None:
        raise ValueError("pass either labels (with ignore_index) or response_mask, not both")
    if labels is None and input_ids is None:
        raise ValueError("pass input_ids (with an optional response_mask) or labels")
    ids = labels if labels is not None else input_ids
    ids_name = "labels" if labels is not None else "input_ids"
    others = [(ids_name, ids)]
    if labels is not None and input_ids is not None:
        others.append(("input_ids", input_ids))
    if response_mask is not None:
        others.append(("response_mask", response_mask))
    for name, t in others:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if _shape(t) != BT:
            raise ValueError(f"{name} has shape {_shape(t)} but {what} has (B, T) = {BT}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {what} is on {device}")
    for name, t in others:
        if name != "response_mask" and t.dtype not in ID_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected torch.int32 or torch.int64")
    if response_mask is not None and response_mask.dtype not in MASK_DTYPES:
        raise TypeError(f"response_mask has dtype {response_mask.dtype}; expected bool, int or float")

    targets = ids[:, 1:]
    if labels is not None:
        weights = (targets != ignore_index).to(torch.float32)
        kernel_weights, ignore = None, ignore_index
    elif response_mask is not None:
        kernel_weights = response_mask[:, 1:]
        if kernel_weights.dtype == torch.bool:
            kernel_weights = kernel_weights.view(torch.uint8)  # zero-copy; kernels load bytes
        weights = response_mask[:, 1:].to(torch.float32)
        ignore = None
    else:
        weights = torch.ones(targets.shape, dtype=torch.float32, device=device)
        kernel_weights, ignore = None, None

    if validate and targets.numel():
        bad = (weights != 0) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{ids_name}[{b}, {t + 1}] = {int(targets[b, t])} is a response position but "
                f"outside the vocabulary [0, {V}) ({int(bad.sum())} such positions)"
            )
    return Targets(targets, kernel_weights, ignore, weights)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend(impl: str, device: torch.device) -> ModuleType:
    """The module providing row_stats / row_grad for `impl` ("auto" already resolved or not)."""
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "torch":
        from . import _torch_rows

        return _torch_rows
    if impl == "triton":
        if not _triton_available():
            raise ValueError("impl='triton' needs the triton package; install fused_dpo[triton]")
        if device.type != "cuda" and not interpreter_on():
            raise ValueError(
                f"impl='triton' got tensors on {device}; Triton kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1 set before triton is imported, for testing on CPU)"
            )
        from .kernels import logps

        return logps
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
