"""TRL's per-token metrics of the policy, from the statistics the log-prob kernels compute in the
same pass as the log-probs (no logits built on the hidden path).

TRL 1.16's DPOTrainer logs them as token-weighted averages over the batch:

    entropy              sum of the per-token entropy over every response token, chosen and
                         rejected, / those tokens
    logits/chosen        sum of the per-token mean logit (over the vocabulary) over the chosen
                         response tokens / those tokens; logits/rejected likewise
    mean_token_accuracy  chosen response tokens whose label is the argmax / chosen response tokens

each 0.0 when there are no tokens. Here the sums run over every micro-batch of an optimizer step
(TRL averages the per-micro-batch ratios instead; the two agree without gradient accumulation),
and over the whole held-out set for the eval/ ones.
"""

from __future__ import annotations

import torch

from .. import LogpsStats

STATS = ("entropy", "mean_logits", "is_top1")  # what the policy's LogpsHead asks for
KEYS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def token_sums(s: LogpsStats, n_pairs: int) -> torch.Tensor:
    """(len(KEYS), 2) float64 [sum over tokens, tokens] of each metric, for one [chosen; rejected]
    batch of n_pairs pairs whose per-sequence sums (reduction "sum") and counts are in `s`."""
    B = n_pairs
    n, ent, ml, top1 = (t.detach().double() for t in (s.counts, s.entropy, s.mean_logits, s.is_top1))
    rows = [(ent, n), (ml[:B], n[:B]), (ml[B:], n[B:]), (top1[:B], n[:B])]
    return torch.stack([torch.stack([x.sum(), w.sum()]) for x, w in rows])


def averages(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """{prefix + key: sum / tokens} from (accumulated) `token_sums`; 0.0 where there are no tokens."""
    return {prefix + k: (x / w if w > 0 else 0.0) for k, (x, w) in zip(KEYS, sums.tolist(), strict=True)}
