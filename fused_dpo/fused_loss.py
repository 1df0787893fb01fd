"""DPO loss straight from hidden states: policy log-probs through `get_logps_from_hidden` (no
logits), reference log-probs precomputed or computed under no_grad in the same call, then the loss
from `fused_dpo.losses`."""

from __future__ import annotations

import inspect

import torch

from .hidden import get_logps_from_hidden
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
    **loss_kwargs,
):
    """DPO-family loss for a concatenated [chosen; rejected] batch of 2B sequences.

    Args:
        hidden: (2B, T, H) policy final hidden states; rows 0..B-1 chosen, B..2B-1 rejected.
        weight: (V, H) policy lm_head weight (bias optional).
        input_ids, response_mask: (2B, T).
        ref_logps: (2B,) precomputed reference log-probs, or
        ref_hidden + ref_weight (+ ref_bias): reference hidden states and head, run under no_grad.
        **loss_kwargs: passed to `fused_dpo.losses.dpo_loss` (loss_type, beta, ...).

    Returns:
        (loss, metrics) as `dpo_loss`; token counts are supplied automatically.
    """
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("pass ref_logps or ref_hidden/ref_weight, not both")
    kw = dict(temperature=temperature, softcap=softcap, impl=impl, chunk_size=chunk_size)
    logps, counts = get_logps_from_hidden(hidden, weight, input_ids, response_mask, bias=bias,
                                          return_counts=True, **kw)
    if ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_hidden needs ref_weight")
        with torch.no_grad():
            ref_logps = get_logps_from_hidden(ref_hidden, ref_weight, input_ids, response_mask,
                                              bias=ref_bias, **kw)
    if ref_logps is not None and ref_logps.shape != logps.shape:
        raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}; expected {tuple(logps.shape)}")
    pc, pr = _split(logps, "hidden")
    rc, rr = _split(ref_logps, "ref_logps") if ref_logps is not None else (None, None)
    nc, nr = _split(counts, "counts")
    return dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, **loss_kwargs)


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
                 impl: str = "auto", chunk_size: int | None = None, **loss_kwargs):
        super().__init__()
        self.options = dict(temperature=temperature, softcap=softcap, impl=impl,
                            chunk_size=chunk_size)
        self.loss_kwargs = loss_kwargs
        # Fail at construction, not at the first batch: an unknown name (a typo such as `losstype`)
        # and a bad value alike.
        unknown = sorted(set(loss_kwargs) - set(_LOSS_OPTIONS))
        if unknown:
            raise TypeError(f"FusedDPOLoss got unknown keyword(s) {unknown}; "
                            f"loss options are {list(_LOSS_OPTIONS)}")
        defaults = {k: p.default for k, p in _LOSS_OPTIONS.items()}
        o = {**defaults, **loss_kwargs}
        check_loss_options(o["loss_type"], o["loss_weights"], o["beta"], o["label_smoothing"],
                           o["reduction"], o["rpo_alpha"], o["simpo_gamma"], o["discopop_tau"])

    def forward(self, hidden, weight, input_ids, response_mask, **kw):
        return dpo_loss_from_hidden(hidden, weight, input_ids, response_mask,
                                    **self.options, **self.loss_kwargs, **kw)
