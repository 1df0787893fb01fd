"""`get_logps`: per-sequence log-probabilities of the response tokens, from logits.

One call is one autograd node: the forward is two launches (row statistics, then the per-sequence
weighting and reduction), the backward one (every logits row's gradient, zeros where not scored).
The same forward and backward are registered as `torch.library` ops (`fused_dpo::logps`,
`fused_dpo::logps_backward`) with fake and autograd implementations; inside `torch.compile` the
public function calls those ops, so a fullgraph trace sees one opaque node. Eager calls reach the
same implementation through a plain `autograd.Function`: the custom-op dispatcher costs about
55 us of host time per forward on this project's CPU machine, as much as the rest of the call.
"""

from __future__ import annotations

import torch

from . import _common
from .packed import boundary_targets, check_cu_seqlens
from .parallel import vocab_shard
from .reference import get_logps_reference


def stats_rows(with_stats: bool) -> int:
    """Rows of the per-row statistics bundle: zy, m, logs, w; with the optional statistics also
    sum p (z - m), log sum p^2, sum z and the max before the label (kernels/logps.py)."""
    return 8 if with_stats else 4


def _alloc_stats(B: int, R: int, acc: torch.dtype, device, with_stats: bool) -> torch.Tensor:
    # One allocation, (4 or 8, B, R); rows of weight 0 are written as 0 by the kernel.
    return torch.empty((stats_rows(with_stats), B, R), dtype=acc, device=device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seq_reduce(launchers, parts, labels, *, V, shift, reduction, cu_seqlens=None, shard=None):
    """The per-sequence reduction of row statistics, after merging them across the vocab shards
    of a vocab-parallel call (`shard`); per packed sequence with `cu_seqlens`."""
    if shard is not None:
        from .parallel import combine_shards

        combine_shards(parts, labels, shift, shard)
        V = shard.size
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    return launchers.seq_reduce(parts, labels, V=V, shift=shift, reduction=reduction, **packed)


def local_columns(x: torch.Tensor, shard) -> torch.Tensor:
    """The columns of a vocab shard that hold vocabulary ids (a view: the padding is dropped)."""
    return x if shard is None or shard.valid == x.shape[-1] else x[..., : shard.valid]


def _forward(logits, labels, mask, shift, ignore_index, temperature, softcap, reduction, impl,
             with_stats, cu_seqlens=None, shard=None):
    """(out, counts, bad, stats, ext): the implementation behind both the op and the Function.
    ext is the (4, ...) bundle of reduced statistics (entropy, log sum p^2, mean logit, top-1)
    with `with_stats`, else None (the op returns an empty tensor: its outputs are tensors).
    cu_seqlens: packed sequences (B = 1); shard: this rank's VocabShard (vocab-parallel)."""
    launchers = _common.backend(impl, logits.device)
    B, T, V = logits.shape
    R = max(T - shift, 0)
    stats = _alloc_stats(B, R, _acc_dtype(logits.dtype), logits.device, with_stats)
    parts = stats.unbind(0)
    launchers.row_stats(local_columns(logits, shard), labels, mask, stats=parts, shift=shift,
                        vocab_start=shard.start if shard is not None else 0,
                        ignore_index=ignore_index, inv_temp=1.0 / temperature, softcap=softcap)
    out, counts, bad, ext = seq_reduce(launchers, parts, labels, V=V, shift=shift,
                                       reduction=reduction, cu_seqlens=cu_seqlens, shard=shard)
    return out, counts, bad, stats, ext


def token_grads(grad_out, grad_entropy, counts, cu_seqlens, R, shift, reduction):
    """(grad_out, grad_entropy, reduction) for the row backward: a packed call's per-sequence
    gradients spread over its rows (then reduced per token, "none")."""
    if cu_seqlens is None:
        return grad_out, grad_entropy, reduction
    from .packed import token_grads as spread

    grad_out = spread(grad_out, counts, cu_seqlens, R, shift, reduction)
    if grad_entropy is not None:
        grad_entropy = spread(grad_entropy, counts, cu_seqlens, R, shift, reduction)
    return grad_out, grad_entropy, "none"


def _backward(grad_out, logits, labels, stats, counts, shift, temperature, softcap, reduction, impl,
              grad, grad_entropy=None, cu_seqlens=None, shard=None):
    launchers = _common.backend(impl, logits.device)
    grad_out, grad_entropy, reduction = token_grads(grad_out, grad_entropy, counts, cu_seqlens,
                                                    stats.shape[2], shift, reduction)
    if shard is not None and shard.valid < logits.shape[-1]:
        grad[..., shard.valid :].zero_()  # padding columns of the last shard
    launchers.row_grad(local_columns(logits, shard), local_columns(grad, shard), labels,
                       stats.unbind(0), grad_out, counts, shift=shift,
                       vocab_start=shard.start if shard is not None else 0,
                       inv_temp=1.0 / temperature, softcap=softcap, reduction=reduction,
                       grad_entropy=grad_entropy)
    return grad


# ---- torch.library ops: what torch.compile, CUDA graphs and opcheck see -------------------------

@torch.library.custom_op("fused_dpo::logps", mutates_args=())
def logps_op(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, shift: int,
    ignore_index: int | None, temperature: float, softcap: float | None, reduction: str, impl: str,
    with_stats: bool, entropy_grad: bool, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, counts, bad, stats, ext) for `get_logps`; stats (4 or 8, B, R) are saved for the
    backward. entropy_grad only tells autograd whether ext carries a gradient."""
    out, counts, bad, stats, ext = _forward(logits, labels, mask, shift, ignore_index, temperature,
                                            softcap, reduction, impl, with_stats, cu_seqlens)
    return out, counts, bad, stats, ext if ext is not None else out.new_empty((0,))


def fake_outputs(like, B, R, acc, reduction, with_stats, cu_seqlens=None):
    """Empty outputs shaped as the forward's (out, counts, bad, stats, ext), for fake kernels."""
    n_seq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    shape = (B, R) if reduction == "none" else (n_seq,)
    return (like.new_empty(shape, dtype=acc), like.new_empty((n_seq,), dtype=acc),
            like.new_empty((n_seq,), dtype=torch.int32),
            like.new_empty((stats_rows(with_stats), B, R), dtype=acc),
            like.new_empty((4, *shape) if with_stats else (0,), dtype=acc))


@logps_op.register_fake
def _(logits, labels, mask, shift, ignore_index, temperature, softcap, reduction, impl, with_stats,
      entropy_grad, cu_seqlens=None):
    B, T, _V = logits.shape
    return fake_outputs(logits, B, max(T - shift, 0), _acc_dtype(logits.dtype), reduction,
                        with_stats, cu_seqlens)


@torch.library.custom_op("fused_dpo::logps_backward", mutates_args=())
def logps_backward_op(
    grad_out: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
    counts: torch.Tensor, shift: int, temperature: float, softcap: float | None, reduction: str,
    impl: str, grad_entropy: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _backward(grad_out, logits, labels, stats, counts, shift, temperature, softcap,
                     reduction, impl, grad, grad_entropy, cu_seqlens)


@logps_backward_op.register_fake
def _(grad_out, logits, labels, stats, counts, shift, temperature, softcap, reduction, impl,
      grad_entropy, cu_seqlens=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, _mask, shift, _ii, temperature, softcap, reduction, impl, _ws, ent_grad, cu = inputs
    _out, counts, _bad, stats, ext = output
    ctx.save_for_backward(logits, labels, stats, counts, cu)
    ctx.args = (shift, temperature, softcap, reduction, impl)
    ctx.entropy_grad = ent_grad
    ctx.mark_non_differentiable(counts, _bad, stats, *(() if ent_grad else (ext,)))


def _op_backward(ctx, grad_out, _gc, _gb, _gs, grad_ext):
    logits, labels, stats, counts, cu = ctx.saved_tensors
    grad_out, ge = _common.upstream_grads(ctx.entropy_grad, grad_out, grad_ext)  # materialized
    grad = logps_backward_op(grad_out, logits, labels, stats, counts, *ctx.args, ge, cu)
    return (grad,) + (None,) * 11


logps_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---- eager: the same implementation behind a plain autograd.Function ---------------------------

class _NoDoubleBackward(torch.autograd.Function):
    """The identity on a backward's results, whose own backward raises: what the fused ops'
    backwards return when autograd records them (create_graph=True, torch.func), so that a
    second differentiation fails with a clear message instead of inside the kernels' in-place
    temporaries. The anchors (the saved inputs that require grad) tie it into the graph."""

    @staticmethod
    def forward(what, n_anchors, *tensors):
        return tuple(t.view_as(t) for t in tensors[n_anchors:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.what = inputs[0]

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(
            f"fused_dpo.{ctx.what} has no double backward: its backward runs fused kernels that "
            "are not differentiable themselves (create_graph=True followed by a second backward, "
            "nested torch.func.grad, a gradient penalty through it). For higher-order gradients use "
            "impl='reference', the eager formula.")


def functorch_wrapped(t: torch.Tensor) -> bool:
    """True for a torch.func (functorch) wrapper: a backward under torch.func.grad / vjp sees
    its saved tensors so wrapped, and a Triton launch cannot read them (no storage); the
    torch.library backward op unwraps them through the dispatcher."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def first_order_only(what: str, anchors, grads: tuple) -> tuple:
    """`grads` (a backward's results, None where not needed) routed through _NoDoubleBackward
    when grad mode is on in the backward, i.e. when autograd records it; else as they are."""
    if not torch.is_grad_enabled():  # a plain backward: nothing recorded, nothing to do
        return grads
    anchors = [a for a in anchors if a is not None and a.requires_grad]
    present = [g for g in grads if g is not None]
    if not (anchors and present):
        return grads
    wrapped = iter(_NoDoubleBackward.apply(what, len(anchors), *anchors, *present))
    return tuple(None if g is None else next(wrapped) for g in grads)


class _Logps(torch.autograd.Function):
    """Forward and setup_context apart (torch.func.grad / vjp need it); the stats bundle is an
    output (non-differentiable) so that setup_context can save it."""

    @staticmethod
    def forward(logits, labels, mask, shift, ignore_index, temperature, softcap, reduction,
                impl, with_stats, entropy_grad, inplace_backward, cu_seqlens, shard):
        out, counts, bad, stats, ext = _forward(logits, labels, mask, shift, ignore_index,
                                                temperature, softcap, reduction, impl, with_stats,
                                                cu_seqlens, shard)
        return out, counts, bad, ext, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        (logits, labels, _mask, shift, _ii, temperature, softcap, reduction, impl, _ws,
         entropy_grad, inplace_backward, cu_seqlens, shard) = inputs
        _out, counts, bad, ext, stats = output
        ctx.save_for_backward(logits, labels, stats, counts, cu_seqlens)
        ctx.args = (shift, temperature, softcap, reduction, impl)
        ctx.shard = shard
        ctx.inplace_backward = inplace_backward
        ctx.entropy_grad = entropy_grad
        ctx.mark_non_differentiable(counts, bad, stats,
                                    *(() if entropy_grad or ext is None else (ext,)))
        ctx.set_materialize_grads(False)  # no zero-filled gradients for counts / bad

    @staticmethod
    def backward(ctx, grad_out, _gc, _gb, grad_ext, _gs):
        grads = _common.upstream_grads(ctx.entropy_grad, grad_out, grad_ext)
        if grads is None:
            return (None,) * 14
        grad_out, ge = grads
        logits, labels, stats, counts, cu_seqlens = ctx.saved_tensors
        with torch.no_grad():  # under create_graph: nothing of the kernels' temporaries recorded
            if functorch_wrapped(logits) and ctx.shard is None:  # torch.func: the op unwraps
                grad = logps_backward_op(grad_out, logits, labels, stats, counts, *ctx.args, ge,
                                         cu_seqlens)
            else:
                grad = logits if ctx.inplace_backward else torch.empty(
                    logits.shape, dtype=logits.dtype, device=logits.device)
                _backward(grad_out, logits, labels, stats, counts, *ctx.args, grad, ge,
                          cu_seqlens, ctx.shard)
        return first_order_only("get_logps", (logits,), (grad,)) + (None,) * 13


@torch.compiler.disable
def _apply_eager(*args):
    """The vocab-parallel call: its all-reduces run eagerly (a graph break under torch.compile)."""
    return _Logps.apply(*args)


def _may_overlap(t: torch.Tensor) -> bool:
    """True when two indices of t can address the same element (an expanded or strided-overlap
    view): writing a gradient into such storage would mix rows."""
    span = 0  # furthest offset reachable through the dimensions seen so far
    dims = sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1)
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def get_logps(
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
    impl: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
    stats=None,
    entropy_grad: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
):
    """Log-probability of each sequence's response tokens, fused: no (B, T, V) float32 tensor.

    Computes exactly::

        z = softcap(logits[:, :-1]) / temperature     # position t predicts token t+1
        logps = log_softmax(z.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        out = (logps * response_mask[:, 1:]).sum(-1)

    with softcap(x) = c * tanh(x / c) (Gemma 2) when `softcap=c` is given. With shift=False the
    inputs are already aligned: position t of the logits scores input_ids[:, t] (TRL's
    `selective_log_softmax` contract: pass `logits[:, :-1]` and `input_ids[:, 1:]` as views).

    Args:
        logits: (B, T, V) float32 / bfloat16 / float16 (float64 for tests), any strides.
        input_ids: (B, T) int32/int64 token ids.
        response_mask: (B, T) bool/int/float, nonzero at response tokens; its values weight the
            tokens. None counts every position. A constant: a mask that requires grad is refused
            (ValueError), as no gradient would reach it; for differentiable token weights take
            reduction="none" and weight the per-token log-probs.
        labels: (B, T) ids in the HF/TRL convention instead of input_ids + response_mask: aligned
            with input_ids, `ignore_index` marks positions that do not count.
        shift: True (default) scores position t with token t+1; False with token t.
        reduction: "sum" -> (B,); "mean" -> sum / count (count = the sum of the weights), 0 when
            the count is 0; "none" -> (B, R) per-token log-probs (R = T-1, or T unshifted), 0 at
            non-response positions.
        return_counts: also return the (B,) response-token counts (sum of the weights).
        temperature, softcap: applied inside the kernel, gradients included.
        impl: "triton" (CUDA), "torch" (chunked PyTorch, never an (N, V) float32 tensor),
            "reference" (the eager code in fused_dpo.reference), "auto" = triton on CUDA, else torch.
        inplace_backward: write the logits gradient into the logits' own storage (saves one
            B*T*V buffer). The logits are OVERWRITTEN by backward: use only when nothing else
            needs them afterwards. Refused for views whose elements alias (expanded tensors).
            Inside torch.compile it is ignored: the compiled graph gets a fresh gradient buffer.
        validate: check that label ids at scored positions lie in [0, V). Eager: a ValueError
            naming the first bad position, at the cost of one host sync after the kernels. Inside
            torch.compile or CUDA graph capture: a device-side assert (`torch._assert_async`), no
            sync. With validate=False an out-of-range id gives NaN, never a wrong number.
        stats: per-token statistics computed in the same pass over each row, any of
            "entropy" (H = lse - sum_v p_v z_v), "log_sum_sq_probs" (log sum_v p_v^2),
            "mean_logits" (mean_v z_v) and "is_top1" (1.0 when the label is the argmax, the
            first maximum as torch.argmax picks it), z the softcapped, tempered logits. Each is
            reduced as the log-probs are: the token's weight times its value, summed, or
            divided by the count ("mean"), or per token ("none", 0 off the response).
        entropy_grad: the entropy carries a gradient (an entropy bonus); its backward rides in
            the same kernel as the log-probs'. Otherwise the statistics are detached: only
            `logps` (and with this flag `entropy`) ever carry gradients.
        cu_seqlens: packed (padding-free) inputs: (S + 1,) int32 offsets of S sequences
            concatenated in one row, logits (1, total_T, V) and ids / mask / labels (1, total_T).
            Each sequence is scored on its own: with the shift, a sequence's first token is
            never predicted from the previous one's last position. "sum" / "mean", counts and
            statistics are per sequence, (S,); "none" stays per token, (1, total_T - 1) (the
            first token of each sequence, as a target, holds 0). Zero-length sequences are
            allowed (offsets may repeat: a fixed S for CUDA graphs). With validate the offsets
            are checked (0 first, total_T last, non-decreasing; one host sync).
        process_group: vocab-parallel (Megatron tensor parallelism): logits (B, T, V_local) hold
            this rank's contiguous vocab shard, columns [vocab_start, vocab_start + V_local);
            the widths may differ across ranks (DTensor's Shard(0): V = 100 over 3 ranks is
            34, 34, 32). Every rank of the group passes the same ids / mask / labels and gets
            the same, global, result. First one small all-gather of every rank's layout (its
            width, vocab_start, vocab_size and, with validate, a fingerprint of its ids and
            mask; one host sync): shards that overlap or leave a gap, or ranks that disagree,
            raise the same ValueError on every rank. Forward: the local row pass, then one MAX
            and one SUM all-reduce of the rows' (max, sum-exp, label logit, statistics'
            partials); backward: the local logits gradient, no communication. Eager only (a
            graph break under torch.compile); impl "reference" is refused.
        vocab_start: global id of this rank's first column; default the sum of the widths of
            the lower ranks (rank * V_local for equal shards). Passing it needs vocab_size, on
            every rank. With validate=False and both given, the all-gather is skipped (no
            sync): the layout is trusted, and a label that no shard or two shards hold gives
            NaN.
        vocab_size: the global vocabulary size; default the sum of the widths. Columns whose
            global id is >= vocab_size (the last shard's padding) are ignored, their gradient 0.

    Returns:
        float32 (float64 for float64 logits) tensor as per `reduction`; with return_counts a
        tuple (logps, counts); with non-empty `stats` a `LogpsStats` named tuple (logps, counts, entropy,
        log_sum_sq_probs, mean_logits, is_top1), None for the statistics not asked for.
        Non-response positions are never read, so NaN there is ignored; NaN or inf in a
        response row gives NaN for that sequence.

    Autograd: first-order gradients, also under `torch.func.grad` / `torch.func.vjp` and with
    `create_graph=True`; differentiating the gradient again (double backward, a gradient
    penalty, nested torch.func.grad) raises a RuntimeError: use impl="reference" for that.
    vmap (and jacrev / hessian, built on it) is not supported. Meta-device inputs run the fake
    kernels: outputs and gradients with the right shapes and dtypes, no validation.
    """
    _common.check_float("logits", logits, 3)
    _common.check_options(reduction, temperature, softcap, impl)
    stats = _common.check_stats(stats, entropy_grad)
    B, T, V = logits.shape
    if V < 1:  # T = 0 is allowed: empty outputs (an all-masked, compacted micro-batch)
        raise ValueError(f"logits has shape {tuple(logits.shape)}; need V >= 1")
    tg = _common.check_targets((B, T), logits.device, input_ids, response_mask, labels,
                               ignore_index, "logits")
    shard = vocab_shard(process_group, V, vocab_start, vocab_size, "logits", impl=impl,
                        device=logits.device, targets=tg, validate=validate)
    on_meta = logits.device.type == "meta"  # shapes only: the fake kernels, nothing to validate
    validate = validate and not on_meta
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T, logits.device, "logits", validate)
        tg = boundary_targets(tg, cu_seqlens, int(shift))
    if impl == "reference":
        if inplace_backward:
            raise ValueError("impl='reference' has no in-place backward; use impl='triton'/'torch'")
        if validate:
            _common.raise_bad_labels(tg, V, int(shift))
        return get_logps_reference(
            logits, input_ids, response_mask, labels=labels, ignore_index=ignore_index, shift=shift,
            reduction=reduction, return_counts=return_counts, temperature=temperature,
            softcap=softcap, stats=stats, entropy_grad=entropy_grad, cu_seqlens=cu_seqlens,
        )
    if inplace_backward and _may_overlap(logits):
        raise ValueError(
            f"inplace_backward=True needs logits whose elements do not alias; got strides "
            f"{logits.stride()} for shape {tuple(logits.shape)} (an expanded view?)"
        )
    s = int(shift)
    softcap = float(softcap) if softcap is not None else None
    with_stats, entropy_grad = bool(stats), bool(entropy_grad)
    if shard is not None:
        out, counts, bad, ext, _stats = _apply_eager(logits, tg.labels, tg.mask, s,
                                                     tg.ignore_index, float(temperature), softcap,
                                                     reduction, impl, with_stats, entropy_grad,
                                                     inplace_backward, cu_seqlens, shard)
    elif torch.compiler.is_compiling() or on_meta:
        out, counts, bad, _stats, ext = logps_op(logits, tg.labels, tg.mask, s, tg.ignore_index,
                                                 float(temperature), softcap, reduction, impl,
                                                 with_stats, entropy_grad, cu_seqlens)
    else:
        out, counts, bad, ext, _stats = _Logps.apply(logits, tg.labels, tg.mask, s,
                                                     tg.ignore_index, float(temperature), softcap,
                                                     reduction, impl, with_stats, entropy_grad,
                                                     inplace_backward, cu_seqlens, None)
    if validate:
        _common.check_bad_count(bad, tg, shard.size if shard is not None else V, s)
    if with_stats:
        return _common.stats_result(out, counts, ext, stats, entropy_grad)
    return (out, counts) if return_counts else out
