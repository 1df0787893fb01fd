"""`get_logps_from_hidden`: the same log-probs from hidden states and the lm_head, no logits.

Only scored positions are kept (compacted to M rows); the vocabulary is walked in chunks of
`chunk_size` columns, so the largest temporary is one (M, chunk) block of logits:

    forward:  for each chunk c:  L_c = h @ W_c.T + b_c;  merge (max, log-sum-exp) into the row
              statistics; pick z_y where the label falls in the chunk
    backward: for each chunk c:  L_c again;  G_c = coef * (onehot - softmax) * dz/dx   (in place)
              dW_c = G_c.T @ h   (one matmul per slice: fp32 accumulation inside, no big buffer)
              dh  += G_c @ W_c   (fp32 accumulator, M x H)

Forward + backward costs four (M, H, V) matmuls; the row math runs in the same kernels as the
logits path (Triton) or their chunked PyTorch twin.

Mixed precision: the matmuls run in the compute dtype (`head_dtype` if given, else autocast's
dtype when autocast is on, else hidden's); an fp32 master weight is cast one vocab chunk at a time,
never whole, and its gradient is accumulated and returned in fp32 (on CUDA each slice's GEMM
writes fp32 directly). The op is registered as `fused_dpo::logps_from_hidden` (+ `_backward`) for
torch.compile; eager calls take a plain autograd.Function to the same implementation.
"""

from __future__ import annotations

import functools
import os

import torch

from . import _common
from .logps import (
    _acc_dtype,
    fake_outputs,
    first_order_only,
    functorch_wrapped,
    seq_reduce,
    stats_rows,
    token_grads,
)
from .packed import boundary_targets, check_cu_seqlens
from .parallel import all_reduce_sum, vocab_shard
from .reference import get_logps_from_hidden_reference

_DEFAULT_CHUNK_BYTES = 256 * 2**20


def auto_chunk_size(M: int, V: int, itemsize: int) -> int:
    """Vocab columns per chunk so one (M, chunk) logits block stays near 256 MiB (env
    FUSED_DPO_HIDDEN_CHUNK_BYTES overrides); a multiple of 256 for matmul-friendly shapes."""
    budget = int(os.environ.get("FUSED_DPO_HIDDEN_CHUNK_BYTES", str(_DEFAULT_CHUNK_BYTES)))
    cols = budget // max(1, M * itemsize)
    cols = max(256, cols // 256 * 256)
    return min(V, cols)


def _compute_dtype(hidden: torch.Tensor, head_dtype: torch.dtype | None) -> torch.dtype:
    if head_dtype is not None:
        return head_dtype
    dev = hidden.device.type
    if hidden.dtype != torch.float64 and dev != "meta" and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def _scored_rows(labels, mask, ignore_index, shift, R, compact=True):
    """Flat positions b * R + r of the scored rows (one host sync), or None: every row is computed
    (weight-0 rows are skipped by the row kernels). None when compact=False, and under CUDA graph
    capture, where the sync is not allowed."""
    if not compact or (labels.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None
    lab = labels[:, shift : shift + R]
    if mask is not None:
        scored = mask[:, shift : shift + R] != 0
    elif ignore_index is not None:
        scored = lab != ignore_index
    else:
        return None
    return scored.reshape(-1).nonzero().squeeze(1)


def _rows_of(hidden, idx, R):
    """(M, H) rows of hidden scoring the positions idx (None: all B*R), and their flat (B*T) rows."""
    B, T, H = hidden.shape
    flat = hidden.reshape(B * T, H)
    if idx is None:
        idx = torch.arange(B * R, device=hidden.device)
    src = idx // R * T + idx % R  # row (b, r) of the scored problem is row b * T + r of hidden
    return flat.index_select(0, src), src


def _chunk_logits(h, weight, bias, v0, v1, cd):
    w = weight[v0:v1].to(cd)  # one chunk cast at a time: never a whole low-precision copy
    n = v1 - v0
    if n % 16 == 0:
        return (h @ w.T if bias is None else torch.addmm(bias[v0:v1].to(cd), h, w.T)), w
    # An odd width (a user chunk_size of 3000, the last chunk of V = 32001): the GEMM writes into
    # rows padded to a multiple of 16 elements (cuBLAS takes the row stride as its ldc), so the
    # row kernels see 16-aligned rows and keep vector loads (ptxas, sm_90: scalar-only otherwise).
    out = torch.empty((h.shape[0], -(-n // 16) * 16), dtype=cd, device=h.device)[:, :n]
    if bias is None:
        torch.mm(h, w.T, out=out)
    else:
        torch.addmm(bias[v0:v1].to(cd), h, w.T, out=out)
    return out, w


def _has_mm_f32(a: torch.Tensor) -> bool:
    # aten::mm.dtype / mm.dtype_out (a bf16/fp16 GEMM writing fp32) exist on CUDA from torch 2.8.
    return a.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16) and \
        "dtype" in torch.ops.aten.mm.overloads()


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, accumulated in fp32 inside the GEMM, written in out's dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and _has_mm_f32(a):
        torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
    elif out.dtype == torch.float32:
        # No fp32-output low-precision GEMM here (the CPU): multiply in fp32 rather than round
        # the product to bf16.
        torch.mm(a.float(), b.float(), out=out)
    else:
        out.copy_(torch.mm(a, b))


_ADD_BLOCK_BYTES = 64 * 2**20


@functools.cache
def _addmm_f32_inplace_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm.dtype_out accepts an fp32 `self` with `dtype` matrices here (torch 2.10 and
    later do; before, the check refuses it). Probed once on 1x1 tensors: the refusal is a dispatch
    check, raised before any kernel runs."""
    one = torch.zeros((1, 1), device=device, dtype=dtype)
    acc = torch.zeros((1, 1), device=device, dtype=torch.float32)
    try:
        torch.ops.aten.addmm.dtype_out(acc, one, one, torch.float32, out=acc)
    except RuntimeError:
        return False
    return True


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 (or fp64 with fp64 operands), a and b in the compute dtype.

    Low-precision operands on CUDA: one in-place fp32-output GEMM where addmm.dtype_out takes an
    fp32 `self` (torch 2.10 and later); elsewhere each 64 MiB block of acc's rows gets one
    fp32-output GEMM and an add, so the temporary stays bounded."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if _has_mm_f32(a) and _addmm_f32_inplace_ok(a.device, a.dtype):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
        return
    step = max(1, _ADD_BLOCK_BYTES // max(1, acc.shape[1] * acc.element_size()))
    for i in range(0, acc.shape[0], step):
        ai = a[i : i + step]
        if _has_mm_f32(a):
            acc[i : i + step].add_(torch.ops.aten.mm.dtype(ai, b, torch.float32))
        else:
            acc[i : i + step].addmm_(ai.to(acc.dtype), b.to(acc.dtype))


def _autocast_off(fn):
    """Run fn with autocast disabled on the first argument's device: compute_dtype already holds
    the choice (head_dtype, or autocast's dtype read by the public function); left on, autocast
    would recast head_dtype=float32 matmuls to bf16."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast(args[1].device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@_autocast_off
def _hidden_forward(hidden, weight, bias, labels, mask, shift, ignore_index, temperature, softcap,
                    reduction, impl, compute_dtype, chunk_size, compact, with_stats=False,
                    cu_seqlens=None, shard=None):
    launchers = _common.backend(impl, hidden.device)
    B, T, _H = hidden.shape
    V = weight.shape[0]
    V_read, base = (shard.valid, shard.start) if shard is not None else (V, 0)  # no padding rows
    R = max(T - shift, 0)
    acc = _acc_dtype(compute_dtype)
    # Zeros: rows that are never visited (not scored) must read as weight 0.
    stats = torch.zeros((stats_rows(with_stats), B, R), dtype=acc, device=hidden.device)
    parts = stats.unbind(0)
    idx = _scored_rows(labels, mask, ignore_index, shift, R, compact)
    h, _src = _rows_of(hidden, idx, R)
    h = h.to(compute_dtype)
    M = h.shape[0]
    chunk = chunk_size or auto_chunk_size(M, V_read, h.element_size())
    if M:
        for v0 in range(0, V_read, chunk):
            v1 = min(V_read, v0 + chunk)
            logits, _w = _chunk_logits(h, weight, bias, v0, v1, compute_dtype)
            x = logits[None] if idx is not None else logits.view(B, R, v1 - v0)
            launchers.row_stats(x, labels, mask, stats=parts, shift=shift, vocab_start=base + v0,
                                ignore_index=ignore_index, inv_temp=1.0 / temperature,
                                softcap=softcap, row_index=idx, accumulate=v0 > 0)
    out, counts, bad, ext = seq_reduce(launchers, parts, labels, V=V, shift=shift,
                                       reduction=reduction, cu_seqlens=cu_seqlens, shard=shard)
    return out, counts, bad, stats, ext, idx  # ext: None without statistics


@_autocast_off
def _hidden_backward(grad_out, hidden, weight, bias, labels, mask, stats, counts, shift,
                     ignore_index, temperature, softcap, reduction, impl, compute_dtype, chunk_size,
                     compact, need_h, need_w, need_b, idx=False, grad_entropy=None, cu_seqlens=None,
                     shard=None):
    launchers = _common.backend(impl, hidden.device)
    B, T, H = hidden.shape
    V = weight.shape[0]
    V_read, base = (shard.valid, shard.start) if shard is not None else (V, 0)
    R = max(T - shift, 0)
    parts = stats.unbind(0)
    grad_out, grad_entropy, reduction = token_grads(grad_out, grad_entropy, counts, cu_seqlens, R,
                                                    shift, reduction)
    if idx is False:  # not handed over by the forward (the compiled op path): find them again
        idx = _scored_rows(labels, mask, ignore_index, shift, R, compact)
    h, src = _rows_of(hidden, idx, R)
    if idx is None:
        # Every row is computed: zero the unscored ones, whose hidden states may hold NaN (left
        # padding); their logits gradient is 0, but 0 * NaN in dW = G.T @ h would not be.
        h = torch.where((parts[3].reshape(-1) != 0)[:, None], h, 0)
    h = h.to(compute_dtype)
    M = h.shape[0]
    chunk = chunk_size or auto_chunk_size(M, V_read, h.element_size())
    acc = _acc_dtype(compute_dtype)
    dh = torch.zeros((M, H), dtype=acc, device=h.device) if need_h else None
    dW = torch.empty_like(weight) if need_w else None
    db = torch.empty(V, dtype=acc, device=h.device) if need_b else None
    if V_read < V:  # a vocab shard's padding rows
        for g in (dW, db):
            if g is not None:
                g[V_read:].zero_()
    for v0 in range(0, V_read if M else 0, chunk):
        v1 = min(V_read, v0 + chunk)
        g, w = _chunk_logits(h, weight, bias, v0, v1, compute_dtype)
        x = g[None] if idx is not None else g.view(B, R, v1 - v0)
        launchers.row_grad(x, x, labels, parts, grad_out, counts, shift=shift,
                           vocab_start=base + v0,
                           inv_temp=1.0 / temperature, softcap=softcap, reduction=reduction,
                           row_index=idx, grad_entropy=grad_entropy)
        if need_w:
            _mm_into(dW[v0:v1], g.T, h)
        if need_h:
            _addmm_f32_(dh, g, w)
        if need_b:
            db[v0:v1] = g.sum(0, dtype=db.dtype)
    if not M:
        if need_w:
            dW.zero_()
        if need_b:
            db.zero_()
    d_hidden = None
    if need_h and shard is not None and M:
        all_reduce_sum(dh, shard)  # each rank's dh covers its own vocab shard only
    if need_h:
        d_hidden = torch.zeros((B * T, H), dtype=hidden.dtype, device=hidden.device)
        d_hidden.index_copy_(0, src, dh.to(hidden.dtype))
        d_hidden = d_hidden.view(B, T, H)
    return d_hidden, dW, db.to(bias.dtype) if need_b else None


# ---- torch.library ops --------------------------------------------------------------------------

@torch.library.custom_op("fused_dpo::logps_from_hidden", mutates_args=())
def logps_from_hidden_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    mask: torch.Tensor | None, shift: int, ignore_index: int | None, temperature: float,
    softcap: float | None, reduction: str, impl: str, compute_dtype: torch.dtype, chunk_size: int,
    compact: bool, with_stats: bool, entropy_grad: bool, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, counts, bad, stats, ext) for `get_logps_from_hidden`; chunk_size 0 = automatic.
    entropy_grad only tells autograd whether ext carries a gradient."""
    out, counts, bad, stats, ext, _idx = _hidden_forward(
        hidden, weight, bias, labels, mask, shift, ignore_index, temperature, softcap, reduction,
        impl, compute_dtype, chunk_size, compact, with_stats, cu_seqlens)
    return out, counts, bad, stats, ext if ext is not None else out.new_empty((0,))


@logps_from_hidden_op.register_fake
def _(hidden, weight, bias, labels, mask, shift, ignore_index, temperature, softcap, reduction, impl,
      compute_dtype, chunk_size, compact, with_stats, entropy_grad, cu_seqlens=None):
    B, T, _H = hidden.shape
    return fake_outputs(hidden, B, max(T - shift, 0), _acc_dtype(compute_dtype), reduction,
                        with_stats, cu_seqlens)


@torch.library.custom_op("fused_dpo::logps_from_hidden_backward", mutates_args=())
def logps_from_hidden_backward_op(
    grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    labels: torch.Tensor, mask: torch.Tensor | None, stats: torch.Tensor, counts: torch.Tensor,
    shift: int, ignore_index: int | None, temperature: float, softcap: float | None,
    reduction: str, impl: str, compute_dtype: torch.dtype, chunk_size: int, compact: bool,
    need_h: bool, need_w: bool, need_b: bool, grad_entropy: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias); a gradient that is not needed comes back empty (each its own
    tensor: a custom op's outputs may not alias one another)."""
    dh, dW, db = _hidden_backward(grad_out, hidden, weight, bias, labels, mask, stats, counts, shift,
                                  ignore_index, temperature, softcap, reduction, impl,
                                  compute_dtype, chunk_size, compact, need_h, need_w, need_b,
                                  grad_entropy=grad_entropy, cu_seqlens=cu_seqlens)
    return tuple(g if g is not None else hidden.new_empty((0,)) for g in (dh, dW, db))


@logps_from_hidden_backward_op.register_fake
def _(grad_out, hidden, weight, bias, labels, mask, stats, counts, shift, ignore_index, temperature,
      softcap, reduction, impl, compute_dtype, chunk_size, compact, need_h, need_w, need_b,
      grad_entropy, cu_seqlens=None):
    empty = lambda: hidden.new_empty((0,))  # noqa: E731
    # d_hidden is contiguous (B, T, H) whatever hidden's layout, as the real op returns it
    return (hidden.new_empty(hidden.shape) if need_h else empty(),
            torch.empty_like(weight) if need_w else empty(),
            torch.empty_like(bias) if need_b else empty())


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, mask, *rest = inputs
    _out, counts, bad, stats, ext = output
    ctx.save_for_backward(hidden, weight, bias, labels, mask, stats, counts, rest[-1])
    ctx.args = tuple(rest[:-3])  # without with_stats, entropy_grad, cu_seqlens
    ctx.entropy_grad = rest[-2]
    ctx.mark_non_differentiable(counts, bad, stats, *(() if ctx.entropy_grad else (ext,)))


def _op_backward(ctx, grad_out, _gc, _gb, _gs, grad_ext):
    hidden, weight, bias, labels, mask, stats, counts, cu = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_out, ge = _common.upstream_grads(ctx.entropy_grad, grad_out, grad_ext)  # materialized
    dh, dW, db = logps_from_hidden_backward_op(grad_out, hidden, weight, bias, labels, mask, stats,
                                               counts, *ctx.args, need_h, need_w, need_b, ge, cu)
    return (dh if need_h else None, dW if need_w else None, db if need_b else None) + (None,) * 14


logps_from_hidden_op.register_autograd(_op_backward, setup_context=_setup_context)


class _HiddenLogps(torch.autograd.Function):
    """Forward and setup_context apart (torch.func.grad / vjp need it); the stats bundle is an
    output (non-differentiable) so that setup_context can save it, and so are the scored rows
    the forward found (the backward needs no second host sync to find them)."""

    @staticmethod
    def forward(hidden, weight, bias, labels, mask, *args):
        *args, with_stats, _entropy_grad, cu_seqlens, shard = args
        out, counts, bad, stats, ext, idx = _hidden_forward(hidden, weight, bias, labels, mask,
                                                            *args, with_stats, cu_seqlens, shard)
        return out, counts, bad, ext, stats, idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, mask, *args = inputs
        *args, _with_stats, entropy_grad, cu_seqlens, shard = args
        _out, counts, bad, ext, stats, idx = output
        ctx.save_for_backward(hidden, weight, bias, labels, mask, stats, counts, cu_seqlens, idx)
        ctx.shard = shard
        ctx.args = tuple(args)
        ctx.entropy_grad = entropy_grad
        ctx.mark_non_differentiable(counts, bad, stats, *(() if idx is None else (idx,)),
                                    *(() if entropy_grad or ext is None else (ext,)))
        ctx.set_materialize_grads(False)  # no zero-filled gradients for counts / bad

    @staticmethod
    def backward(ctx, grad_out, _gc, _gb, grad_ext, _gs, _gi):
        grads = _common.upstream_grads(ctx.entropy_grad, grad_out, grad_ext)
        if grads is None:
            return (None,) * 18
        grad_out, ge = grads
        hidden, weight, bias, labels, mask, stats, counts, cu_seqlens, idx = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.no_grad():  # under create_graph: nothing of the kernels' temporaries recorded
            if functorch_wrapped(hidden) and ctx.shard is None:  # torch.func: the op unwraps
                grads = logps_from_hidden_backward_op(grad_out, hidden, weight, bias, labels,
                                                      mask, stats, counts, *ctx.args, need_h,
                                                      need_w, need_b, ge, cu_seqlens)
                dh, dW, db = (g if need else None
                              for g, need in zip(grads, (need_h, need_w, need_b), strict=True))
            else:
                dh, dW, db = _hidden_backward(grad_out, hidden, weight, bias, labels, mask, stats,
                                              counts, *ctx.args, need_h, need_w, need_b, idx=idx,
                                              grad_entropy=ge, cu_seqlens=cu_seqlens,
                                              shard=ctx.shard)
        return first_order_only("get_logps_from_hidden", (hidden, weight, bias),
                                (dh, dW, db)) + (None,) * 15


@torch.compiler.disable
def _apply_eager(*args):
    """The vocab-parallel call: its all-reduces run eagerly (a graph break under torch.compile)."""
    return _HiddenLogps.apply(*args)


def check_head_args(hidden, weight, bias, *, reduction, temperature, softcap, impl, head_dtype,
                    chunk_size) -> None:
    """The hidden-state paths' argument checks (shapes, dtypes, devices, options), in one place."""
    _common.check_float("hidden", hidden, 3)
    _common.check_float("weight", weight, 2)
    _common.check_options(reduction, temperature, softcap, impl)
    _B, T, H = hidden.shape
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
        if (t.dtype == torch.float64) != (hidden.dtype == torch.float64):
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; "
                            "float64 does not mix with other dtypes")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if head_dtype is not None and head_dtype not in _common.FLOAT_DTYPES:
        raise TypeError(f"head_dtype must be a floating dtype, got {head_dtype!r}")
    if V < 1:  # T = 0 is allowed: empty outputs (an all-masked, compacted micro-batch)
        raise ValueError(f"weight has shape {tuple(weight.shape)}; need V >= 1")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def get_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: str = "sum",
    return_counts: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    head_dtype: torch.dtype | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    compact: bool = True,
    validate: bool = True,
    stats=None,
    entropy_grad: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
):
    """`get_logps(hidden @ weight.T + bias, ...)` without ever building the (B, T, V) logits.

    Args:
        hidden: (B, T, H) final hidden states (after the model's last norm).
        weight: (V, H) lm_head weight; bias: optional (V,). The weight may be float32 master
            weights under bf16/fp16 hidden states (mixed precision), with or without autocast.
            An FSDP2-sharded weight / bias (a DTensor) is gathered once per call with
            `full_tensor()`, never per chunk; its backward averages each rank's gradient over
            the ranks into the shards, as FSDP2 does for the parameters it gathers.
        input_ids, response_mask, labels, ignore_index, shift, reduction, return_counts,
        temperature, softcap, validate, stats, entropy_grad: exactly as in `fused_dpo.get_logps`
        (the statistics are merged across vocab chunks in the same pass; the mean logit is over
        all V columns).
        head_dtype: dtype of the lm_head matmuls. Default: autocast's dtype when autocast is on,
            else hidden's. `torch.float32` computes the logits in float32 (RL users who need
            training and inference log-probs to agree).
        impl: "triton" (cuBLAS matmuls + the Triton row kernels), "torch" (chunked PyTorch),
            "reference" (eager, builds the logits), "auto" = triton on CUDA, else torch.
        chunk_size: vocab columns per chunk; default keeps one (M, chunk) block near 256 MiB,
            with M the number of scored positions.
        compact: keep only the scored positions (one host sync to find them). False computes
            every position with no sync; pass False for CUDA graphs, so that the warm-up runs
            the kernels the capture will replay (under capture compaction is off regardless).
        cu_seqlens: packed inputs, hidden (1, total_T, H): as in `get_logps` (outputs per
            sequence; compaction and vocab chunks as for a batch).
        process_group, vocab_start, vocab_size: vocab-parallel, as in `get_logps`, with weight
            (V_local, H) (and bias (V_local,)) this rank's rows of the lm_head; hidden, ids and
            mask the same on every rank. The weight and bias gradients stay local (the shard's
            rows; 0 for padding rows); the hidden-state gradient is all-reduced over the group,
            so every rank gets the full one. Eager only (a graph break under torch.compile).

    Returns:
        As `get_logps`. Gradients flow to hidden, weight and bias, each in its own dtype (an fp32
        weight's gradient is accumulated in fp32). Finding the scored positions costs one host
        sync per pass; under CUDA graph capture every position is computed instead (no sync).
    """
    weight, bias = _common.full_tensor(weight), _common.full_tensor(bias)
    check_head_args(hidden, weight, bias, reduction=reduction, temperature=temperature,
                    softcap=softcap, impl=impl, head_dtype=head_dtype, chunk_size=chunk_size)
    stats = _common.check_stats(stats, entropy_grad)
    B, T, _H = hidden.shape
    V = weight.shape[0]
    tg = _common.check_targets((B, T), hidden.device, input_ids, response_mask, labels,
                               ignore_index, "hidden")
    shard = vocab_shard(process_group, V, vocab_start, vocab_size, "weight", impl=impl,
                        device=hidden.device, targets=tg, validate=validate)
    on_meta = hidden.device.type == "meta"  # shapes only: the fake kernels, nothing to validate
    validate = validate and not on_meta
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T, hidden.device, "hidden", validate)
        tg = boundary_targets(tg, cu_seqlens, int(shift))
    if impl == "reference":
        if validate:
            _common.raise_bad_labels(tg, V, int(shift))
        return get_logps_from_hidden_reference(
            hidden, weight, input_ids, response_mask, bias=bias, labels=labels,
            ignore_index=ignore_index, shift=shift, reduction=reduction,
            return_counts=return_counts, temperature=temperature, softcap=softcap,
            head_dtype=head_dtype, stats=stats, entropy_grad=entropy_grad, cu_seqlens=cu_seqlens,
        )
    s = int(shift)
    args = (s, tg.ignore_index, float(temperature), float(softcap) if softcap is not None else None,
            reduction, impl, _compute_dtype(hidden, head_dtype), chunk_size or 0, bool(compact),
            bool(stats), bool(entropy_grad))
    if shard is not None:
        out, counts, bad, ext, _stats, _idx = _apply_eager(hidden, weight, bias, tg.labels,
                                                           tg.mask, *args, cu_seqlens, shard)
    elif torch.compiler.is_compiling() or on_meta:
        out, counts, bad, _stats, ext = logps_from_hidden_op(hidden, weight, bias, tg.labels,
                                                             tg.mask, *args, cu_seqlens)
    else:
        out, counts, bad, ext, _stats, _idx = _HiddenLogps.apply(hidden, weight, bias, tg.labels,
                                                                 tg.mask, *args, cu_seqlens, None)
    if validate:
        _common.check_bad_count(bad, tg, shard.size if shard is not None else V, s)
    if stats:
        return _common.stats_result(out, counts, ext, stats, bool(entropy_grad))
    return (out, counts) if return_counts else out


# ---- forward and gradient in one pass: 3 matmuls instead of 4 ----------------------------------

# The group-size rule of `grouped_logps_and_grads`. Each group of units (DPO pairs) reads and
# writes the whole fp32 dW accumulator once: 2 V H 4 bytes, 4.2 GB at 128256 x 4096, about half a
# pair's dW matmul time again; a group of k pairs pays 1/k of that per pair, and in exchange holds
# its k pairs' logits, rows x V in the compute dtype, at once. So, greedily and in order: as many
# units as keep the group's logits within 1 GiB, at least one (a unit's logits must be held whole
# whatever its size), at most 8. At 8x1024 with a quarter of prompt a pair is 2 x 767 rows, 393 MB
# of bf16 logits at V = 128256: 2 pairs a group, half the accumulator traffic for 393 MB more. The
# 4-matmul path's chunk is 256 MiB, but this path holds a whole pair at the least anyway. The cap:
# at 8 pairs the accumulator costs an eighth of its read-write per pair (~0.1 ms on an H200), and
# the rest is not worth holding more logits for.
_GROUP_LOGITS_BYTES = 2**30
_MAX_UNITS_PER_GROUP = 8


def _plan_groups(unit_rows, V, itemsize, units_per_group=None):
    """[(u0, u1)]: the groups as ranges of consecutive units, `units_per_group` at a time (the last
    group takes the rest), or by the rule above when None. unit_rows: each unit's scored rows."""
    U = len(unit_rows)
    if units_per_group is not None:
        return [(u, min(U, u + units_per_group)) for u in range(0, U, units_per_group)]
    plan, u0, held = [], 0, 0
    for u, rows in enumerate(unit_rows):
        nbytes = rows * V * itemsize
        if u > u0 and (held + nbytes > _GROUP_LOGITS_BYTES or u - u0 == _MAX_UNITS_PER_GROUP):
            plan.append((u0, u))
            u0, held = u, 0
        held += nbytes
    return plan + [(u0, U)] if U else plan


def _batch_rows(labels, mask, ignore_index, shift, R, T, order):
    """The scored rows of the whole batch, with the sequences taken in `order` (the units one
    after another), built once per batch: (rows per sequence, a host list; pos, the flat positions
    j * R + r of the scored rows of sequence order[j] in increasing order, or None when every row
    is scored; src, their rows b * T + r of hidden). Each group's rows are then a slice of pos and
    src. One host sync, the per-sequence counts (.tolist()); none when every row is scored."""
    n = order.shape[0]
    if mask is not None:
        scored = mask.index_select(0, order)[:, shift : shift + R] != 0
    elif ignore_index is not None:
        scored = labels.index_select(0, order)[:, shift : shift + R] != ignore_index
    else:
        pos = torch.arange(n * R, device=order.device)
        return [R] * n, None, order[pos // R] * T + pos % R if R else pos
    rows = scored.sum(1).tolist()  # the pass's one host sync: group sizes and the rule need them
    # A stable sort puts the scored positions first, in order: nonzero() without its own sync
    # (the count is known now; nonzero_static has no CUDA kernel before torch 2.6).
    pos = torch.argsort(scored.logical_not().reshape(-1).to(torch.uint8), stable=True)[: sum(rows)]
    return rows, pos, order[pos // R] * T + pos % R if R else pos


def grouped_logps_and_grads(hidden, weight, bias, labels, mask, *, units, coef_fn,
                            units_per_group=None, shift=1, ignore_index=None, temperature=1.0,
                            softcap=None, impl="auto", head_dtype=None, chunk_size=None,
                            need_h=True, need_w=True, need_b=True):
    """Per-sequence log-probs and the gradients of a loss whose derivative w.r.t. each unit's
    log-probs is known once that unit's rows are done (a DPO pair: its chosen and rejected).

    units: (U, k) int64 tensor on hidden's device, each row the sequence indices of one unit. The
    units are taken in order, in groups of consecutive units (`units_per_group` at a time, the last
    group the rest; None: the rule above `_plan_groups`, by the bytes of the group's logits). For
    each group the scored rows of its sequences are multiplied with the whole head once and kept:
    statistics, the group's summed log-probs, then `coef_fn(sel, logps_g, counts_g)` ->
    dloss/dlogps_g, with sel the group's sequence indices (a device tensor, its units' rows one
    after another) and logps_g, counts_g in that order; the logits turned into their gradient in
    place, and dW += G.T @ h, dh = G @ W. Three (M, H, V) matmuls instead of four, at the cost of
    one group's (M_g, V) logits kept whole and an fp32 (V, H) accumulator for dW (4 V H bytes:
    2.1 GB at 128256 x 4096), read and written once per group. For an fp32 weight that accumulator
    is the gradient autograd receives (no copy when .grad is empty); for bf16/fp16 it is extra, and
    rounded once at the end. need_h / need_w / need_b skip the gradients nobody needs (a frozen
    head: no dW matmul). Eager only: the host loop and `coef_fn` are Python.

    The row indices of all groups are built once per batch, with one host sync (the per-sequence
    counts of scored rows, in `_batch_rows`; none when every row is scored); the groups add none.

    Returns (logps (B,), counts (B,), bad (B,), d_hidden, d_weight, d_bias), the gradients in the
    accumulation dtype (fp32; fp64 for fp64 inputs), None where not needed.
    """
    launchers = _common.backend(impl, hidden.device)
    cd = _compute_dtype(hidden, head_dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _grouped_pass(launchers, hidden, weight, bias, labels, mask, units, units_per_group,
                             coef_fn, shift, ignore_index, 1.0 / temperature, softcap, cd,
                             chunk_size, need_h, need_w, need_b and bias is not None)


def _grouped_pass(launchers, hidden, weight, bias, labels, mask, units, units_per_group, coef_fn,
                  shift, ignore_index, inv_temp, softcap, cd, chunk_size, need_h, need_w, need_b):
    B, T, H = hidden.shape
    V = weight.shape[0]
    R = max(T - shift, 0)
    acc = _acc_dtype(cd)
    dev = hidden.device
    logps = torch.zeros(B, dtype=acc, device=dev)
    counts = torch.zeros(B, dtype=acc, device=dev)
    bad = torch.zeros(B, dtype=torch.int32, device=dev)
    # Gradients stay in the accumulation dtype until the loss's backward scales them (one rounding).
    d_hidden = torch.zeros((B * T, H), dtype=acc, device=dev) if need_h else None
    dW = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None
    db = torch.zeros(V, dtype=acc, device=dev) if need_b else None
    cast_cols = V if weight.dtype == cd else max(256, (256 * 2**20) // max(1, H * 2) // 256 * 256)
    if chunk_size:
        cast_cols = min(V, chunk_size)
    k = units.shape[1]
    order = units.reshape(-1)
    rows, pos, src = _batch_rows(labels, mask, ignore_index, shift, R, T, order)
    unit_rows = [sum(rows[u * k : (u + 1) * k]) for u in range(units.shape[0])]
    flat_hidden = hidden.reshape(B * T, H)  # once: a copy only for a non-viewable layout
    r0 = 0  # the group's first row in pos / src
    for u0, u1 in _plan_groups(unit_rows, V, cd.itemsize, units_per_group):
        s0, s1 = u0 * k, u1 * k
        M = sum(unit_rows[u0:u1])
        sel = order[s0:s1]
        src_g = src[r0 : r0 + M]
        idx = pos[r0 : r0 + M] - s0 * R if pos is not None else None  # flat rows within the group
        r0 += M
        lab = labels.index_select(0, sel)
        msk = mask.index_select(0, sel) if mask is not None else None
        stats = torch.zeros((4, s1 - s0, R), dtype=acc, device=dev)
        parts = stats.unbind(0)
        h = flat_hidden.index_select(0, src_g).to(cd)
        if cast_cols >= V:  # one chunk: the matmul's own output, no copy
            logits = _chunk_logits(h, weight, bias, 0, V, cd)[0]  # matmul 1
        else:
            # rows padded to 16 elements for an odd V, as in _chunk_logits
            logits = torch.empty((M, -(-V // 16) * 16), dtype=cd, device=dev)[:, :V]
            for v0 in range(0, V, cast_cols):
                v1 = min(V, v0 + cast_cols)
                logits[:, v0:v1] = _chunk_logits(h, weight, bias, v0, v1, cd)[0]  # matmul 1
        x = logits[None] if idx is not None else logits.view(s1 - s0, R, V)
        if M:
            launchers.row_stats(x, lab, msk, stats=parts, shift=shift, vocab_start=0,
                                ignore_index=ignore_index, inv_temp=inv_temp, softcap=softcap,
                                row_index=idx)
        out_g, counts_g, bad_g, _ = launchers.seq_reduce(parts, lab, V=V, shift=shift,
                                                         reduction="sum")
        logps.index_copy_(0, sel, out_g)
        counts.index_copy_(0, sel, counts_g)
        bad.index_copy_(0, sel, bad_g)
        if not M:
            continue
        coef = coef_fn(sel, out_g, counts_g).to(acc).contiguous()
        launchers.row_grad(x, x, lab, parts, coef, counts_g, shift=shift, vocab_start=0,
                           inv_temp=inv_temp, softcap=softcap, reduction="sum", row_index=idx)
        if need_w:
            _addmm_f32_(dW, logits.T, h)  # matmul 2
        if need_h:
            dh = torch.zeros((M, H), dtype=acc, device=dev)
            for v0 in range(0, V, cast_cols):
                v1 = min(V, v0 + cast_cols)
                _addmm_f32_(dh, logits[:, v0:v1], weight[v0:v1].to(cd))  # matmul 3
            d_hidden.index_copy_(0, src_g, dh)
        if need_b:
            db += logits.sum(0, dtype=acc)
        del logits, x
    return (logps, counts, bad, d_hidden.view(B, T, H) if need_h else None, dW, db)
