"""`get_logps_from_hidden`: the same log-probs from hidden states and the lm_head, no logits.

Only response positions are kept (compacted to M rows); the vocabulary is walked in chunks of
`chunk_size` columns, so the largest temporary is one (M, chunk) block of logits:

    forward:  for each chunk c:  L_c = h @ W_c.T + b_c;  lse <- logaddexp(lse, lse(L_c));  pick z_y
    backward: for each chunk c:  L_c again;  G_c = g * (onehot - softmax) * dz/dx   (in place)
              dW_c = G_c.T @ h   (one matmul per slice: float32 accumulation inside, no big buffer)
              dh  += G_c @ W_c   (float32 accumulator, M x H)

Forward + backward costs four (M, H, V) matmuls; the row math runs in the same kernels as the
logits path (Triton) or their chunked PyTorch twin.
"""

from __future__ import annotations

import os

import torch

from . import _common
from .reference import get_logps_from_hidden_reference, reduce_token_logps

_DEFAULT_CHUNK_BYTES = 256 * 2**20


def auto_chunk_size(M: int, V: int, itemsize: int) -> int:
    """Vocab columns per chunk so one (M, chunk) logits block stays near 256 MiB (env
    FUSED_DPO_HIDDEN_CHUNK_BYTES overrides); a multiple of 256 for matmul-friendly shapes."""
    budget = int(os.environ.get("FUSED_DPO_HIDDEN_CHUNK_BYTES", str(_DEFAULT_CHUNK_BYTES)))
    cols = budget // max(1, M * itemsize)
    cols = max(256, cols // 256 * 256)
    return min(V, cols)


def _chunk_logits(h, W, bias, v0, v1):
    if bias is None:
        return h @ W[v0:v1].T
    return torch.addmm(bias[v0:v1], h, W[v0:v1].T)


class _HiddenRowLogps(torch.autograd.Function):
    """h (M, H), W (V, H), bias (V,) | None, labels (M,) -> log p(label) per row, (M,)."""

    @staticmethod
    def forward(ctx, h, W, bias, labels, inv_temp, softcap, rows, chunk):
        M, V = h.shape[0], W.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        lse = torch.full((M,), float("-inf"), dtype=acc, device=h.device)
        zy = torch.full((M,), float("nan"), dtype=acc, device=h.device)
        lab = labels[None]
        for v0 in range(0, V, chunk):
            v1 = min(V, v0 + chunk)
            logits = _chunk_logits(h, W, bias, v0, v1)
            lse_c, zy_c = rows.row_stats(logits[None], lab, None, None, v0, inv_temp, softcap)
            lse = torch.logaddexp(lse, lse_c[0])
            zy = torch.where((labels >= v0) & (labels < v1), zy_c[0], zy)
        ctx.save_for_backward(h, W, bias, labels, lse)
        ctx.args = (inv_temp, softcap, rows, chunk)
        return zy - lse

    @staticmethod
    def backward(ctx, grad):
        h, W, bias, labels, lse = ctx.saved_tensors
        inv_temp, softcap, rows, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        V = W.shape[0]
        coef = grad.to(lse.dtype).contiguous()[None]
        dh = torch.zeros(h.shape, dtype=lse.dtype, device=h.device) if need_h else None
        dW = torch.empty_like(W) if need_w else None
        db = torch.empty(V, dtype=lse.dtype, device=h.device) if need_b else None
        for v0 in range(0, V, chunk):
            v1 = min(V, v0 + chunk)
            g = _chunk_logits(h, W, bias, v0, v1)
            rows.row_grad(g[None], g[None], labels[None], coef, lse[None], v0, inv_temp, softcap)
            if need_w:
                torch.mm(g.T, h, out=dW[v0:v1])
            if need_h:
                dh += g @ W[v0:v1]
            if need_b:
                db[v0:v1] = g.sum(0, dtype=lse.dtype)
        return (
            dh.to(h.dtype) if need_h else None,
            dW,
            db.to(bias.dtype) if need_b else None,
            None, None, None, None, None,
        )


def get_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    return_counts: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    validate: bool = True,
):
    """`get_logps(hidden @ weight.T + bias, ...)` without ever building the (B, T, V) logits.

    Args:
        hidden: (B, T, H) final hidden states (after the model's last norm).
        weight: (V, H) lm_head weight; bias: optional (V,). Same dtype as hidden.
        input_ids, response_mask, labels, ignore_index, reduction, return_counts, temperature,
        softcap, validate: exactly as in `fused_dpo.get_logps`.
        impl: "triton" (cuBLAS matmuls + the Triton row kernels), "torch" (chunked PyTorch),
            "reference" (eager, builds the logits), "auto" = triton on CUDA, else torch.
        chunk_size: vocab columns per chunk; default keeps one (M, chunk) block near 256 MiB,
            with M the number of response positions.

    Returns:
        As `get_logps`. Gradients flow to hidden, weight and bias. Finding the response
        positions needs one host sync.
    """
    _common.check_float("hidden", hidden, 3)
    _common.check_float("weight", weight, 2)
    _common.check_options(reduction, temperature, softcap, impl)
    B, T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden has H = {H}")
    if bias is not None:
        _common.check_float("bias", bias, 1)
        if bias.shape[0] != V:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has V = {V}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if T < 1 or V < 1:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)} and V = {V}; need T, V >= 1")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    tg = _common.prepare_targets(
        (B, T), V, hidden.device, input_ids, response_mask, labels, ignore_index, validate, "hidden"
    )
    if impl == "reference":
        return get_logps_from_hidden_reference(
            hidden, weight, input_ids, response_mask, bias=bias, labels=labels,
            ignore_index=ignore_index, reduction=reduction, return_counts=return_counts,
            temperature=temperature, softcap=softcap,
        )
    rows = _common.backend(impl, hidden.device)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = tg.weights.to(acc).reshape(-1)
    idx = (w != 0).nonzero().squeeze(1)  # compacted (b, t) of response positions
    M = idx.numel()
    # Row (b, t) of the shifted problem is row b * T + t of hidden viewed as (B * T, H).
    src = idx // (T - 1) * T + idx % (T - 1) if T > 1 else idx
    h_rows = hidden.reshape(B * T, H).index_select(0, src)
    lab_rows = tg.targets.reshape(-1).index_select(0, idx)
    chunk = chunk_size or auto_chunk_size(M, V, hidden.element_size())
    row_logps = _HiddenRowLogps.apply(h_rows, weight, bias, lab_rows, 1.0 / temperature, softcap, rows, chunk)
    tok = torch.zeros(B * max(T - 1, 0), dtype=acc, device=hidden.device)
    tok = tok.index_put((idx,), w.index_select(0, idx) * row_logps).view(B, max(T - 1, 0))
    return reduce_token_logps(tok, w.view(tok.shape), reduction, return_counts)
