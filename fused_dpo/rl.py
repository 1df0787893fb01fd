"""Per-token log-probs and entropy for RL trainers (GRPO, PPO): TRL's contract, fused.

A GRPO/PPO trainer holds logits (or hidden states) that are already aligned with the tokens they
score, and a completion mask. It wants, per token, log p(token) and the entropy H of the
predictive distribution, 0 off the mask, the entropy with or without a gradient (an entropy
bonus). That is `trl.trainer.utils.selective_log_softmax_and_entropy(logits, index,
entropy_requires_grad, temperature, row_mask)`; the functions here keep its argument order and
outputs, run `get_logps(..., shift=False, reduction="none", stats=("entropy",))` underneath, and
add what the fused op has besides: softcap, the hidden-state path, float64 truth on the CPU.

Cost (both in the same pass over each row as the log-probs): the entropy adds two multiply-adds
per logit to the forward; its gradient one more term to the backward's per-logit update. Rows off
the mask are neither read nor written in the forward; their gradient is written as zeros.

Tensor parallelism (`process_group=`, `vocab_start=`, `vocab_size=`): the logits (or the lm_head
rows) are this rank's vocab shard, as in `get_logps`; every rank gets the global per-token
log-probs and entropy. Packed (padding-free) rows need no `cu_seqlens` here: the inputs are
aligned and the outputs per token, so a packed row is scored as any other row.
"""

from __future__ import annotations

import torch

from .hidden import get_logps_from_hidden
from .logps import get_logps


def _as_rows(t: torch.Tensor, lead: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(t.shape) != lead:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {lead} to match the rows")
    return t.reshape(1, -1) if len(lead) != 2 else t


def _rows_inputs(x, name, index, row_mask):
    """(x as (B, T, last), the leading shape, index and the skip mask as (B, T))."""
    x3 = _as_3d(x, name)
    lead = tuple(x.shape[:-1])
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    return x3, lead, _as_rows(index, lead, "index"), _skip_mask(row_mask, lead)


def _skip_mask(row_mask, lead):
    """TRL's row mask skips rows (nonzero = computed); it does not weight them."""
    if row_mask is None:
        return None
    if not isinstance(row_mask, torch.Tensor):
        raise TypeError(f"row_mask must be a torch.Tensor, got {type(row_mask).__name__}")
    return _as_rows(row_mask, lead, "row_mask") != 0


def _as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., V), got shape {tuple(x.shape)}")
    if x.dim() == 3:
        return x
    # (N, V) or (A, B, C, V): one batch row of N tokens (a view whenever the strides allow)
    return x.reshape(1, -1, x.shape[-1])


def token_logps_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    impl: str = "auto",
    validate: bool = True,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy), each shaped like `index`, from logits aligned with it.

    Args:
        logits: (..., V); position i scores index[i] (no shift: pass `logits[:, :-1]` and
            `input_ids[:, 1:]`, as views, for next-token prediction).
        index: (...) int32/int64 token ids.
        entropy_requires_grad: the entropy carries a gradient (default, as in TRL); False
            returns it detached, and the backward computes the log-probs' gradient alone.
        temperature, softcap: as in `get_logps`.
        row_mask: (...) bool/int/float; rows where it is 0 are skipped and return 0 in both
            outputs (TRL's contract: it skips, it does not weight; use `get_logps(...,
            stats=("entropy",))` for weighted tokens).
        impl, validate: as in `get_logps`.
        process_group, vocab_start, vocab_size: vocab-parallel (GRPO/PPO under tensor
            parallelism), as in `get_logps`: logits (..., V_local) are this rank's contiguous
            shard, global columns [vocab_start, vocab_start + V_local) (default: after the
            lower ranks' shards, whose widths may differ); vocab_size is the global V (default
            the sum of the widths; columns at or past it, the last shard's padding, are
            ignored, their gradient 0). Every rank passes the same
            index and row_mask and gets the same, global, log-probs and entropy; the logits
            gradient is this shard's columns (no communication in the backward). Eager only;
            impl "reference" is refused.

    Packed (padding-free) rows take no `cu_seqlens`: position i scores index[i] with no shift
    and the outputs are per token, so nothing crosses a sequence boundary; pass the packed row
    (1, total_T, V) as it is.

    Returns:
        float32 (float64 for float64 logits) `logps` and `entropy`.
    """
    x, lead, ids, mask = _rows_inputs(logits, "logits", index, row_mask)
    out = get_logps(x, ids, mask, shift=False, reduction="none", temperature=temperature,
                    softcap=softcap, impl=impl, validate=validate, stats=("entropy",),
                    entropy_grad=entropy_requires_grad, process_group=process_group,
                    vocab_start=vocab_start, vocab_size=vocab_size)
    return out.logps.reshape(lead), out.entropy.reshape(lead)


def token_logps_and_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    head_dtype: torch.dtype | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    compact: bool = True,
    validate: bool = True,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps_and_entropy(hidden @ weight.T + bias, ...)` without the logits: hidden is
    (..., H) aligned with `index` (...), the head (V, H). Only rows where `row_mask` is nonzero
    are multiplied with the head (compacted), the vocabulary a chunk at a time; the other
    arguments are those of `get_logps_from_hidden`.

    process_group, vocab_start, vocab_size: vocab-parallel, as in `get_logps_from_hidden`: weight
    (V_local, H) (and bias (V_local,)) are this rank's rows of the lm_head, global ids
    [vocab_start, vocab_start + V_local); hidden, index and row_mask the same on every rank,
    which gets the global per-token log-probs and entropy. The weight and bias gradients stay
    local (0 for padding rows past vocab_size); the hidden-state gradient is all-reduced over
    the group, so every rank gets the full one. Eager only. As for the logits, packed rows need
    no `cu_seqlens` (aligned inputs, per-token outputs)."""
    h, lead, ids, mask = _rows_inputs(hidden, "hidden", index, row_mask)
    out = get_logps_from_hidden(h, weight, ids, mask, bias=bias, shift=False, reduction="none",
                                temperature=temperature, softcap=softcap, head_dtype=head_dtype,
                                impl=impl, chunk_size=chunk_size, compact=compact,
                                validate=validate, stats=("entropy",),
                                entropy_grad=entropy_requires_grad,
                                process_group=process_group, vocab_start=vocab_start,
                                vocab_size=vocab_size)
    return out.logps.reshape(lead), out.entropy.reshape(lead)
