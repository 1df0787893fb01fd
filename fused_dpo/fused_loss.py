"""DPO loss straight from hidden states: policy log-probs through `get_logps_from_hidden` (no
logits), reference log-probs precomputed or computed under no_grad in the same call, then the loss
from `fused_dpo.losses`."""

from __future__ import annotations

import inspect

import torch

from . import _common
from .hidden import check_head_args, get_logps_from_hidden, grouped_logps_and_grads
from .losses import check_loss_options, dpo_loss


def _split(t: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[0]
    if n % 2:
        raise ValueError(f"{what} has batch {n}; expected the concatenated [chosen; rejected] (even)")
    return t[: n // 2], t[n // 2 :]


def dpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    grad_in_forward: bool = False,
    pairs_per_group: int | None = None,
    validate: bool = True,
    **loss_kwargs,
):
    """DPO-family loss for a concatenated [chosen; rejected] batch of 2B sequences.

    Args:
        hidden: (2B, T, H) policy final hidden states; rows 0..B-1 chosen, B..2B-1 rejected.
        weight: (V, H) policy lm_head weight (bias optional).
        input_ids, response_mask: (2B, T).
        ref_logps: (2B,) precomputed reference log-probs, or
        ref_hidden + ref_weight (+ ref_bias): reference hidden states and head, run under no_grad.
        grad_in_forward: compute the gradients during the forward, a group of pairs at a time
            (three (M, H, V) matmuls instead of four; see `hidden.grouped_logps_and_grads` for the
            memory it trades). Needs a loss whose gradient for a pair depends on that pair's
            log-probs alone (not bco_pair_running_mean, aot, aot_unpaired; sft's batch-wide token
            count is known from the mask), reduction "mean", no temperature-dependent reference
            path change.
            The returned loss carries the precomputed gradients; eager only.
        pairs_per_group: with grad_in_forward, the pairs whose logits are held at once (the
            last group takes the rest). Each group reads and writes the fp32 (V, H) dW
            accumulator once (4.2 GB at 128256 x 4096), so k pairs a group pay 1/k of that per
            pair, for k pairs' (rows, V) logits held. None: as many consecutive pairs as keep
            the logits within 1 GiB, at most 8 (`hidden._plan_groups`); 1 holds the least.
        validate: as in `get_logps` (False: no host sync for the label check).
        **loss_kwargs: passed to `fused_dpo.losses.dpo_loss` (loss_type, beta, ...).

    Returns:
        (loss, metrics) as `dpo_loss`; token counts are supplied automatically.
    """
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("pass ref_logps or ref_hidden/ref_weight, not both")
    _check_pairs_per_group(pairs_per_group, grad_in_forward)
    kw = dict(temperature=temperature, softcap=softcap, impl=impl, chunk_size=chunk_size,
              validate=validate)
    if ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_hidden needs ref_weight")
        with torch.no_grad():
            ref_logps = get_logps_from_hidden(ref_hidden, ref_weight, input_ids, response_mask,
                                              bias=ref_bias, **kw)
    if ref_logps is not None and ref_logps.shape != (hidden.shape[0],):
        raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}; "
                         f"expected ({hidden.shape[0]},)")
    if grad_in_forward:
        return _loss_with_grad_in_forward(hidden, weight, bias, input_ids, response_mask, ref_logps,
                                          pairs_per_group, kw, loss_kwargs)
    logps, counts = get_logps_from_hidden(hidden, weight, input_ids, response_mask, bias=bias,
                                          return_counts=True, **kw)
    pc, pr = _split(logps, "hidden")
    rc, rr = _split(ref_logps, "ref_logps") if ref_logps is not None else (None, None)
    nc, nr = _split(counts, "counts")
    return dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, **loss_kwargs)


def _check_pairs_per_group(pairs_per_group, grad_in_forward) -> None:
    if pairs_per_group is None:
        return
    if not grad_in_forward:
        raise ValueError("pairs_per_group applies to grad_in_forward=True only; got "
                         f"pairs_per_group={pairs_per_group!r} with grad_in_forward=False")
    if isinstance(pairs_per_group, bool) or not isinstance(pairs_per_group, int) or \
            pairs_per_group < 1:
        raise ValueError(f"pairs_per_group must be a positive int or None, got {pairs_per_group!r}")


class _AttachGrads(torch.autograd.Function):
    """The loss value, with gradients computed during the forward attached to its inputs.

    The gradients arrive in fp32 (the accumulation dtype): the backward scales them by the
    upstream gradient (gradient accumulation, loss scaling) in fp32 and rounds once to each
    input's dtype. One backward only: the buffers are consumed."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (hidden, weight, bias))
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("dpo_loss_from_hidden(grad_in_forward=True) supports one backward "
                               "per forward (its gradients were formed in the forward and are "
                               "consumed); use grad_in_forward=False for retain_graph")
        grads, ctx.grads = ctx.grads, None
        out = [None if t is None else t.mul_(g.to(t.dtype)).to(dt)
               for t, dt in zip(grads, ctx.dtypes, strict=True)]
        return (None, *out, None, None, None)


def _loss_with_grad_in_forward(hidden, weight, bias, input_ids, response_mask, ref_logps,
                               pairs_per_group, kw, loss_kwargs):
    o = {k: p.default for k, p in _LOSS_OPTIONS.items()} | loss_kwargs
    types = [o["loss_type"]] if isinstance(o["loss_type"], str) else list(o["loss_type"])
    coupled = {"bco_pair_running_mean": "couples the batch through its running mean",
               "aot": "sorts the batch's log-ratios", "aot_unpaired": "sorts the batch's log-ratios"}
    for t in types:
        if t in coupled:
            raise ValueError(f"grad_in_forward needs a loss whose gradient for a pair depends on "
                             f"that pair's log-probs alone; {t} {coupled[t]}")
    for name in ("ld_alpha", "use_weighting"):
        if o.get(name) not in (None, False):
            raise ValueError(f"grad_in_forward does not support {name}: it needs per-token inputs "
                             "(prefix log-probs, log sum p^2) that this path does not compute; "
                             "use grad_in_forward=False")
    if o["reduction"] != "mean":
        raise ValueError(f"grad_in_forward returns a scalar loss: reduction must be 'mean', "
                         f"got {o['reduction']!r}")
    if kw["impl"] == "reference":
        raise ValueError("grad_in_forward has no eager reference implementation; use "
                         "impl='triton'/'torch'/'auto', or grad_in_forward=False")
    # an FSDP2-sharded head (DTensor) gathered once, as get_logps_from_hidden does
    weight, bias = _common.full_tensor(weight), _common.full_tensor(bias)
    check_head_args(hidden, weight, bias, reduction="sum", temperature=kw["temperature"],
                    softcap=kw["softcap"], impl=kw["impl"], head_dtype=None,
                    chunk_size=kw["chunk_size"])
    n = hidden.shape[0]
    if n % 2:
        raise ValueError(f"hidden has batch {n}; expected the concatenated [chosen; rejected] (even)")
    B = n // 2
    T = hidden.shape[1]
    tg = _common.check_targets((n, T), hidden.device, input_ids, response_mask, None, -100, "hidden")
    # Stand-ins for the pairs not yet computed: finite values (mean log-prob -1 per token). For a
    # separable loss the gradient w.r.t. pair i does not depend on them. The counts are the real
    # ones (the mask's), as sft's denominator, the batch's chosen tokens, needs.
    w = response_mask[:, 1:].to(torch.float32) if response_mask is not None else \
        torch.ones((n, max(T - 1, 0)), device=hidden.device)
    counts_all = w.sum(-1)
    stand_in = -counts_all.clamp_min(1.0)
    rc, rr = _split(ref_logps, "ref_logps") if ref_logps is not None else (None, None)
    pair = torch.arange(B, device=hidden.device)  # pair i: chosen i, rejected i + B

    def coef_fn(sel, logps_g, counts_g):
        # sel: the group's sequences (a device tensor: no host list, no sync), all its pairs at
        # once. Copies (float64 for float64 inputs: an exact coefficient); the stand-ins stay
        # untouched.
        logps = stand_in.to(logps_g.dtype, copy=True).index_copy_(0, sel, logps_g)
        counts = counts_all.to(logps_g.dtype, copy=True).index_copy_(0, sel, counts_g)
        nc, nr = _split(counts, "counts")
        with torch.enable_grad():  # the pass itself runs under no_grad
            logps.requires_grad_(True)
            pc, pr = _split(logps, "hidden")
            loss, _ = dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, **loss_kwargs)
            (grad,) = torch.autograd.grad(loss, logps)
        return grad.index_select(0, sel)

    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    with torch.no_grad():
        logps, counts, bad, dh, dW, db = grouped_logps_and_grads(
            hidden.detach(), weight.detach(), bias.detach() if bias is not None else None,
            tg.labels, tg.mask, units=torch.stack([pair, pair + B], 1), coef_fn=coef_fn,
            units_per_group=pairs_per_group,
            temperature=kw["temperature"], softcap=kw["softcap"], impl=kw["impl"],
            chunk_size=kw["chunk_size"], need_h=needs[0], need_w=needs[1], need_b=needs[2])
    if kw["validate"]:
        _common.check_bad_count(bad, tg, weight.shape[0], 1)
    pc, pr = _split(logps, "hidden")
    nc, nr = _split(counts, "counts")
    loss, metrics = dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, **loss_kwargs)
    loss = _AttachGrads.apply(loss, hidden, weight, bias, dh, dW, db)
    return loss, metrics


# dpo_loss's keyword options, less the token counts that dpo_loss_from_hidden supplies itself.
_LOSS_OPTIONS = {
    name: p for name, p in inspect.signature(dpo_loss).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("chosen_counts", "rejected_counts")
}


class FusedDPOLoss(torch.nn.Module):
    """Module form of `dpo_loss_from_hidden` holding the loss options.

    >>> loss_fn = FusedDPOLoss(beta=0.1, loss_type="sigmoid")
    >>> loss, metrics = loss_fn(hidden, lm_head.weight, ids, mask, ref_logps=ref)
    """

    def __init__(self, *, temperature: float = 1.0, softcap: float | None = None,
                 impl: str = "auto", chunk_size: int | None = None, grad_in_forward: bool = False,
                 pairs_per_group: int | None = None, validate: bool = True, **loss_kwargs):
        super().__init__()
        self.options = dict(temperature=temperature, softcap=softcap, impl=impl,
                            chunk_size=chunk_size, grad_in_forward=grad_in_forward,
                            pairs_per_group=pairs_per_group, validate=validate)
        self.loss_kwargs = loss_kwargs
        # Fail at construction, not at the first batch: an unknown name (a typo such as `losstype`)
        # and a bad value alike.
        unknown = sorted(set(loss_kwargs) - set(_LOSS_OPTIONS))
        if unknown:
            raise TypeError(f"FusedDPOLoss got unknown keyword(s) {unknown}; "
                            f"loss options are {list(_LOSS_OPTIONS)}")
        _check_pairs_per_group(pairs_per_group, grad_in_forward)
        defaults = {k: p.default for k, p in _LOSS_OPTIONS.items()}
        o = {**defaults, **loss_kwargs}
        check_loss_options(o["loss_type"], o["loss_weights"], o["beta"], o["label_smoothing"],
                           o["reduction"], o["rpo_alpha"], o["simpo_gamma"], o["discopop_tau"])

    def forward(self, hidden, weight, input_ids, response_mask, **kw):
        return dpo_loss_from_hidden(hidden, weight, input_ids, response_mask,
                                    **self.options, **self.loss_kwargs, **kw)
