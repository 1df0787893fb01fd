"""`get_logps`: per-sequence log-probabilities of the response tokens, from logits."""

from __future__ import annotations

import torch

from . import _common
from .reference import get_logps_reference, reduce_token_logps


class _TokenLogps(torch.autograd.Function):
    """logits (B, T, V) -> weighted per-token log-probs (B, T-1), 0 at non-response positions."""

    @staticmethod
    def forward(ctx, logits, tg: _common.Targets, inv_temp, softcap, rows, inplace_backward):
        x = logits[:, :-1]
        lse, zy = rows.row_stats(
            x, tg.targets, tg.kernel_weights, tg.ignore_index, 0, inv_temp, softcap
        )
        w = tg.weights.to(lse.dtype)
        tok = torch.where(w != 0, w * (zy - lse), 0.0)
        ctx.save_for_backward(logits, tg.targets, w, lse)
        ctx.args = (inv_temp, softcap, rows, inplace_backward)
        return tok

    @staticmethod
    def backward(ctx, grad_tok):
        logits, targets, w, lse = ctx.saved_tensors
        inv_temp, softcap, rows, inplace_backward = ctx.args
        # where, not a product: a NaN upstream must not turn prompt rows (w == 0) into reads.
        coef = torch.where(w != 0, grad_tok * w, 0.0).contiguous()
        if inplace_backward:
            grad = logits
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        rows.row_grad(logits[:, :-1], grad[:, :-1], targets, coef, lse, 0, inv_temp, softcap)
        grad[:, -1].zero_()  # the last position predicts nothing
        return grad, None, None, None, None, None


def get_logps(
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
    impl: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
):
    """Log-probability of each sequence's response tokens, fused: no (B, T, V) float32 tensor.

    Computes exactly::

        z = softcap(logits[:, :-1]) / temperature     # position t predicts token t+1
        logps = log_softmax(z.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        out = (logps * response_mask[:, 1:]).sum(-1)

    with softcap(x) = c * tanh(x / c) (Gemma 2) when `softcap=c` is given.

    Args:
        logits: (B, T, V) float32 / bfloat16 / float16 (float64 for tests), any strides.
        input_ids: (B, T) int32/int64 token ids.
        response_mask: (B, T) bool/int/float, nonzero at response tokens; its values weight the
            tokens. None counts every position.
        labels: (B, T) ids in the HF/TRL convention instead of input_ids + response_mask: aligned
            with input_ids, `ignore_index` marks positions that do not count.
        reduction: "sum" -> (B,); "mean" -> sum / response-token count, 0 when the count is 0;
            "none" -> (B, T-1) per-token log-probs, 0 at non-response positions.
        return_counts: also return the (B,) response-token counts (sum of the weights).
        temperature, softcap: applied inside the kernel, gradients included.
        impl: "triton" (CUDA), "torch" (chunked PyTorch, never an (N, V) float32 tensor),
            "reference" (the eager code in fused_dpo.reference), "auto" = triton on CUDA, else torch.
        inplace_backward: write the logits gradient into the logits' own storage (saves one
            B*T*V buffer). The logits are OVERWRITTEN by backward: use only when nothing else
            needs them afterwards.
        validate: check that label ids at response positions lie in [0, V); this needs one host
            sync. With validate=False an out-of-range id gives NaN, never a wrong number.

    Returns:
        float32 (float64 for float64 logits) tensor as per `reduction`; with return_counts a
        tuple (logps, counts). Non-response positions are never read, so NaN there is ignored;
        NaN or inf in a response row gives NaN for that sequence.
    """
    _common.check_float("logits", logits, 3)
    _common.check_options(reduction, temperature, softcap, impl)
    B, T, V = logits.shape
    if T < 1 or V < 1:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; need T >= 1 and V >= 1")
    tg = _common.prepare_targets(
        (B, T), V, logits.device, input_ids, response_mask, labels, ignore_index, validate, "logits"
    )
    if impl == "reference":
        return get_logps_reference(
            logits, input_ids, response_mask, labels=labels, ignore_index=ignore_index,
            reduction=reduction, return_counts=return_counts, temperature=temperature,
            softcap=softcap,
        )
    rows = _common.backend(impl, logits.device)
    tok = _TokenLogps.apply(logits, tg, 1.0 / temperature, softcap, rows, inplace_backward)
    return reduce_token_logps(tok, tg.weights.to(tok.dtype), reduction, return_counts)
