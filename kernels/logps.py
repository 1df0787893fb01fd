"""Row kernels for token log-probabilities under a (softcapped, tempered) softmax.

A "row" is one vector of V logits x; with z = softcap(x) / tau, where softcap(x) = c * tanh(x / c)
(identity when no cap is set):

    forward:   lse = log sum_v exp(z_v)          zy = z[label - label_shift]  (NaN if out of range)
    backward:  dx_v = coef * (onehot(label - label_shift)_v - exp(z_v - lse)) * dz_v/dx_v
               dz/dx = (1 - tanh(x / c)^2) / tau   (1 / tau without a cap)

Rows are addressed as (b, r) with arbitrary strides, so a `logits[:, :-1]` view, a vocab-padded
slice `logits[..., :V]` or one vocab chunk of a matmul output are read in place, never copied.
Rows whose weight (forward) or coefficient (backward) is zero are not read at all: the forward
writes nothing meaningful for them and the backward writes zeros.

All arithmetic is in ACC (fp32, or fp64 for float64 inputs so that gradcheck is meaningful); the
log-sum-exp is online in base 2 (exp2/log2 with LOG2E folded into the scale).
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _softcap(x, softcap, HAS_SOFTCAP: tl.constexpr):
    # c * tanh(x / c) written with exp2 so it runs unchanged in the interpreter and on any GPU;
    # 1 - 2 / (e^{2u} + 1) saturates cleanly to +-1 for large |u|.
    if HAS_SOFTCAP:
        e = tl.exp2((2.0 * LOG2E / softcap) * x)
        x = softcap * (1.0 - 2.0 / (e + 1.0))
    return x


@triton.jit
def _row_stats_kernel(
    x_ptr, labels_ptr, weights_ptr, lse_ptr, zy_ptr,
    R, V,
    stride_xb, stride_xr, stride_xv,
    stride_lb, stride_lr,
    stride_wb, stride_wr,
    ignore_index, label_shift, inv_temp, softcap,
    HAS_WEIGHTS: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    LANE_MAX: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // R
    r = row % R
    label = tl.load(labels_ptr + b * stride_lb + r * stride_lr).to(tl.int64)
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + b * stride_wb + r * stride_wr).to(ACC)
    else:
        w = tl.full([], 1.0, ACC)
    if HAS_IGNORE:
        w = tl.where(label == ignore_index, 0.0, w)

    lse = w * 0.0
    zy = w * 0.0
    if w != 0.0:
        x_row = x_ptr + b * stride_xb + r * stride_xr
        scale = inv_temp * LOG2E  # z2 = z * LOG2E: the base-2 exponent
        # Running max m and lane-wise sums s (sum_lane s * 2^m = sum 2^z2). Two variants, chosen
        # at compile time: a block-wide max (one exp2 per element, one cross-warp max reduction
        # per block) or a per-lane max (no reduction inside the loop, two exp2 per element).
        if LANE_MAX:
            m = tl.full([BLOCK_V], float("-inf"), ACC)
        else:
            m = tl.full([], float("-inf"), ACC)
        s = tl.zeros([BLOCK_V], ACC)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            inside = cols < V
            x = tl.load(x_row + cols * stride_xv, mask=inside, other=0.0).to(ACC)
            # Re-mask after the transform: softcap would map a -inf pad to -c, not -inf.
            z2 = tl.where(inside, _softcap(x, softcap, HAS_SOFTCAP) * scale, float("-inf"))
            if LANE_MAX:
                m_new = tl.maximum(m, z2)
            else:
                m_new = tl.maximum(m, tl.max(z2, 0))
            # A block (or row prefix) of only -inf would give exp2(-inf - -inf) = NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp2(m - m_ref) + tl.exp2(z2 - m_ref)
            m = m_new
        if LANE_MAX:
            m_row = tl.max(m, 0)
            m_row_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
            s = s * tl.exp2(m - m_row_ref)
            m = m_row
        lse = (m + tl.log2(tl.sum(s, 0))) * LN2
        col = label - label_shift
        in_range = (col >= 0) & (col < V)
        xy = tl.load(x_row + col * stride_xv, mask=in_range, other=float("nan")).to(ACC)
        zy = _softcap(xy, softcap, HAS_SOFTCAP) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(zy_ptr + row, zy)


@triton.jit
def _row_grad_kernel(
    x_ptr, grad_ptr, labels_ptr, coef_ptr, lse_ptr,
    R, V,
    stride_xb, stride_xr, stride_xv,
    stride_gb, stride_gr, stride_gv,
    stride_lb, stride_lr,
    label_shift, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // R
    r = row % R
    c = tl.load(coef_ptr + row).to(ACC)
    g_row = grad_ptr + b * stride_gb + r * stride_gr
    if c != 0.0:
        x_row = x_ptr + b * stride_xb + r * stride_xr
        col_y = tl.load(labels_ptr + b * stride_lb + r * stride_lr).to(tl.int64) - label_shift
        lse2 = tl.load(lse_ptr + row).to(ACC) * LOG2E
        scale = inv_temp * LOG2E
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            inside = cols < V
            x = tl.load(x_row + cols * stride_xv, mask=inside, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                e = tl.exp2((2.0 * LOG2E / softcap) * x)
                th = 1.0 - 2.0 / (e + 1.0)
                z2 = softcap * th * scale
                dzdx = (1.0 - th * th) * inv_temp
            else:
                z2 = x * scale
                dzdx = inv_temp
            p = tl.exp2(z2 - lse2)
            dz = tl.where(cols == col_y, c - c * p, -c * p)
            tl.store(g_row + cols * stride_gv, (dz * dzdx).to(grad_ptr.dtype.element_ty), mask=inside)
    else:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty)
            tl.store(g_row + cols * stride_gv, zeros, mask=cols < V)


_ACC = {torch.float64: tl.float64}


def lane_max() -> bool:
    """FUSED_DPO_LSE=lane selects the per-lane-max forward (for A/B on a GPU); default block."""
    mode = os.environ.get("FUSED_DPO_LSE", "block")
    if mode not in ("block", "lane"):
        raise ValueError(f"FUSED_DPO_LSE must be 'block' or 'lane', got {mode!r}")
    return mode == "lane"


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of V logits.

    Provisional rule, not yet measured on a GPU: 16 elements per thread at 8 warps keeps each
    program's loads 16 B wide and in flight while the per-block max/sum reductions stay a small
    share of the work. bench/gpu_check.sh sweeps this table on the card so the rule can be fixed
    with a measurement; FUSED_DPO_BLOCK_V overrides it for that sweep.
    """
    block = int(os.environ.get("FUSED_DPO_BLOCK_V", "4096"))
    block = min(block, triton.next_power_of_2(V))
    num_warps = 8 if block >= 2048 else 4
    return block, num_warps


def _check_offsets(x: torch.Tensor, V: int) -> None:
    # Row offsets are int64 (b * stride_b, r * stride_r); column offsets `cols * stride_v` stay
    # int32 so that a unit vocab stride keeps 16 B vector loads. That is exact while one row spans
    # less than 2**31 elements, which every (.., V) layout with a small vocab stride satisfies.
    if V * abs(x.stride(-1)) >= 2**31:
        raise ValueError(
            f"a row of {V} logits with vocab stride {x.stride(-1)} spans >= 2**31 elements; "
            "make the vocab dimension contiguous"
        )


def row_stats(
    x: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    ignore_index: int | None,
    label_shift: int,
    inv_temp: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """lse and the label's transformed logit for every row of x (B, R, V), each (B, R).

    Rows whose weight is 0 (or whose label equals ignore_index) are not read; their outputs are 0.
    """
    B, R, V = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lse = torch.empty((B, R), dtype=acc, device=x.device)
    zy = torch.empty((B, R), dtype=acc, device=x.device)
    if B * R == 0:
        return lse, zy
    _check_offsets(x, V)
    block, warps = launch_config(V)
    w = weights if weights is not None else labels  # placeholder pointer, never read
    _row_stats_kernel[(B * R,)](
        x, labels, w, lse, zy,
        R, V,
        *x.stride(), *labels.stride(), *w.stride(),
        ignore_index if ignore_index is not None else 0, label_shift, inv_temp,
        softcap if softcap is not None else 1.0,
        HAS_WEIGHTS=weights is not None, HAS_IGNORE=ignore_index is not None,
        HAS_SOFTCAP=softcap is not None, LANE_MAX=lane_max(), ACC=_ACC.get(x.dtype, tl.float32),
        BLOCK_V=block, num_warps=warps,
    )
    return lse, zy


def row_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    labels: torch.Tensor,
    coef: torch.Tensor,
    lse: torch.Tensor,
    label_shift: int,
    inv_temp: float,
    softcap: float | None,
) -> None:
    """Write coef * (onehot - softmax) * dz/dx for every row of x (B, R, V) into grad (B, R, V).

    coef and lse are contiguous (B, R). Rows with coef == 0 get zeros without reading x. grad may
    alias x (in-place backward): each element is read before it is written by the same program.
    """
    B, R, V = x.shape
    if B * R == 0:
        return
    _check_offsets(x, V)
    _check_offsets(grad, V)
    block, warps = launch_config(V)
    _row_grad_kernel[(B * R,)](
        x, grad, labels, coef, lse,
        R, V,
        *x.stride(), *grad.stride(), *labels.stride(),
        label_shift, inv_temp, softcap if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, ACC=_ACC.get(x.dtype, tl.float32),
        BLOCK_V=block, num_warps=warps,
    )
