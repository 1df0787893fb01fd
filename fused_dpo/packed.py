"""Packed (padding-free) sequences: several sequences concatenated in one row, `cu_seqlens`.

The row kernels see one (1, N) row. What makes it S sequences:

- no token is predicted across a boundary: with the shift, the first token of each sequence is
  given weight 0 as a target (so the previous sequence's last position scores nothing);
- the per-sequence reduction reads the segment [cu[s], cu[s + 1]) of targets
  (`seq_reduce(..., cu_seqlens=)`, one program per sequence, the same fp32 sums as a batch row);
- the backward spreads each sequence's upstream gradient (divided by its count for "mean") over
  its rows and runs the per-token ("none") backward.
"""

from __future__ import annotations

import torch

from ._common import Targets, sync_allowed


def check_cu_seqlens(cu_seqlens, B: int, T: int, device: torch.device, what: str,
                     validate: bool) -> None:
    """Metadata checks always; the values (start 0, end T, non-decreasing) with `validate`,
    at the cost of one host sync (a device-side assert where no sync is allowed). With
    validate=False the offsets are trusted: offsets that do not cover the row are undefined
    behaviour (rows outside every segment are dropped, or an index error)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens has dtype {cu_seqlens.dtype}; expected torch.int32")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D (S + 1,) with S >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {what} is on {device}")
    if B != 1:
        raise ValueError(f"packed inputs (cu_seqlens) need batch 1: {what} is (1, total_T, ...); "
                         f"got B = {B}")
    if not validate:
        return
    if not sync_allowed(device):
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens.diff() >= 0).all()
        torch._assert_async(ok, f"fused_dpo: cu_seqlens must rise from 0 to {T}")
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but {what} has total_T = {T}")
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{i}] = {cu[i]} > "
                             f"cu_seqlens[{i + 1}] = {cu[i + 1]}")


def first_tokens(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """(1, T) bool, True at each sequence's first position (no sync: a scatter into T + 1)."""
    first = torch.zeros(T + 1, dtype=torch.bool, device=cu_seqlens.device)
    first[cu_seqlens[:-1].long()] = True  # an empty trailing sequence writes slot T, dropped
    return first[:T][None]


def boundary_targets(tg: Targets, cu_seqlens: torch.Tensor, shift: int) -> Targets:
    """The targets with each sequence's first token unscored (shift 1): position cu[s] - 1, the
    previous sequence's last, does not predict it. Unshifted inputs are already aligned."""
    if not shift:
        return tg
    first = first_tokens(cu_seqlens, tg.labels.shape[1])
    if tg.ignore_index is not None:
        return Targets(tg.labels.masked_fill(first, tg.ignore_index), None, tg.ignore_index,
                       tg.name)
    mask = ~first if tg.mask is None else tg.mask.masked_fill(first, 0)
    return Targets(tg.labels, mask, None, tg.name)


def token_grads(grad_out: torch.Tensor, counts: torch.Tensor, cu_seqlens: torch.Tensor, R: int,
                shift: int, reduction: str) -> torch.Tensor:
    """(1, R) per-token upstream gradient from a per-sequence (S,) one: the backward of the
    segment reduction ("mean" divides by each sequence's count, 0 for an empty one)."""
    if reduction == "none":
        return grad_out
    from ._torch_rows import segment_ids

    g = grad_out.to(counts.dtype)
    if reduction == "mean":
        g = torch.where(counts != 0, g / torch.where(counts != 0, counts, 1.0), 0.0)
    seg = segment_ids(cu_seqlens, R, shift)
    return g.index_select(0, seg)[None]
