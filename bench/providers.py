"""Implementations under test, each a callable (logits, ids, mask) -> (B,) log-probs.

Optional ones (Liger-Kernel, Cut Cross-Entropy) are skipped with a note when not installed.
"""

from __future__ import annotations

import torch

from fused_dpo import get_logps, get_logps_from_hidden
from fused_dpo.reference import get_logps_from_hidden_reference, get_logps_reference


def _trl_row_loop(logits, ids, mask):
    # TRL-style: per-sequence log_softmax in a Python loop (less peak memory, more launches).
    out = []
    for b in range(logits.shape[0]):
        lp = torch.log_softmax(logits[b, :-1].float(), -1)
        tok = lp.gather(-1, ids[b, 1:, None]).squeeze(-1)
        out.append((tok * mask[b, 1:]).sum())
    return torch.stack(out)


def logits_providers() -> dict:
    # fused first: when a stage's time budget runs out, the rows that matter most are in.
    p = {
        "fused_triton": lambda x, i, m: get_logps(x, i, m, impl="triton", validate=False),
        "fused_torch": lambda x, i, m: get_logps(x, i, m, impl="torch", validate=False),
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
    }
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, i, m):
            # Shifted by hand (not CCE's own shift) so the output shape is unambiguous: (B, T-1).
            B, T, _ = h.shape
            tgt = torch.where(m[:, 1:], i[:, 1:], -100)
            nll = linear_cross_entropy(h[:, :-1], w, tgt, reduction="none")
            return -nll.reshape(B, T - 1).float().sum(-1)

        p["cut_ce"] = cce
    except ImportError:
        p["cut_ce"] = None
    return p
