"""Argument checking and backend choice shared by the logits and hidden-state paths."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64) + FLOAT_DTYPES
REDUCTIONS = ("sum", "mean", "none")
IMPLS = ("auto", "triton", "torch", "reference")
# Per-token statistics computed in the same pass as the log-probs (TRL 1.16's names), in the
# order of the rows of the kernels' stats bundle.
STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class LogpsStats(NamedTuple):
    """What `get_logps(..., stats=...)` and `get_logps_from_hidden(..., stats=...)` return.

    Every field is reduced like the log-probs: per token (reduction "none"), the token's weight
    times its value, 0 off the response; "sum" the sum of those; "mean" that sum over the count.
    A statistic that was not asked for is None.

    Gradients: `logps` always; `entropy` only with `entropy_grad=True` (else it is detached);
    the other three never.
    """

    logps: torch.Tensor  # log p(label)
    counts: torch.Tensor  # (B,) sum of the token weights
    entropy: torch.Tensor | None  # H = lse - sum_v p_v z_v
    log_sum_sq_probs: torch.Tensor | None  # log sum_v p_v^2 (WPO's weighting term)
    mean_logits: torch.Tensor | None  # mean_v z_v, z the tempered / softcapped logits
    is_top1: torch.Tensor | None  # 1.0 where the label is the argmax (first maximum), else 0.0


def check_stats(stats, entropy_grad: bool) -> tuple[str, ...]:
    """The requested statistics as a tuple of names from STATS (empty: none)."""
    if stats is None:
        stats = ()
    elif isinstance(stats, str):
        stats = (stats,)
    stats = tuple(stats)
    for name in stats:
        if name not in STATS:
            raise ValueError(f"stats: unknown statistic {name!r}; choose from {STATS}")
    if entropy_grad and "entropy" not in stats:
        raise ValueError("entropy_grad=True needs 'entropy' in stats")
    return stats


def stats_result(out, counts, ext, stats: tuple[str, ...], entropy_grad: bool) -> LogpsStats:
    """The LogpsStats of one call, from the kernels' (4, ...) bundle `ext` (rows in STATS order)."""
    vals = {}
    for i, name in enumerate(STATS):
        # ext[i], not unbind: a select view may be modified in place (an unbind view may not)
        if name not in stats:
            vals[name] = None
        elif name == "entropy" and entropy_grad:
            vals[name] = ext[i]
        else:
            vals[name] = ext[i].detach()
    return LogpsStats(out, counts, **vals)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def full_tensor(t):
    """t gathered whole when it is a DTensor (an FSDP2-sharded weight), else t. Differentiable:
    each rank's gradient of the whole weight is a partial one (from its own batch), averaged over
    the ranks and scattered back to the shards in backward, as FSDP2 averages the gradients of the
    parameters it gathers itself. No import cost: a DTensor exists only once
    torch.distributed.tensor has been imported."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is not None and isinstance(t, mod.DTensor):
        from torch.distributed.tensor.placement_types import Partial

        return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
    return t


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of float32, bfloat16, float16, float64")


@dataclass
class Targets:
    """What the row kernels read for the scored positions: position t of the logits scores label
    t + shift of `labels` (shift 1: next-token, the default; 0: already aligned)."""

    labels: torch.Tensor  # (B, T) ids (input_ids, or labels in the HF convention)
    mask: torch.Tensor | None  # (B, T) weights as given (bool/int/float), or None
    ignore_index: int | None  # set in the labels convention
    name: str  # "input_ids" or "labels", for messages


def check_options(reduction: str, temperature: float, softcap: float | None, impl: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, value, optional in (("temperature", temperature, False), ("softcap", softcap, True)):
        if optional and value is None:
            continue
        # a bool is an int to Python; a 0-d tensor would need a host sync and is not a constant
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be {'None or ' if optional else ''}a Python int or "
                            f"float, got {type(value).__name__} {value!r}"
                            + (" (use float(t) for a 0-d tensor)" if isinstance(value, torch.Tensor)
                               else ""))
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be {'None or ' if optional else ''}a finite number > 0, "
                             f"got {value!r}")


def upstream_grads(entropy_grad: bool, grad_out, grad_ext):
    """(grad_out, grad_entropy) for a backward of the log-prob ops, or None when neither reached
    the loss (only counts or logged statistics were used). grad_entropy is the entropy row of the
    statistics' gradient when the entropy carries one, else None; a missing grad_out (only the
    entropy reached the loss) becomes zeros."""
    ge = grad_ext[0] if entropy_grad and grad_ext is not None else None
    if grad_out is None:
        if ge is None:
            return None
        grad_out = torch.zeros_like(ge)
    return grad_out, ge


def fold_logit_scale(scale, temperature: float, softcap: float | None):
    """(temperature, softcap) under which the kernels' softcap(x) / temperature equals
    softcap_c(scale * x) / temperature (TRL's order: scale, then cap), or None.

    For scale > 0, softcap_c(s x) = c tanh(s x / c) = s softcap_{c/s}(x): the scale becomes a
    temperature / s and a cap c / s, with no scaled copy of the inputs. None when the scale is not
    a positive number or the folded values are not finite (the caller scales its inputs instead).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        return None
    t, c = temperature / scale, (softcap / scale if softcap is not None else None)
    if not (math.isfinite(t) and t > 0 and (c is None or (math.isfinite(c) and c > 0))):
        return None
    return t, c


def check_targets(
    BT: tuple[int, int],
    device: torch.device,
    input_ids: torch.Tensor | None,
    response_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    what: str,
) -> Targets:
    """Check ids/mask/labels against the (B, T) of `what`. Metadata only: no tensor op, no sync."""
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
        if tuple(t.shape) != BT:
            raise ValueError(f"{name} has shape {_shape(t)} but {what} has (B, T) = {BT}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {what} is on {device}")
        if name != "response_mask" and t.dtype not in ID_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected torch.int32 or torch.int64")
    if response_mask is not None and response_mask.dtype not in MASK_DTYPES:
        raise TypeError(f"response_mask has dtype {response_mask.dtype}; expected bool, int or float")
    if response_mask is not None and response_mask.requires_grad:
        # the fused backward has no mask gradient; silently returning none would be wrong
        raise ValueError(
            "response_mask requires grad, but masks are constant weights here: no gradient flows "
            "to them. Pass response_mask.detach(), or for differentiable token weights take "
            "per-token log-probs (reduction='none') and weight them yourself")
    if labels is not None:
        return Targets(labels, None, ignore_index, ids_name)
    return Targets(input_ids, response_mask, None, ids_name)


def sync_allowed(device: torch.device) -> bool:
    """False inside torch.compile tracing or CUDA graph capture, where a host sync is illegal."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def raise_bad_labels(tg: Targets, V: int, shift: int) -> None:
    """The eager error for scored labels outside [0, V), naming the first position (slow path:
    runs only once the kernels' count of such labels is known to be nonzero)."""
    R = tg.labels.shape[1] - shift
    lab = tg.labels[:, shift:]
    if tg.mask is not None:
        scored = tg.mask[:, shift:] != 0
    elif tg.ignore_index is not None:
        scored = lab != tg.ignore_index
    else:
        scored = torch.ones_like(lab, dtype=torch.bool)
    bad = scored & ((lab < 0) | (lab >= V))
    n = int(bad.sum())
    if n == 0 or R <= 0:
        return
    b, t = (int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"{tg.name}[{b}, {t + shift}] = {int(lab[b, t])} is a scored position but "
        f"outside the vocabulary [0, {V}) ({n} such positions)"
    )


def check_bad_count(bad: torch.Tensor, tg: Targets, V: int, shift: int) -> None:
    """Validation from the kernels' per-sequence count of out-of-range scored labels: a clear
    eager error (one host sync), or a device-side assert where no sync is allowed."""
    if sync_allowed(bad.device):
        if bool(bad.any()):
            raise_bad_labels(tg, V, shift)
    else:
        torch._assert_async(
            (bad == 0).all(), f"fused_dpo: a scored {tg.name} id lies outside the vocabulary [0, {V})"
        )


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend(impl: str, device: torch.device) -> ModuleType:
    """The launcher module for `impl` ("auto", "triton" or "torch"): row_stats / seq_reduce /
    row_grad with the same arguments, from kernels/logps.py (Triton) or _torch_rows.py (chunked
    PyTorch). "auto" is Triton on CUDA when it is installed, else PyTorch."""
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "torch":
        from . import _torch_rows

        return _torch_rows
    if not _triton_available():
        raise ValueError("impl='triton' needs the triton package; install fused_dpo[triton]")
    if device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"impl='triton' got tensors on {device}; Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for testing on CPU)"
        )
    from .kernels import logps

    return logps


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _openmp_backend() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def threads_under(n: int) -> int:
    """The intra-op thread count that `intra_op_threads(n)` runs its body with."""
    before = torch.get_num_threads()
    return before if n <= 0 or not _openmp_backend() else min(n, before)


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run the body with at most `n` torch intra-op threads on the calling thread, then restore
    the count (n <= 0, or n at or above the current count: no change).

    Thread safety: under torch's OpenMP backend (that of its Linux builds, among others; see
    torch.__config__.parallel_info()) the count is per calling thread, so threads running torch
    meanwhile keep theirs. Process-wide, torch also
    records n as the count that a thread picks up at its first parallel op: a thread that starts
    its first one while the body runs keeps n. A torch.set_num_threads in the body is undone at
    exit. Under the native backend the count is fixed once work has started: no change.
    """
    before, n = torch.get_num_threads(), threads_under(n)
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
