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

    Returns:
        float32 (float64 for float64 logits) `logps` and `entropy`.
    """
    x, lead, ids, mask = _rows_inputs(logits, "logits", index, row_mask)
    out = get_logps(x, ids, mask, shift=False, reduction="none", temperature=temperature,
                    softcap=softcap, impl=impl, validate=validate, stats=("entropy",),
                    entropy_grad=entropy_requires_grad)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps_and_entropy(hidden @ weight.T + bias, ...)` without the logits: hidden is
    (..., H) aligned with `index` (...), the head (V, H). Only rows where `row_mask` is nonzero
    are multiplied with the head (compacted), the vocabulary a chunk at a time; the other
    arguments are those of `get_logps_from_hidden`."""
    h, lead, ids, mask = _rows_inputs(hidden, "hidden", index, row_mask)
    out = get_logps_from_hidden(h, weight, ids, mask, bias=bias, shift=False, reduction="none",
                                temperature=temperature, softcap=softcap, head_dtype=head_dtype,
                                impl=impl, chunk_size=chunk_size, compact=compact,
                                validate=validate, stats=("entropy",),
                                entropy_grad=entropy_requires_grad)
    return out.logps.reshape(lead), out.entropy.reshape(lead)
