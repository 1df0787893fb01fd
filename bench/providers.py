"""Implementations under test, each a callable (logits, ids, mask) -> (B,) log-probs, or
(hidden, weight, ids, mask) -> (B,) for the hidden-state path.

Optional ones (Liger-Kernel, Cut Cross-Entropy, TRL 1.16's kernels) are None, and skipped with a
note, when not installed.
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


def trl_logits_provider():
    """TRL 1.16's `selective_log_softmax_and_entropy` kernel (log-probs and entropy in one pass) on
    the shifted views, prompt rows skipped by its row mask, summed per sequence with the mask."""
    k = trl_kernels()
    fn = getattr(k, "selective_log_softmax_and_entropy", None) if k is not None else None
    if fn is None:
        return None

    def trl_kernel(x, i, m):
        lp, _entropy = fn(x[:, :-1], i[:, 1:], 1.0, m[:, 1:])
        return (lp * m[:, 1:]).sum(-1)

    return trl_kernel


def trl_hidden_provider():
    """TRL 1.16's `ChunkedLogProbFunction` as its fused_lm_head patch calls it: response rows
    compacted (`hidden[:, :-1][mask]`), chunk 32768, log-probs only, scattered back and summed."""
    k = trl_kernels()
    if k is None or not hasattr(k, "ChunkedLogProbFunction"):
        return None
    fn = k.ChunkedLogProbFunction

    def trl_chunked(h, w, i, m):
        mask = m[:, 1:] != 0
        lp = fn.apply(h[:, :-1][mask], w, None, i[:, 1:][mask], 1.0, TRL_CHUNK_SIZE, None, 1.0,
                      ("log_probs",))[0]
        return lp.new_zeros(mask.shape).masked_scatter(mask, lp).sum(-1)

    return trl_chunked


def logits_providers() -> dict:
    # fused first: when a stage's time budget runs out, the rows that matter most are in.
    p = {
        "fused_triton": lambda x, i, m: get_logps(x, i, m, impl="triton", validate=False),
        "fused_torch": lambda x, i, m: get_logps(x, i, m, impl="torch", validate=False),
        "trl_kernel": trl_logits_provider(),
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
    p = {
        "fused_triton": lambda h, w, i, m: get_logps_from_hidden(h, w, i, m, impl="triton"),
        "fused_torch": lambda h, w, i, m: get_logps_from_hidden(h, w, i, m, impl="torch"),
        "eager": lambda h, w, i, m: get_logps_from_hidden_reference(h, w, i, m),
        "trl_chunked": trl_hidden_provider(),
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
    return p
