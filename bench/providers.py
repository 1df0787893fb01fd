"""Implementations under test, each a callable (logits, ids, mask) -> (B,) log-probs, or
(hidden, weight, ids, mask) -> (B,) for the hidden-state path.

Optional ones (Liger-Kernel, Cut Cross-Entropy, TRL 1.16's kernels) are None, and skipped with a
note, when not installed.

Rows with an entropy (issue 11: GRPO/PPO's per-token entropy, with or without an entropy bonus):
`<name>+stats` computes the entropy, mean logit and top-1 in the same call (detached: the
backward is the log-probs' alone), `<name>+entropy_grad` the same with a gradient through the
entropy, as the loss logps.sum() + ENTROPY_COEF * entropy.sum() would ask. Each still returns the
(B,) log-prob sums, so the bench's error column stays that of the log-probs, and carries
`.entropy(*inputs)`, the (B,) entropy sums, for its entropy error column.
"""

from __future__ import annotations

import sys
import types
from contextlib import nullcontext

import torch

from fused_dpo import get_logps, get_logps_from_hidden
from fused_dpo.reference import get_logps_from_hidden_reference, get_logps_reference

# TRL's fused_lm_head patch passes this vocabulary chunk (trl/trainer/utils.py, 1.16.0).
TRL_CHUNK_SIZE = 32768
# The statistics a GRPO/PPO trainer logs per token (TRL 1.16 logs these three), and the weight of
# the entropy bonus in the "+entropy_grad" rows' loss.
RL_STATS = ("entropy", "mean_logits", "is_top1")
ENTROPY_COEF = 0.01


def _with_entropy(call, entropy_grad: bool):
    """A provider from `call(*inputs) -> ((B,) log-prob sums, thunk giving the (B,) entropy sums)`.

    Its value is the log-prob sums, with nothing else run when the entropy is detached. With
    `entropy_grad` its gradient is that of logps.sum() + ENTROPY_COEF * entropy.sum():
    `entropy - entropy.detach()` is 0 in value and the entropy in gradient (a few (B,)-sized ops,
    a few microseconds beside the B*T*V work). `.entropy(*inputs)` returns the entropy sums for
    the bench's error check."""

    def provider(*inputs):
        logps, entropy = call(*inputs)
        if not entropy_grad:
            return logps
        e = entropy()
        return torch.add(logps, e - e.detach(), alpha=ENTROPY_COEF)

    provider.entropy = lambda *inputs: call(*inputs)[1]()
    return provider


def _trl_row_loop(logits, ids, mask):
    # TRL-style: per-sequence log_softmax in a Python loop (less peak memory, more launches).
    out = []
    for b in range(logits.shape[0]):
        lp = torch.log_softmax(logits[b, :-1].float(), -1)
        tok = lp.gather(-1, ids[b, 1:, None]).squeeze(-1)
        out.append((tok * mask[b, 1:]).sum())
    return torch.stack(out)


def trl_kernels():
    """`trl.kernels` of TRL >= 1.16, or None. Only torch, transformers and (for the logits kernel)
    triton are needed: `make gpu-wheels` carries the trl wheel alone. The hidden path's backward
    imports `maybe_gather_lm_head_ctx` from `trl.trainer.utils`, which pulls in accelerate,
    datasets and pandas; where those are missing it gets a stand-in module with the same function
    for the no-ZeRO-3 case it would take here anyway (a null context)."""
    try:
        import trl.kernels as k
    except ImportError:
        return None
    if "trl.trainer.utils" not in sys.modules:
        try:
            import trl.trainer.utils  # noqa: F401
        except ImportError as e:
            print(f"  (trl.trainer.utils does not import here ({e}); a stand-in gives its "
                  "maybe_gather_lm_head_ctx, a null context without DeepSpeed ZeRO-3)")
            stub = types.ModuleType("trl.trainer.utils")
            stub.maybe_gather_lm_head_ctx = lambda *params: nullcontext()
            sys.modules["trl.trainer.utils"] = stub
    return k


def trl_logits_provider(entropy_grad: bool = False):
    """TRL 1.16's `selective_log_softmax_and_entropy` kernel (log-probs and entropy in one pass) on
    the shifted views, prompt rows skipped by its row mask, summed per sequence with the mask.
    The entropy is always computed; with entropy_grad it carries the bonus's gradient, else it is
    dropped before the backward (the kernel then skips its entropy term)."""
    k = trl_kernels()
    fn = getattr(k, "selective_log_softmax_and_entropy", None) if k is not None else None
    if fn is None:
        return None

    def call(x, i, m):
        lp, entropy = fn(x[:, :-1], i[:, 1:], 1.0, m[:, 1:])
        w = m[:, 1:]
        # the thunk runs for the entropy rows and the error check only: in the plain row the
        # entropy reaches no loss, and TRL's backward skips its term
        return (lp * w).sum(-1), lambda: (entropy * w).sum(-1)

    return _with_entropy(call, entropy_grad)


def trl_hidden_provider(stats: bool = False, entropy_grad: bool = False):
    """TRL 1.16's `ChunkedLogProbFunction` as its fused_lm_head patch calls it: response rows
    compacted (`hidden[:, :-1][mask]`), chunk 32768, scattered back and summed. Log-probs only by
    default; with `stats` also RL_STATS (its optional outputs of the same names), the entropy
    with a gradient when `entropy_grad`."""
    k = trl_kernels()
    if k is None or not hasattr(k, "ChunkedLogProbFunction"):
        return None
    fn = k.ChunkedLogProbFunction
    outputs = RL_STATS if stats else ()

    def call(h, w, i, m):
        mask = m[:, 1:] != 0
        lp, entropy, *_ = fn.apply(h[:, :-1][mask], w, None, i[:, 1:][mask], 1.0, TRL_CHUNK_SIZE,
                                   None, 1.0, outputs)
        back = lambda t: t.new_zeros(mask.shape).masked_scatter(mask, t).sum(-1)
        return back(lp), lambda: back(entropy)

    provider = _with_entropy(call, entropy_grad)
    if not stats:
        del provider.entropy  # log-probs only
    return provider


def logits_providers() -> dict:
    # fused first: when a stage's time budget runs out, the rows that matter most are in.
    def fused_stats(entropy_grad):
        def call(x, i, m):
            o = get_logps(x, i, m, impl="triton", validate=False, stats=RL_STATS, entropy_grad=entropy_grad)
            return o.logps, lambda: o.entropy

        return _with_entropy(call, entropy_grad)

    p = {
        "fused_triton": lambda x, i, m: get_logps(x, i, m, impl="triton", validate=False),
        "fused_triton+stats": fused_stats(False),
        "fused_triton+entropy_grad": fused_stats(True),
        "fused_torch": lambda x, i, m: get_logps(x, i, m, impl="torch", validate=False),
        "trl_kernel": trl_logits_provider(),
        "trl_kernel+entropy_grad": trl_logits_provider(entropy_grad=True),
        "eager": lambda x, i, m: get_logps_reference(x, i, m),
        "torch.compile": torch.compile(lambda x, i, m: get_logps_reference(x, i, m)),
        "trl_row_loop": _trl_row_loop,
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger_ce = LigerCrossEntropyLoss(reduction="none")

        def liger(x, i, m):
            # Per-token cross-entropy, then summed per sequence (how Liger is used for DPO logps).
            B, T, V = x.shape
            tgt = torch.where(m[:, 1:], i[:, 1:], -100).reshape(-1)
            nll = liger_ce(x[:, :-1].reshape(-1, V), tgt)
            nll = nll[0] if isinstance(nll, tuple) else nll
            return -nll.view(B, T - 1).float().sum(-1)

        p["liger_ce"] = liger
    except ImportError:
        p["liger_ce"] = None
    return p


def hidden_providers() -> dict:
    def fused_stats(entropy_grad):
        def call(h, w, i, m):
            o = get_logps_from_hidden(h, w, i, m, impl="triton", stats=RL_STATS, entropy_grad=entropy_grad)
            return o.logps, lambda: o.entropy

        return _with_entropy(call, entropy_grad)

    p = {
        "fused_triton": lambda h, w, i, m: get_logps_from_hidden(h, w, i, m, impl="triton"),
        "fused_triton+stats": fused_stats(False),
        "fused_triton+entropy_grad": fused_stats(True),
        "fused_torch": lambda h, w, i, m: get_logps_from_hidden(h, w, i, m, impl="torch"),
        "eager": lambda h, w, i, m: get_logps_from_hidden_reference(h, w, i, m),
        "trl_chunked": trl_hidden_provider(),
        "trl_chunked+stats": trl_hidden_provider(stats=True),
        "trl_chunked+entropy_grad": trl_hidden_provider(stats=True, entropy_grad=True),
    }
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, i, m):
            # The whole (contiguous) hidden with targets shifted by hand: position t scores token
            # t+1, the last position is ignored. (Passing h[:, :-1] makes Cut-CE copy it.)
            tgt = torch.where(m[:, 1:], i[:, 1:], -100)
            tgt = torch.cat([tgt, tgt.new_full((tgt.shape[0], 1), -100)], 1)
            nll = linear_cross_entropy(h, w, tgt, reduction="none")
            # A product, not a bare .sum(-1): the sum's backward hands Cut-CE an expanded
            # (stride-0) gradient, and its backward calls grad_out.view(-1), which fails on one
            # ("view size is not compatible with input tensor's size and stride", 2026-11-27 run).
            return -(nll.float() * (tgt != -100)).sum(-1)

        p["cut_ce"] = cce
    except ImportError:
        p["cut_ce"] = None
    p["torch_linear_ce"] = torch_linear_ce_provider()
    return p


def torch_linear_ce_provider():
    """PyTorch's own `torch.nn.functional.linear_cross_entropy(..., reduction="none",
    options=LinearCrossEntropyOptions())` (torch 2.13+: the batch-chunked implementation, no full
    logits): per-token log-probs = -CE, summed per sequence with the mask. None on older torch
    (the GPU image's torch 2.11 has neither), with a note."""
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options is None:
        print(f"  (torch {torch.__version__} has no nn.functional.linear_cross_entropy with "
              "LinearCrossEntropyOptions: the torch_linear_ce row needs torch >= 2.13)")
        return None

    def call(h, w, i, m):
        B, T, H = h.shape
        tgt = torch.where(m[:, 1:], i[:, 1:], -100)
        # one (B*(T-1), H) copy of the scored positions' inputs: the op takes 2-D input
        ce = fn(h[:, :-1].reshape(-1, H), w, tgt.reshape(-1), reduction="none", ignore_index=-100,
                options=options())
        return -(ce.float().view(B, T - 1) * (tgt != -100)).sum(-1)

    return call
