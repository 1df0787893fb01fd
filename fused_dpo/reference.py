"""Eager PyTorch reference: the code every DPO implementation hand-writes.

Tests and benchmarks import these functions; run them on float64 inputs for ground truth. They
materialise the full (B, T-1, V) log-softmax on purpose: that is what the fused paths avoid.
"""

from __future__ import annotations

import torch


def shifted_targets(
    input_ids: torch.Tensor | None,
    response_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights) for positions 0..T-2: position t predicts token t+1.

    With `labels` (HF/TRL convention, aligned with input_ids) a position counts unless its label is
    `ignore_index`; with `input_ids` + `response_mask` the mask value is the weight (1 everywhere
    when no mask is given).
    """
    if labels is not None:
        targets = labels[:, 1:]
        weights = (targets != ignore_index).to(torch.float32)
        return targets, weights
    targets = input_ids[:, 1:]
    if response_mask is None:
        return targets, torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    return targets, response_mask[:, 1:].to(torch.float32)


def reduce_token_logps(
    token_logps: torch.Tensor, weights: torch.Tensor, reduction: str, return_counts: bool
):
    """Apply `reduction` to weighted per-token log-probs (B, T-1); optionally return counts (B,)."""
    counts = weights.sum(-1)
    if reduction == "sum":
        out = token_logps.sum(-1)
    elif reduction == "mean":
        out = token_logps.sum(-1) / counts.clamp_min(1.0)
        out = torch.where(counts > 0, out, torch.zeros_like(out))
    elif reduction == "none":
        out = token_logps
    else:
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    return (out, counts) if return_counts else out


def get_logps_reference(
    logits: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    return_counts: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
):
    """The eager shifted log-softmax gather. Accumulates in float32, or float64 for float64 logits."""
    targets, weights = shifted_targets(input_ids, response_mask, labels, ignore_index)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits[:, :-1, :].to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    safe = torch.where(weights != 0, targets, torch.zeros_like(targets)).long()
    logps = torch.log_softmax(z, -1).gather(-1, safe[..., None]).squeeze(-1)
    token_logps = logps * weights.to(acc)
    return reduce_token_logps(token_logps, weights.to(acc), reduction, return_counts)


def get_logps_from_hidden_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    **kwargs,
):
    """`get_logps_reference(hidden @ weight.T + bias, ...)`: builds the full logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return get_logps_reference(logits, input_ids, response_mask, **kwargs)
