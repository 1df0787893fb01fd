"""Row kernels for token log-probabilities under a (softcapped, tempered) softmax.

A "row" is one vector of V logits x scoring one label y (a vocabulary id); with
z = softcap(x) * inv_temp, softcap(x) = c * tanh(x / c) (identity without a cap):

    statistics:  m = max_v z_v        logs = log sum_v exp(z_v - m)        zy = z[y - vocab_start]
    log-prob:    tok = w * ((zy - m) - logs)      (w: the row's token weight, 0 = not scored)
    gradient:    dx_v = coef * (onehot(y - vocab_start)_v - exp((z_v - m) - logs)) * dz_v/dx_v
                 dz/dx = (1 - tanh(x / c)^2) * inv_temp   (inv_temp without a cap)

The log-prob is formed as (zy - m) - logs, never zy - (m + logs): at |logits| ~ 1e3-3e4 the sum
m + logs rounds away the digits the difference needs (float32 ulp(3e4) = 2e-3).

Statistics (STATS, for `stats=`), in the same pass: with p = softmax(z),

    entropy H = lse - sum p z = log s - sum p (z - m)    (relative to m: no cancellation at |z| ~ 1e4)
    log sum p^2 = log sum e^{2 (z - m)} - 2 log s,   mean logit = sum z / V,
    top-1: zy >= m and zy > max z over the columns before the label (torch.argmax's first maximum)
    d H / d z_v = -p_v (log p_v + H)                    (ENT_GRAD, added in the same backward)

Three kernels:
  _row_stats_kernel   one program per row: online max / sum-of-exp in ACC, the label's z, the weight.
                      ACCUMULATE merges into the statistics of earlier vocabulary chunks (the
                      hidden-state path walks the vocabulary chunk by chunk).
  _seq_reduce_kernel  one program per sequence: forms tok, writes it (reduction "none") or its
                      weighted sum / mean, the weight sum (count), and the number of scored labels
                      outside [0, V) for validation. Deterministic order: no atomics. With
                      HAS_SEGMENTS (packed sequences) a program reduces one cu_seqlens segment of
                      a single row instead of a batch row.
  _row_grad_kernel    one program per logits row: the coefficient from the upstream gradient, the
                      weight and the count (per `REDUCTION`), then the row's gradient. Rows that are
                      not scored (prompt, the unshifted last position) are written as zeros, unread.

Addressing. Row (b, r) of the scored problem reads its label and weight at (b, r + shift) of the
(B, T) ids and mask, so the shifted call needs no sliced copies. Logits rows are addressed with
arbitrary strides (a `logits[:, :-1]` view, a vocab-padded slice, one vocab chunk of a matmul
output are read in place). With HAS_ROW_INDEX, program i reads logits row i of a compacted (M, V)
block and scores flat position idx[i] = b * R + r (the hidden-state path's response rows).
Statistics are contiguous (B, R) in ACC (fp32; fp64 for float64 inputs so gradcheck is exact).
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Reduction codes shared with the host side.
SUM, MEAN, NONE = 0, 1, 2
REDUCTION_CODE = {"sum": SUM, "mean": MEAN, "none": NONE}


@triton.jit
def _transform(x, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    # softcap(x) * inv_temp; c * tanh(x / c) = c * (1 - 2 / (e^{2x/c} + 1)) saturates cleanly to
    # +-c for large |x| and runs unchanged in the interpreter and on any GPU.
    if HAS_SOFTCAP:
        e = tl.exp((2.0 / softcap) * x)
        x = softcap * (1.0 - 2.0 / (e + 1.0))
    return x * inv_temp


@triton.jit
def _stats_block(x_row, v0, V, stride_xv, inv_temp, softcap, col_lim, m, s, s_row, u, q, szt, mbt,
                 HAS_SOFTCAP: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """One block of _row_stats_kernel's online reduction: columns [v0, v0 + BLOCK_V), masked to
    V only for the tail (MASKED)."""
    cols = v0 + tl.arange(0, BLOCK_V)
    if MASKED:
        inside = cols < V
        x = tl.load(x_row + cols * stride_xv, mask=inside, other=0.0).to(ACC)
        zt = _transform(x, inv_temp, softcap, HAS_SOFTCAP)  # 0 at the padding (x = 0 there)
        # Re-mask after the transform: a softcap would map a -inf pad to -c, not -inf.
        z = tl.where(inside, zt, float("-inf"))
    else:
        x = tl.load(x_row + cols * stride_xv).to(ACC)
        zt = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
        z = zt
    m_new = tl.maximum(m, tl.max(z, 0))
    # A block (or row prefix) of only -inf would give exp(-inf - -inf) = NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    d = z - m_ref
    e = tl.exp(d)
    if STATS:
        # Move u from reference m to m_ref: sum e'(z - m_ref) = alpha (u + (m - m_ref) s);
        # e (z - m_ref) is 0, not NaN, where z = -inf.
        shift_ref = tl.where(m == float("-inf"), 0.0, m - m_ref)
        u = alpha * (u + shift_ref * s_row) + tl.sum(tl.where(e > 0.0, e * d, 0.0), 0)
        s_row = s_row * alpha + tl.sum(e, 0)
        q = (alpha * alpha) * q + tl.sum(e * e, 0)
        szt += tl.sum(zt, 0)
        mbt = tl.maximum(mbt, tl.max(tl.where(cols < col_lim, z, float("-inf")), 0))
    else:
        s = s * alpha + e
    return m_new, s, s_row, u, q, szt, mbt


@triton.jit
def _row_stats_kernel(
    x_ptr, labels_ptr, mask_ptr, idx_ptr, zy_ptr, m_ptr, logs_ptr, w_ptr,
    pz_ptr, lq_ptr, sz_ptr, mb_ptr,
    R, V, shift, vocab_start, ignore_index, inv_temp, softcap,
    stride_xb, stride_xr, stride_xv,
    stride_lb, stride_lt,
    stride_mb, stride_mt,
    HAS_MASK: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ROW_INDEX: tl.constexpr, ACCUMULATE: tl.constexpr, STATS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROW_INDEX:
        flat = tl.load(idx_ptr + pid).to(tl.int64)
        x_row = x_ptr + pid * stride_xr
    else:
        flat = pid
        x_row = x_ptr + (pid // R) * stride_xb + (pid % R) * stride_xr
    b = flat // R
    t = flat % R + shift
    label = tl.load(labels_ptr + b * stride_lb + t * stride_lt).to(tl.int64)
    if HAS_MASK:
        w = tl.load(mask_ptr + b * stride_mb + t * stride_mt).to(ACC)
    else:
        w = tl.full([], 1.0, ACC)
    if HAS_IGNORE:
        w = tl.where(label == ignore_index, 0.0, w)

    zero = w * 0.0
    if w != 0.0:
        col = label - vocab_start
        # Running max m (block-wide) and sums relative to it: sum exp(z) = exp(m) * sum s.
        m = tl.full([], float("-inf"), ACC)
        # With STATS, per row, each block reduced as it comes (five lane-wise accumulators would
        # take 128 registers a thread at 4096 x bf16 and halve the loads in flight; as scalars,
        # 38-40 at 16 warps, no spills, ptxas for sm_90; see stats_warps):
        # s_row = sum e, u = sum e (z - m) (entropy), q = sum e^2 (sum of p^2),
        # szt = sum z (mean logit), mbt = max z over the columns before the label (top-1).
        # Without, the scalars are dead code and s is lane-wise: one reduction per row, after
        # the loop.
        s_row = tl.zeros([], ACC)
        u = tl.zeros([], ACC)
        q = tl.zeros([], ACC)
        szt = tl.zeros([], ACC)
        mbt = tl.full([], float("-inf"), ACC)
        # the label's column clamped to [0, V], as int32: an int64 compare in the loop would
        # widen every column index (16 more registers a thread)
        col_lim = tl.minimum(tl.maximum(col, 0), V).to(tl.int32)
        if STATS:
            s = tl.zeros([1], ACC)  # unused
        else:
            s = tl.zeros([BLOCK_V], ACC)
        # One masked tail block, then the full blocks unmasked: a `cols < V` mask with V not a
        # multiple of 16 (a [..., :151643] view of a 151936-wide tensor, an odd vocab chunk) makes
        # every load of the row a 2-byte scalar one (ptxas for sm_90), though the rows are
        # aligned. The tail goes first, before any state is carried: after the loop, its scalar
        # addresses beside the loop's state made ptxas spill (fp32, 8 warps, sm_90 and sm_80).
        # NUM_STAGES > 1: the next block's load is issued (cp.async into shared memory) while this
        # one is reduced, so more bytes are in flight per program.
        v_full = V // BLOCK_V * BLOCK_V
        if v_full < V:
            m, s, s_row, u, q, szt, mbt = _stats_block(
                x_row, v_full, V, stride_xv, inv_temp, softcap, col_lim, m, s, s_row, u, q, szt,
                mbt, HAS_SOFTCAP, STATS, True, ACC, BLOCK_V)
        for v0 in tl.range(0, v_full, BLOCK_V, num_stages=NUM_STAGES):
            m, s, s_row, u, q, szt, mbt = _stats_block(
                x_row, v0, V, stride_xv, inv_temp, softcap, col_lim, m, s, s_row, u, q, szt, mbt,
                HAS_SOFTCAP, STATS, False, ACC, BLOCK_V)
        if STATS:
            s_tot = s_row
        else:
            s_tot = tl.sum(s, 0)
        logs = tl.log(s_tot)
        in_range = (col >= 0) & (col < V)
        xy = tl.load(x_row + col * stride_xv, mask=in_range, other=float("nan")).to(ACC)
        zy = _transform(xy, inv_temp, softcap, HAS_SOFTCAP)
        if STATS:
            # Relative to the row's own max: sum p (z - m) and log sum p^2 = log q - 2 log s.
            pz = u / s_tot
            lq = tl.log(q) - 2.0 * logs
        if ACCUMULATE:
            # Merge with the earlier chunks' (m, logs); the label's z lives in exactly one chunk.
            m_old = tl.load(m_ptr + flat).to(ACC)
            logs_old = tl.load(logs_ptr + flat).to(ACC)
            m_all = tl.maximum(m_old, m)
            m_all_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
            mass_old = tl.exp(m_old - m_all_ref + logs_old)
            mass_new = tl.exp(m - m_all_ref + logs)
            if STATS:
                # Each chunk's share of the probability mass weighs its sum p (z - m) (moved to the
                # merged max) and its sum p^2.
                tot = mass_old + mass_new
                pi_old = mass_old / tot
                pi_new = mass_new / tot
                pz_old = tl.load(pz_ptr + flat).to(ACC)
                lq_old = tl.load(lq_ptr + flat).to(ACC)
                pz = tl.where(mass_old == 0.0, 0.0, pi_old * (pz_old + (m_old - m_all_ref))) + \
                    tl.where(mass_new == 0.0, 0.0, pi_new * (pz + (m - m_all_ref)))
                # (a chunk of only -inf logits has mass 0 and an undefined lq: it adds nothing;
                # a NaN mass stays NaN)
                lq = tl.log(tl.where(mass_old == 0.0, 0.0, pi_old * pi_old * tl.exp(lq_old)) +
                            tl.where(mass_new == 0.0, 0.0, pi_new * pi_new * tl.exp(lq)))
                szt += tl.load(sz_ptr + flat).to(ACC)
                mbt = tl.maximum(mbt, tl.load(mb_ptr + flat).to(ACC))
            logs = tl.log(mass_old + mass_new)
            m = m_all
            tl.store(zy_ptr + flat, zy, mask=in_range)
        else:
            tl.store(zy_ptr + flat, zy)
        tl.store(m_ptr + flat, m)
        tl.store(logs_ptr + flat, logs)
        if STATS:
            tl.store(pz_ptr + flat, pz)
            tl.store(lq_ptr + flat, lq)
            tl.store(sz_ptr + flat, szt)
            tl.store(mb_ptr + flat, mbt)
    else:
        tl.store(zy_ptr + flat, zero)
        tl.store(m_ptr + flat, zero)
        tl.store(logs_ptr + flat, zero)
        if STATS:
            tl.store(pz_ptr + flat, zero)
            tl.store(lq_ptr + flat, zero)
            tl.store(sz_ptr + flat, zero)
            tl.store(mb_ptr + flat, zero)
    tl.store(w_ptr + flat, w)


@triton.jit
def _rows_block(x_rows, live, v0, V, stride_xv, inv_temp, softcap, m, s,
                HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """One [ROWS, BLOCK_V] tile of _row_stats_rows_kernel; MASKED: the tail, masked to V."""
    cols = v0 + tl.arange(0, BLOCK_V)
    ptrs = x_rows[:, None] + cols[None, :] * stride_xv
    if MASKED:
        inside = cols < V
        x = tl.load(ptrs, mask=live[:, None] & inside[None, :], other=0.0).to(ACC)
        z = tl.where(inside[None, :], _transform(x, inv_temp, softcap, HAS_SOFTCAP), float("-inf"))
    else:
        x = tl.load(ptrs, mask=live[:, None], other=0.0).to(ACC)
        z = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
    m_new = tl.maximum(m, tl.max(z, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref)[:, None] + tl.exp(z - m_ref[:, None])
    return m_new, s


@triton.jit
def _row_stats_rows_kernel(
    x_ptr, labels_ptr, mask_ptr, zy_ptr, m_ptr, logs_ptr, w_ptr,
    N, R, V, shift, ignore_index, inv_temp, softcap,
    stride_xb, stride_xr, stride_xv,
    stride_lb, stride_lt,
    stride_mb, stride_mt,
    HAS_MASK: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """_row_stats_kernel for ROWS rows per program, as one [ROWS, BLOCK_V] tile per step (the
    logits path only: no row index, no accumulation). For short rows (V <= 32768: a handful of
    blocks each), where a program's fixed cost (label and weight loads before the loop, the
    label gather after it) is spread over few bytes. Rows of weight 0 are masked out of the
    loads, so they cost no memory traffic."""
    flat = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    valid = flat < N
    b = flat // R
    t = flat % R + shift
    label = tl.load(labels_ptr + b * stride_lb + t * stride_lt, mask=valid, other=0).to(tl.int64)
    if HAS_MASK:
        w = tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=valid, other=0).to(ACC)
    else:
        w = tl.full([ROWS], 1.0, ACC)
    w = tl.where(valid, w, 0.0)
    if HAS_IGNORE:
        w = tl.where(label == ignore_index, 0.0, w)
    live = w != 0.0
    x_rows = x_ptr + b * stride_xb + (flat % R) * stride_xr
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS, BLOCK_V], ACC)
    # the masked tail, then the full blocks masked by row only (vector loads), as in
    # _row_stats_kernel
    v_full = V // BLOCK_V * BLOCK_V
    if v_full < V:
        m, s = _rows_block(x_rows, live, v_full, V, stride_xv, inv_temp, softcap, m, s,
                           HAS_SOFTCAP, True, ACC, BLOCK_V)
    for v0 in tl.range(0, v_full, BLOCK_V, num_stages=NUM_STAGES):
        m, s = _rows_block(x_rows, live, v0, V, stride_xv, inv_temp, softcap, m, s, HAS_SOFTCAP,
                           False, ACC, BLOCK_V)
    logs = tl.log(tl.sum(s, 1))
    in_range = (label >= 0) & (label < V)
    xy = tl.load(x_rows + label * stride_xv, mask=live & in_range, other=float("nan")).to(ACC)
    zy = _transform(xy, inv_temp, softcap, HAS_SOFTCAP)
    tl.store(zy_ptr + flat, tl.where(live, zy, 0.0), mask=valid)
    tl.store(m_ptr + flat, tl.where(live, m, 0.0), mask=valid)
    tl.store(logs_ptr + flat, tl.where(live, logs, 0.0), mask=valid)
    tl.store(w_ptr + flat, w, mask=valid)


@triton.jit
def _seq_reduce_kernel(
    zy_ptr, m_ptr, logs_ptr, w_ptr, labels_ptr, out_ptr, counts_ptr, bad_ptr,
    pz_ptr, lq_ptr, sz_ptr, mb_ptr, ext_ptr, cu_ptr,
    R, V, shift, stride_lb, stride_lt, stride_ext,
    REDUCTION: tl.constexpr, STATS: tl.constexpr, HAS_SEGMENTS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # 3 * B * R may pass 2**31: widen through b, not stride_ext.to(), because Triton's launcher
    # turns an int argument equal to 1 (one output element) into a constexpr, which has no .to
    stride_ext = b * 0 + stride_ext
    if HAS_SEGMENTS:
        # Packed: program b reduces sequence b of the one (1, R) row, the rows whose targets
        # r + shift lie in [cu[b], cu[b + 1]).
        lo = tl.maximum(tl.load(cu_ptr + b).to(tl.int64) - shift, 0)
        hi = tl.load(cu_ptr + b + 1).to(tl.int64) - shift
        row = b * 0
    else:
        lo = b * 0
        hi = b * 0 + R
        row = b
    total = tl.zeros([BLOCK_R], ACC)
    count = tl.zeros([BLOCK_R], ACC)
    bad = tl.zeros([BLOCK_R], tl.int32)
    if STATS:
        t_ent = tl.zeros([BLOCK_R], ACC)
        t_lq = tl.zeros([BLOCK_R], ACC)
        t_mean = tl.zeros([BLOCK_R], ACC)
        t_top = tl.zeros([BLOCK_R], ACC)
    for r0 in range(lo, hi, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        inside = rr < hi
        o = row * R + rr
        w = tl.load(w_ptr + o, mask=inside, other=0.0)
        zy = tl.load(zy_ptr + o, mask=inside, other=0.0)
        m = tl.load(m_ptr + o, mask=inside, other=0.0)
        logs = tl.load(logs_ptr + o, mask=inside, other=0.0)
        live = w != 0.0
        tok = tl.where(live, w * ((zy - m) - logs), 0.0)
        if REDUCTION == 2:
            tl.store(out_ptr + o, tok, mask=inside)
        total += tok
        count += w
        label = tl.load(labels_ptr + row * stride_lb + (rr + shift) * stride_lt, mask=inside,
                        other=0)
        bad += (live & ((label < 0) | (label >= V))).to(tl.int32)
        if STATS:
            pz = tl.load(pz_ptr + o, mask=inside, other=0.0)
            # entropy = lse - sum p z = log s - sum p (z - m); top-1: the first maximum (argmax)
            ent = tl.where(live, w * (logs - pz), 0.0)
            lq = tl.where(live, w * tl.load(lq_ptr + o, mask=inside, other=0.0), 0.0)
            mean = tl.where(live, w * (tl.load(sz_ptr + o, mask=inside, other=0.0) / V), 0.0)
            mb = tl.load(mb_ptr + o, mask=inside, other=0.0)
            top = tl.where(live & (zy >= m) & (zy > mb), w, 0.0)
            top = tl.where(tok != tok, float("nan"), top)  # a NaN row has NaN statistics
            if REDUCTION == 2:
                tl.store(ext_ptr + o, ent, mask=inside)
                tl.store(ext_ptr + stride_ext + o, lq, mask=inside)
                tl.store(ext_ptr + 2 * stride_ext + o, mean, mask=inside)
                tl.store(ext_ptr + 3 * stride_ext + o, top, mask=inside)
            t_ent += ent
            t_lq += lq
            t_mean += mean
            t_top += top
    t = tl.sum(total, 0)
    c = tl.sum(count, 0)
    safe_c = tl.where(c != 0.0, c, 1.0)
    if REDUCTION == 1:
        t = tl.where(c != 0.0, t / safe_c, 0.0)
    if REDUCTION != 2:
        tl.store(out_ptr + b, t)
        if STATS:
            # "mean" divides by the count as the log-probs do (0 for an empty response)
            if REDUCTION == 1:
                scale = tl.where(c != 0.0, 1.0 / safe_c, 0.0)
            else:
                scale = tl.full([], 1.0, ACC)
            tl.store(ext_ptr + b, tl.sum(t_ent, 0) * scale)
            tl.store(ext_ptr + stride_ext + b, tl.sum(t_lq, 0) * scale)
            tl.store(ext_ptr + 2 * stride_ext + b, tl.sum(t_mean, 0) * scale)
            tl.store(ext_ptr + 3 * stride_ext + b, tl.sum(t_top, 0) * scale)
    tl.store(counts_ptr + b, c)
    tl.store(bad_ptr + b, tl.sum(bad, 0))


@triton.jit
def _row_grad_kernel(
    x_ptr, grad_ptr, labels_ptr, idx_ptr, m_ptr, logs_ptr, w_ptr, gout_ptr, counts_ptr,
    pz_ptr, gent_ptr,
    R, rows_per_seq, V, shift, vocab_start, inv_temp, softcap,
    stride_xb, stride_xr, stride_xv,
    stride_gb, stride_gr, stride_gv,
    stride_lb, stride_lt,
    stride_ob, stride_or,
    stride_eb, stride_er,
    HAS_SOFTCAP: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, REDUCTION: tl.constexpr,
    ENT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROW_INDEX:
        flat = tl.load(idx_ptr + pid).to(tl.int64)
        b = flat // R
        r = flat % R
        x_row = x_ptr + pid * stride_xr
        g_row = grad_ptr + pid * stride_gr
    else:
        # Programs cover every logits row, rows_per_seq >= R of them per sequence; rows past R
        # (the last position of a shifted call) are not scored.
        b = pid // rows_per_seq
        r = pid % rows_per_seq
        flat = b * R + r
        x_row = x_ptr + b * stride_xb + r * stride_xr
        g_row = grad_ptr + b * stride_gb + r * stride_gr
    coef = tl.zeros([], ACC)
    coef_h = tl.zeros([], ACC)  # the entropy's, with ENT_GRAD
    if r < R:
        w = tl.load(w_ptr + flat).to(ACC)
        # The weight gates the upstream read: a NaN upstream gradient must not reach prompt rows.
        if w != 0.0:
            if REDUCTION == 2:
                g = tl.load(gout_ptr + b * stride_ob + r * stride_or).to(ACC)
            else:
                g = tl.load(gout_ptr + b * stride_ob).to(ACC)
            coef = g * w
            if ENT_GRAD:
                if REDUCTION == 2:
                    gh = tl.load(gent_ptr + b * stride_eb + r * stride_er).to(ACC)
                else:
                    gh = tl.load(gent_ptr + b * stride_eb).to(ACC)
                coef_h = gh * w
            if REDUCTION == 1:
                c = tl.load(counts_ptr + b).to(ACC)
                coef = tl.where(c != 0.0, coef / tl.where(c != 0.0, c, 1.0), 0.0)
                coef_h = tl.where(c != 0.0, coef_h / tl.where(c != 0.0, c, 1.0), 0.0)
    if (coef != 0.0) | (coef_h != 0.0):
        col_y = tl.load(labels_ptr + b * stride_lb + (r + shift) * stride_lt).to(tl.int64) - vocab_start
        m = tl.load(m_ptr + flat).to(ACC)
        logs = tl.load(logs_ptr + flat).to(ACC)
        if ENT_GRAD:
            ent = logs - tl.load(pz_ptr + flat).to(ACC)
        else:
            ent = m  # unused
        # the masked tail, then the full blocks unmasked, as in _row_stats_kernel
        v_full = V // BLOCK_V * BLOCK_V
        if v_full < V:
            _grad_block(x_row, g_row, v_full, V, stride_xv, stride_gv, col_y, m, logs, ent, coef,
                        coef_h, inv_temp, softcap, HAS_SOFTCAP, ENT_GRAD, True, ACC, BLOCK_V)
        for v0 in tl.range(0, v_full, BLOCK_V, num_stages=NUM_STAGES):
            _grad_block(x_row, g_row, v0, V, stride_xv, stride_gv, col_y, m, logs, ent, coef, coef_h,
                        inv_temp, softcap, HAS_SOFTCAP, ENT_GRAD, False, ACC, BLOCK_V)
    else:
        zeros = tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty)
        v_full = V // BLOCK_V * BLOCK_V
        for v0 in range(0, v_full, BLOCK_V):
            tl.store(g_row + (v0 + tl.arange(0, BLOCK_V)) * stride_gv, zeros)
        if v_full < V:
            cols = v_full + tl.arange(0, BLOCK_V)
            tl.store(g_row + cols * stride_gv, zeros, mask=cols < V)


@triton.jit
def _grad_block(x_row, g_row, v0, V, stride_xv, stride_gv, col_y, m, logs, ent, coef, coef_h,
                inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, ENT_GRAD: tl.constexpr,
                MASKED: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """One block of _row_grad_kernel: columns [v0, v0 + BLOCK_V), masked to V only for the tail."""
    cols = v0 + tl.arange(0, BLOCK_V)
    if MASKED:
        inside = cols < V
        x = tl.load(x_row + cols * stride_xv, mask=inside, other=0.0).to(ACC)
    else:
        x = tl.load(x_row + cols * stride_xv).to(ACC)
    if HAS_SOFTCAP:
        e = tl.exp((2.0 / softcap) * x)
        th = 1.0 - 2.0 / (e + 1.0)
        z = softcap * th * inv_temp
        dzdx = (1.0 - th * th) * inv_temp
    else:
        z = x * inv_temp
        dzdx = inv_temp
    lp = (z - m) - logs
    p = tl.exp(lp)
    if ENT_GRAD:
        # dH/dz = -p (log p + H); p = 0 (z = -inf) contributes nothing
        dz = tl.where(cols == col_y, coef, 0.0) - \
            p * (coef + tl.where(p > 0.0, coef_h * (lp + ent), 0.0))
    else:
        dz = tl.where(cols == col_y, coef - coef * p, -coef * p)
    g = (dz * dzdx).to(g_row.dtype.element_ty)
    if MASKED:
        tl.store(g_row + cols * stride_gv, g, mask=inside)
    else:
        tl.store(g_row + cols * stride_gv, g)

_FP64 = {torch.float64: tl.float64}
# Read once: the environment overrides exist for the GPU sweep (bench/gpu_check.sh), which starts
# one process per setting; reading os.environ on every call would cost host time.
_BLOCK_V = int(os.environ.get("FUSED_DPO_BLOCK_V", "4096"))
# Software pipelining of the row loops (1 = none, as measured in bench/results/2026-11-27-h100);
# bench/gpu_check.sh sweeps 2 and 3 against it before the default changes.
_NUM_STAGES = int(os.environ.get("FUSED_DPO_STAGES", "1"))
# Rows per program in the logits forward for V <= 32768 (1 = one row, as measured); swept likewise.
_ROWS = int(os.environ.get("FUSED_DPO_ROWS", "1"))


def _check_power_of_two(name: str, value: int, least: int) -> None:
    # tl.arange needs a power-of-two extent: a bad sweep setting fails here, named, and not as a
    # compile error at the first launch
    if value < least or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {least}, got {value}")


_check_power_of_two("FUSED_DPO_BLOCK_V", _BLOCK_V, 16)
_check_power_of_two("FUSED_DPO_ROWS", _ROWS, 1)
if _NUM_STAGES < 1:
    raise ValueError(f"FUSED_DPO_STAGES must be >= 1, got {_NUM_STAGES}")
_ROWS_MAX_V = 32768
ROWS_WARPS = 16
_BLOCK_R = 1024
# Warps of the per-sequence epilogue: with the statistics' four more accumulators, 8 keeps float64
# (the tests' dtype) free of register spills.
REDUCE_WARPS = {False: 4, True: 8}


@functools.lru_cache(maxsize=64)
def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of V logits.

    Measured on an H100 (bench/results/2026-11-27-h100, the FUSED_DPO_BLOCK_V sweep at
    8x1024x128256 bf16): 4096 elements per block at 8 warps (16 per thread: 16-byte loads, four
    programs in flight per SM) beat 2048 and 8192 on the forward and the backward.
    FUSED_DPO_BLOCK_V overrides the block for that sweep.
    """
    block = min(_BLOCK_V, triton.next_power_of_2(V))
    num_warps = 8 if block >= 2048 else 4
    return block, num_warps


def stats_warps(block: int, num_warps: int) -> int:
    """Warps of the row-statistics kernel with STATS: 16 at 4096-column blocks (8 columns a
    thread; at 8 warps the statistics' temporaries pass ptxas's 64-register target for sm_90
    and spill under a softcap), otherwise as without."""
    return 16 if block >= 4096 else num_warps


def _device_guard(t: torch.Tensor):
    """The tensors' device for the launch. Triton launches on the current CUDA device and its
    stream: tensors on cuda:1 while device 0 is current (a reference model on a second GPU in one
    process) would fault, or be read across devices without stream order."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _row_strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides with 0 for a size-1 dimension (its stride is never used): a (1, 1, V) row of one
    token carries the stride torch gave a size-1 dimension (V, often odd), and Triton's launcher
    would hint that the row may be misaligned; 0 is hinted divisible by 16, as the row is."""
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride(), strict=True))


def _acc(dtype: torch.dtype):
    return _FP64.get(dtype, tl.float32)


def _check_offsets(x: torch.Tensor, V: int) -> None:
    # Row offsets are int64; column offsets `cols * stride_v` stay int32 so that a unit vocab
    # stride keeps 16 B vector loads. That is exact while one row spans < 2**31 elements.
    if V * abs(x.stride(-1)) >= 2**31:
        raise ValueError(
            f"a row of {V} logits with vocab stride {x.stride(-1)} spans >= 2**31 elements; "
            "make the vocab dimension contiguous"
        )


def row_stats(x, labels, mask, *, stats, shift, vocab_start, ignore_index, inv_temp, softcap,
              row_index=None, accumulate=False):
    """Fill stats = (zy, m, logs, w), each contiguous (B, R), from the rows of x.

    x is (B, R, V) with any strides, or with `row_index` a (1, M, V) block whose row i scores flat
    position row_index[i] of (B, R). labels / mask are (B, T) with T >= R + shift; mask may be
    None (weight 1), and with `ignore_index` a label equal to it has weight 0. With `accumulate`,
    x holds vocab ids [vocab_start, vocab_start + V) and is merged into stats from earlier chunks.
    Rows of weight 0 are not read; their stats are written as 0.
    """
    zy, m, logs, w = stats[:4]
    has_stats = len(stats) > 4
    ext = stats[4:] if has_stats else (zy,) * 4  # placeholder pointers, never read
    B, R = zy.shape
    V = x.shape[-1]
    n = row_index.numel() if row_index is not None else B * R
    if n == 0:
        return
    _check_offsets(x, V)
    block, warps = launch_config(V)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # zero-copy; the kernel loads bytes
    mask_arg = mask if mask is not None else labels  # placeholder pointer, never read
    if (_ROWS > 1 and V <= _ROWS_MAX_V and row_index is None and not accumulate and not has_stats
            and vocab_start == 0):
        rows_per = _ROWS
        with _device_guard(x):
            _row_stats_rows_kernel[(triton.cdiv(n, rows_per),)](
                x, labels, mask_arg, zy, m, logs, w,
                n, R, V, shift, ignore_index if ignore_index is not None else 0, inv_temp,
                softcap if softcap is not None else 1.0,
                *_row_strides(x), *labels.stride(), *mask_arg.stride(),
                HAS_MASK=mask is not None, HAS_IGNORE=ignore_index is not None,
                HAS_SOFTCAP=softcap is not None, ACC=_acc(x.dtype), ROWS=rows_per,
                # 16 warps: the same 4096-element tile at 8 per thread (ptxas: 51-57 registers, no
                # spills; at 8 warps the per-row vectors push it over the 64-register cap).
                BLOCK_V=max(16, block // rows_per), NUM_STAGES=_NUM_STAGES, num_warps=ROWS_WARPS,
            )
        return
    idx_arg = row_index if row_index is not None else labels  # likewise
    with _device_guard(x):
        _row_stats_kernel[(n,)](
            x, labels, mask_arg, idx_arg, zy, m, logs, w, *ext,
            R, V, shift, vocab_start, ignore_index if ignore_index is not None else 0, inv_temp,
            softcap if softcap is not None else 1.0,
            *_row_strides(x), *labels.stride(), *mask_arg.stride(),
            HAS_MASK=mask is not None, HAS_IGNORE=ignore_index is not None,
            HAS_SOFTCAP=softcap is not None, HAS_ROW_INDEX=row_index is not None,
            ACCUMULATE=accumulate, STATS=has_stats, ACC=_acc(x.dtype), BLOCK_V=block,
            NUM_STAGES=_NUM_STAGES, num_warps=stats_warps(block, warps) if has_stats else warps,
        )


def seq_reduce(stats, labels, *, V, shift, reduction, cu_seqlens=None):
    """(out, counts, bad, ext) from stats (B, R): out is (B,) ("sum", "mean") or (B, R) ("none")
    per-token log-probs; counts (B,) the weight sums; bad (B,) int32 the scored labels outside
    [0, V). With the 8-row stats of a `stats` call, ext is (4, B) or (4, B, R): entropy,
    log sum p^2, mean logit and top-1, reduced like out; else None.

    Packed (`cu_seqlens`, (S + 1,) int32, B = 1): the S sequences are the rows whose targets
    r + shift lie in [cu_seqlens[s], cu_seqlens[s + 1]); out, counts, bad and the reduced ext are
    per sequence, (S,); "none" stays per token, (1, R)."""
    zy, m, logs, w = stats[:4]
    has_stats = len(stats) > 4
    B, R = zy.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    code = REDUCTION_CODE[reduction]
    shape = (B, R) if code == NONE else (n_seq,)
    out = torch.empty(shape, dtype=zy.dtype, device=zy.device)
    counts = torch.empty(n_seq, dtype=zy.dtype, device=zy.device)
    bad = torch.empty(n_seq, dtype=torch.int32, device=zy.device)
    ext = torch.empty((4, *shape), dtype=zy.dtype, device=zy.device) if has_stats else None
    if n_seq == 0:
        return out, counts, bad, ext
    block = min(_BLOCK_R, triton.next_power_of_2(max(R, 1)))
    extra = stats[4:] if has_stats else (zy,) * 4  # placeholder pointers, never read
    with _device_guard(zy):
        _seq_reduce_kernel[(n_seq,)](
            zy, m, logs, w, labels, out, counts, bad, *extra, ext if has_stats else out,
            # read as a dense array of offsets: a strided view would be read at the wrong places
            cu_seqlens.contiguous() if cu_seqlens is not None else bad,  # else a placeholder, never read
            R, V, shift, *labels.stride(), out.numel(),
            REDUCTION=code, STATS=has_stats, HAS_SEGMENTS=cu_seqlens is not None, ACC=_acc(zy.dtype),
            BLOCK_R=block, num_warps=REDUCE_WARPS[has_stats],
        )
    return out, counts, bad, ext


def row_grad(x, grad, labels, stats, grad_out, counts, *, shift, vocab_start, inv_temp, softcap,
             reduction, row_index=None, grad_entropy=None):
    """Write the gradient of the reduced log-probs w.r.t. x into grad (same shape as x).

    x, grad: (B, Tx, V) with Tx >= R (rows past R are written as zeros), or with `row_index` a
    (1, M, V) block as in `row_stats`. grad_out: (B,) for "sum"/"mean", (B, R) for "none", any
    strides. grad may alias x (in-place backward): each element is read before it is written by
    the same program. grad_entropy (shaped like grad_out; needs the 8-row stats) adds the
    gradient of the reduced entropy.
    """
    _zy, m, logs, w = stats[:4]
    R = m.shape[1]
    B, Tx, V = x.shape
    n = row_index.numel() if row_index is not None else B * Tx
    if n == 0:
        return
    _check_offsets(x, V)
    _check_offsets(grad, V)
    block, warps = launch_config(V)
    code = REDUCTION_CODE[reduction]
    so = grad_out.stride() if code == NONE else (grad_out.stride(0), 0)
    ent = grad_entropy is not None
    ge = grad_entropy if ent else grad_out  # placeholder pointer, never read
    se = ge.stride() if code == NONE else (ge.stride(0), 0)
    with _device_guard(x):
        _row_grad_kernel[(n,)](
            x, grad, labels, row_index if row_index is not None else labels, m, logs, w, grad_out,
            counts, stats[4] if ent else m, ge,
            R, Tx, V, shift, vocab_start, inv_temp, softcap if softcap is not None else 1.0,
            *_row_strides(x), *_row_strides(grad), *labels.stride(), *so, *se,
            HAS_SOFTCAP=softcap is not None, HAS_ROW_INDEX=row_index is not None, REDUCTION=code,
            ENT_GRAD=ent, ACC=_acc(x.dtype), BLOCK_V=block, NUM_STAGES=_NUM_STAGES, num_warps=warps,
        )
