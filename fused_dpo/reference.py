"""Eager PyTorch reference: the code every DPO implementation hand-writes.

Tests and benchmarks import these functions; run them on float64 inputs for ground truth. They
materialise the full (B, T-1, V) log-softmax on purpose: that is what the fused paths avoid.
"""

from __future__ import annotations

import torch

from ._common import LogpsStats, check_stats


def shifted_targets(
    input_ids: torch.Tensor | None,
    response_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    shift: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights) for the scored positions: position t predicts token t+1 (shift=True),
    or token t (shift=False, inputs already aligned).

    With `labels` (HF/TRL convention, aligned with input_ids) a position counts unless its label is
    `ignore_index`; with `input_ids` + `response_mask` the mask value is the weight (1 everywhere
    when no mask is given).
    """
    s = int(shift)
    if labels is not None:
        targets = labels[:, s:]
        weights = (targets != ignore_index).to(torch.float32)
        return targets, weights
    targets = input_ids[:, s:]
    if response_mask is None:
        return targets, torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    # float64 weights stay float64 (float64 truth); every other mask becomes float32
    wdt = torch.float64 if response_mask.dtype == torch.float64 else torch.float32
    return targets, response_mask[:, s:].to(wdt)


def reduce_token_logps(
    token_logps: torch.Tensor, weights: torch.Tensor, reduction: str, return_counts: bool
):
    """Apply `reduction` to weighted per-token log-probs (B, T-1); optionally return counts (B,)."""
    counts = weights.sum(-1)
    if reduction == "sum":
        out = token_logps.sum(-1)
    elif reduction == "mean":
        # sum / count for any nonzero count (float weights may sum to less than 1); 0 for none.
        safe = torch.where(counts != 0, counts, torch.ones_like(counts))
        out = torch.where(counts != 0, token_logps.sum(-1) / safe, torch.zeros_like(counts))
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
    shift: bool = True,
    reduction: str = "sum",
    return_counts: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    stats=None,
    entropy_grad: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """The eager shifted log-softmax gather. Accumulates in float32, or float64 for float64 logits.

    With `cu_seqlens` (packed inputs, B = 1) each sequence is sliced out and scored on its own
    (`packed_reference`): outputs per sequence, or per token in the packed row for "none".

    Positions of weight 0 do not contribute even when their logits hold NaN (masked with `where`,
    not a product), as in the fused paths. With `stats`, returns a `LogpsStats` whose statistics
    come from the full (B, R, V) distribution, by their definitions:

        entropy           -sum_v p_v log p_v
        log_sum_sq_probs  logsumexp_v(2 log p_v)
        mean_logits       mean_v z_v
        is_top1           argmax_v z_v == label (torch.argmax: the first maximum)
    """
    stats = check_stats(stats, entropy_grad)
    if cu_seqlens is not None:
        return packed_reference(
            get_logps_reference, (logits,), cu_seqlens, input_ids, response_mask, labels=labels,
            ignore_index=ignore_index, shift=shift, reduction=reduction,
            return_counts=return_counts, temperature=temperature, softcap=softcap, stats=stats,
            entropy_grad=entropy_grad,
        )
    targets, weights = shifted_targets(input_ids, response_mask, labels, ignore_index, shift)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits[:, : logits.shape[1] - int(shift), :].to(acc)
    z = torch.where((weights != 0)[..., None], z, 0.0)  # unscored rows: no NaN in value or grad
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    safe = torch.where(weights != 0, targets, torch.zeros_like(targets)).long()
    logp_all = torch.log_softmax(z, -1)
    logps = logp_all.gather(-1, safe[..., None]).squeeze(-1)
    w = weights.to(acc)
    token_logps = torch.where(weights != 0, logps * w, 0.0)
    if not stats:
        return reduce_token_logps(token_logps, w, reduction, return_counts)
    out, counts = reduce_token_logps(token_logps, w, reduction, True)
    values = {}
    if "entropy" in stats:
        lp = logp_all if entropy_grad else logp_all.detach()
        p = lp.exp()
        # mask log p, not the product: p log p -> 0 where p = 0 (no 0 * -inf, in value or
        # gradient), and a NaN row stays NaN
        values["entropy"] = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
    zd, lpd = z.detach(), logp_all.detach()
    if "log_sum_sq_probs" in stats:
        values["log_sum_sq_probs"] = torch.logsumexp(2 * lpd, -1)
    if "mean_logits" in stats:
        values["mean_logits"] = zd.mean(-1)
    if "is_top1" in stats:
        # a row whose log-prob is NaN (NaN or inf logits) has NaN statistics, top-1 included
        top1 = (zd.argmax(-1) == safe).to(acc)
        values["is_top1"] = torch.where(logps.detach().isnan(), float("nan"), top1)
    reduced = {}
    for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
        if name in values:
            tok = torch.where(weights != 0, values[name] * w, 0.0)
            reduced[name] = reduce_token_logps(tok, w, reduction, False)
        else:
            reduced[name] = None
    return LogpsStats(out, counts, **reduced)


def get_logps_from_hidden_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    head_dtype: torch.dtype | None = None,
    **kwargs,
):
    """`get_logps_reference(hidden @ weight.T + bias, ...)`: builds the full logits, as
    `torch.nn.functional.linear` would (so autocast applies); `head_dtype` casts all three first."""
    if head_dtype is not None:
        hidden, weight = hidden.to(head_dtype), weight.to(head_dtype)
        bias = bias.to(head_dtype) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            logits = torch.nn.functional.linear(hidden, weight, bias)
    else:
        logits = torch.nn.functional.linear(hidden, weight, bias)
    return get_logps_reference(logits, input_ids, response_mask, **kwargs)


def packed_reference(fn, rows, cu_seqlens, input_ids=None, response_mask=None, *, labels=None,
                     shift=True, reduction="sum", return_counts=False, stats=(), **kwargs):
    """`fn` (a reference above) on packed inputs: each sequence s of the (1, total_T, ...) `rows`
    and ids, positions [cu_seqlens[s], cu_seqlens[s + 1]), is sliced out and scored as a batch of
    one; the results are stacked, (S,), or for "none" placed in the packed row (1, total_T - shift)
    at the sequence's own positions (0 at each sequence's last position, which predicts nothing)."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    s = int(shift)
    total = rows[0].shape[1]
    per_seq = []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        def part(t, a=a, b=b):
            return t[:, a:b] if t is not None else None

        res = fn(*(part(r) for r in rows), part(input_ids), part(response_mask),
                 labels=part(labels), shift=shift, reduction=reduction, return_counts=True,
                 stats=stats, **kwargs)
        per_seq.append(tuple(res))
    fields = list(zip(*per_seq, strict=True))  # per output field, one value per sequence

    def join(values, per_token):
        if values[0] is None:
            return None
        if not per_token:
            return torch.cat(values)
        out = values[0].new_zeros((1, max(total - s, 0)))
        pieces, index = [], []
        for (a, _b), v in zip(zip(cu[:-1], cu[1:], strict=True), values, strict=True):
            pieces.append(v[0])
            index.append(torch.arange(a, a + v.shape[1], device=v.device))
        # index_put (not in-place slices): differentiable, one node
        return out.index_put((torch.zeros_like(torch.cat(index)), torch.cat(index)),
                             torch.cat(pieces))

    per_token = reduction == "none"
    out = join(fields[0], per_token)
    counts = join(fields[1], False)
    if stats:
        return LogpsStats(out, counts, *(join(f, per_token) for f in fields[2:]))
    return (out, counts) if return_counts else out
