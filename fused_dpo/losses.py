"""Every DPO-family loss, in one place, in plain PyTorch on per-sequence log-probs.

Notation (per pair i): pi_c, pi_r = policy log-probs of the chosen / rejected response (summed over
response tokens), ref_c, ref_r = the same under the reference model, n_c, n_r = response token
counts, beta > 0. Log-ratios: h_c = pi_c - ref_c, h_r = pi_r - ref_r; margin logits u = h_c - h_r.
The implicit rewards reported as metrics are beta * h_c and beta * h_r (beta * average log-prob for
the reference-free losses).

`dpo_loss(...)` returns (loss, metrics) with TRL's metric names. The per-pair losses are averaged
over the batch (`reduction="mean"`); `reduction="none"` returns them per pair. `sft` is one value
for the batch (its NLL per chosen token, as in TRL 1.16), repeated in every pair's entry. Several
losses can be combined with weights, as in MPO (Wang et al., 2024).

Options shared by several losses (TRL 1.16's DPOTrainer applies them the same way):
- `f_divergence_type` (f-DPO): the log-ratios enter the chosen-minus-rejected difference through
  a score s = f'(exp h) instead of h itself (`f_divergence_scores`).
- `ld_alpha` (LD-DPO): every summed log-prob, policy and reference, is replaced by its prefix over
  the first min(n_c, n_r) response tokens plus ld_alpha times the rest (`ld_prefix_logps`).
- `use_weighting` (WPO): each pair's loss is multiplied by a detached weight from the policy's
  per-token log p(y_t) - log sum_v p_v^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("simpo", "orpo", "sft")
NEEDS_COUNTS = ("ipo", "sigmoid_norm", "simpo", "orpo", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses that read the log-ratios only through chosen minus rejected (sft reads none), TRL 1.16's
# list: f-DPO's reparameterisation leaves a beta log Z(x) term that cancels only in that difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                           "sft")
# Their i-th loss belongs to the i-th quantile of the batch, not to pair i.
SORTED_LOSS_TYPES = ("aot", "aot_unpaired")


@dataclass
class BCOState:
    """Running mean of the implicit rewards for `bco_pair_running_mean` (BCO's reward shift, Jung
    et al., 2024), updated in place by `dpo_loss(..., bco_state=state)`: an exact mean over every
    reward seen so far. The default `bco_pair` (TRL 1.16's) has no shift and reads no state."""

    mean: float = 0.0
    count: int = 0

    def update(self, rewards: torch.Tensor) -> None:
        n = rewards.numel()
        if n:
            total = self.mean * self.count + float(rewards.detach().double().sum())
            self.count += n
            self.mean = total / self.count


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _mean_logps(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.where(counts > 0, logps / counts.clamp_min(1), torch.zeros_like(logps))


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def sigmoid_loss(u, beta, label_smoothing=0.0):
    """DPO (Rafailov et al., 2023): -log sigmoid(beta * u); with label smoothing eps, cDPO
    (Mitchell, 2023): -(1 - eps) log sigmoid(beta u) - eps log sigmoid(-beta u)."""
    return _smoothed_sigmoid(beta * u, label_smoothing)


def robust_loss(u, beta, label_smoothing):
    """Robust DPO (Chowdhury et al., 2024), unbiased under label-flip rate eps:
    ((1 - eps)(-log sigmoid(beta u)) + eps log sigmoid(-beta u)) / (1 - 2 eps)."""
    z = beta * u
    eps = label_smoothing
    return (-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)


def hinge_loss(u, beta):
    """SLiC (Zhao et al., 2023): max(0, 1 - beta * u)."""
    return torch.relu(1 - beta * u)


def ipo_loss(h_c, h_r, n_c, n_r, beta):
    """IPO (Azar et al., 2023), length-normalised log-ratios: (h_c/n_c - h_r/n_r - 1/(2 beta))^2."""
    u = _mean_logps(h_c, n_c) - _mean_logps(h_r, n_r)
    return (u - 1 / (2 * beta)) ** 2


def exo_pair_loss(u, beta, label_smoothing):
    """EXO (Ji et al., 2024), pairwise reverse KL to the smoothed target distribution:
    sigmoid(beta u)(log sigmoid(beta u) - log(1 - eps)) + sigmoid(-beta u)(log sigmoid(-beta u) - log eps),
    eps = label_smoothing (1e-3 when 0)."""
    eps = label_smoothing or 1e-3
    z = beta * u
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair_loss(h_c, h_r, beta):
    """NCA (Chen et al., 2024): -log sigmoid(beta h_c) - 1/2 log sigmoid(-beta h_c)
    - 1/2 log sigmoid(-beta h_r)."""
    rc, rr = beta * h_c, beta * h_r
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def apo_zero_loss(h_c, h_r, beta):
    """APO-zero (D'Oosterlinck et al., 2024): push chosen up, rejected down:
    (1 - sigmoid(beta h_c)) + sigmoid(beta h_r)."""
    return (1 - torch.sigmoid(beta * h_c)) + torch.sigmoid(beta * h_r)


def apo_down_loss(h_c, h_r, beta):
    """APO-down (D'Oosterlinck et al., 2024): push both down, rejected more:
    sigmoid(beta h_c) + (1 - sigmoid(beta (h_c - h_r)))."""
    return torch.sigmoid(beta * h_c) + (1 - torch.sigmoid(beta * (h_c - h_r)))


def discopop_loss(u, beta, tau=0.05):
    """DiscoPOP (Chris Lu et al., 2024), log-ratio modulated: with z = beta u and
    m = sigmoid(z / tau): (1 - m) * (-log sigmoid(z)) + m * exp(-z)."""
    z = beta * u
    m = torch.sigmoid(z / tau)
    # m * exp(-z) as exp(log m - z): for z << 0, m underflows to 0 while exp(-z) overflows.
    return (1 - m) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)


def bco_pair_loss(h_c, h_r, beta):
    """BCO (Jung et al., 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv 2404.04656) on pairs, as TRL 1.16's DPOTrainer and Liger compute it: the implicit reward
    classifies the chosen response as positive and the rejected one as negative, with no reward
    shift:  -log sigmoid(beta h_c) - log sigmoid(-beta h_r). Each pair's loss reads that pair alone."""
    return -F.logsigmoid(beta * h_c) - F.logsigmoid(-beta * h_r)


def bco_pair_running_mean_loss(h_c, h_r, beta, state: BCOState):
    """BCO with the paper's reward shift delta (Jung et al., 2024, arXiv 2404.04656), here the
    exact running mean of every implicit reward seen so far, this batch's 2B included (`state`,
    updated in place, so the batch is coupled): -log sigmoid(beta h_c - delta)
    - log sigmoid(-(beta h_r - delta)). delta is a constant of the step: no gradient flows into it."""
    rc, rr = beta * h_c, beta * h_r
    state.update(torch.cat([rc, rr]))
    delta = state.mean
    return -F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta))


def simpo_loss(pi_c, pi_r, n_c, n_r, beta, gamma, label_smoothing=0.0):
    """SimPO (Meng et al., 2024), reference-free, length-normalised with target margin gamma:
    -log sigmoid(beta (pi_c/n_c - pi_r/n_r) - gamma) (label-smoothed like cDPO)."""
    u = _mean_logps(pi_c, n_c) - _mean_logps(pi_r, n_r)
    return _smoothed_sigmoid(beta * u - gamma, label_smoothing)


def orpo_loss(pi_c, pi_r, n_c, n_r, beta):
    """ORPO (Hong et al., 2024), reference-free: with mean log-probs a_c, a_r,
    log odds(a) = a - log(1 - exp(a)):  -a_c - beta * log sigmoid(log odds(a_c) - log odds(a_r))
    (the chosen NLL plus the odds-ratio term)."""
    # A zero-length response has mean log-prob 0, where the odds are infinite: cap just below 0.
    a_c = _mean_logps(pi_c, n_c).clamp(max=-1e-12)
    a_r = _mean_logps(pi_r, n_r).clamp(max=-1e-12)
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    return -a_c - beta * F.logsigmoid(log_odds)


def sft_loss(pi_c, n_c):
    """The chosen responses' NLL per token of the whole batch, -sum_i pi_c_i / sum_i n_c_i (the RPO
    term of Pang et al., 2024), as TRL 1.16's `sft` (-per_token_logps[chosen_mask].mean()) and
    Liger's `compute_nll_loss` take it: a response weighs by its tokens, not as one pair of B. A
    batch-level value, so every pair's entry is the same; 0 when no chosen response has a token.
    pi_c must be summed log-probs, not per-sequence means (those would be divided by n again)."""
    # Summed over the batch in float32 or wider: in bf16 a total of 257 tokens is already 256.
    acc = torch.promote_types(pi_c.dtype, torch.float32)
    nll = -pi_c.to(acc).sum() / n_c.to(acc).sum().clamp_min(1)
    return nll.to(pi_c.dtype).expand_as(pi_c)


def sppo_hard_loss(h_c, h_r, beta):
    """SPPO (Wu et al., 2024, "Self-Play Preference Optimization for Language Model Alignment") with
    hard labels, TRL's form: the win probability is 1 for the chosen response and 0 for the rejected
    one, so the log-ratios are pushed to +-1/(2 beta):  (h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2."""
    return (h_c - 0.5 / beta) ** 2 + (h_r + 0.5 / beta) ** 2


def aot_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing=0.0):
    """AOT (Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"),
    paired: the policy's margins pi_c - pi_r should dominate the reference's margins ref_c - ref_r in
    the first order; in one dimension the optimal transport plan matches sorted samples, so with
    d = sort(pi_c - pi_r) - sort(ref_c - ref_r) (both ascending over the batch):
    -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d).
    Entry i belongs to the i-th quantile of the batch, not to pair i."""
    d = torch.sort(pi_c - pi_r).values - torch.sort(ref_c - ref_r).values
    return _smoothed_sigmoid(beta * d, label_smoothing)


def aot_unpaired_loss(h_c, h_r, beta, label_smoothing=0.0):
    """AOT (Melnyk et al., 2024), unpaired: the chosen log-ratios' distribution should dominate the
    rejected log-ratios' (no pairing needed): with d = sort(h_c) - sort(h_r) (ascending over the
    batch): -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d). Entry i is the i-th quantile's."""
    d = torch.sort(h_c).values - torch.sort(h_r).values
    return _smoothed_sigmoid(beta * d, label_smoothing)


def sigmoid_norm_loss(h_c, h_r, n_c, n_r, beta, label_smoothing=0.0):
    """Length-normalised DPO (TRL's `sigmoid_norm`, the DPO form Tulu 3 trains with, Lambert et al.,
    2024): -log sigmoid(beta (h_c/n_c - h_r/n_r)), label-smoothed like cDPO."""
    u = _mean_logps(h_c, n_c) - _mean_logps(h_r, n_r)
    return _smoothed_sigmoid(beta * u, label_smoothing)


def f_divergence_scores(h, f_divergence_type="reverse_kl", alpha=0.5):
    """f-DPO (Wang et al., 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization
    with Diverse Divergence Constraints"): with t = pi / ref = exp(h), the score f'(t) that takes the
    place of the log-ratio h in the chosen - rejected difference (constants in f' cancel there):

        reverse_kl        h                                f'(t) = log t + 1 (DPO itself)
        forward_kl        1 - exp(-h)                      f'(t) = -1/t
        js_divergence     log 2 + log sigmoid(h)           f'(t) = log(2t / (1 + t))
        alpha_divergence  (exp((a - 1) h) - 1) / (a - 1)   f'(t) = (t^(a-1) - 1) / (a - 1);
                                                           h when |a - 1| < 1e-6 (the limit)

    `alpha` is TRL's `f_alpha_divergence_coef` a = 1 - the paper's alpha (whose f'(t) is
    (1 - t^-alpha) / alpha): the default 0.5 is the same in both, a -> 1 is reverse KL, a = 0
    forward KL. As in TRL 1.16, (a - 1) h is clamped at 80 (11 in float16) before the exp, which
    runs in float32 or wider: past the clamp the score is constant and passes no gradient. The
    forward-KL score is unbounded below (exp(-h)), as in TRL.

    `dpo_loss` feeds s_c - s_r to sigmoid, robust, hinge, exo_pair and discopop in place of
    u = h_c - h_r, and s_c, s_r to ipo and sigmoid_norm in place of h_c, h_r."""
    if f_divergence_type == "reverse_kl":
        return h
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-h)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(h)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return h
        cap = 11.0 if h.dtype == torch.float16 else 80.0  # exp(cap) stays finite after the cast back
        t = ((alpha - 1.0) * h).to(torch.promote_types(h.dtype, torch.float32)).clamp(max=cap)
        return (torch.exp(t) - 1.0).to(h.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCES}")


def ld_prefix_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's public part: per pair, each response's token log-probs summed over its first
    m = min(n_c, n_r) response tokens, n_c and n_r the pair's response lengths (nonzero entries
    of the masks). `dpo_loss(..., ld_alpha=a)` then uses prefix + a * (full sum - prefix).

    Call it once for the policy and once for the reference, with the same masks:

        tok = get_logps(logits, input_ids, response_mask, reduction="none")   # (2B, T-1)
        m = response_mask[:, 1:]          # aligned with tok (get_logps' default shift=True)
        prefix_c, prefix_r = ld_prefix_logps(tok[:B], m[:B], tok[B:], m[B:])  # [chosen; rejected]
        logps = tok.sum(-1)               # the full sums, the same as reduction="sum"

    (`get_logps_from_hidden(..., reduction="none")` likewise.) The prefixes carry the gradient of
    the token log-probs, so compute the policy's full sums and prefixes from the same tensor.

    Args:
        chosen_token_logps, rejected_token_logps: (B, R_c) and (B, R_r) per-token log-probs; row i
            holds pair i's chosen / rejected response. Entries off the response are not read.
        chosen_mask, rejected_mask: the same shapes, nonzero at response tokens.

    Returns:
        (chosen_prefix, rejected_prefix), each (B,), in the log-probs' dtype.
    """
    for name, t in (("chosen_token_logps", chosen_token_logps), ("chosen_mask", chosen_mask),
                    ("rejected_token_logps", rejected_token_logps), ("rejected_mask", rejected_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be (B, R), got shape {tuple(t.shape)}")
    if chosen_mask.shape != chosen_token_logps.shape:
        raise ValueError(f"chosen_mask has shape {tuple(chosen_mask.shape)} but chosen_token_logps has "
                         f"{tuple(chosen_token_logps.shape)}")
    if rejected_mask.shape != rejected_token_logps.shape:
        raise ValueError(f"rejected_mask has shape {tuple(rejected_mask.shape)} but rejected_token_logps "
                         f"has {tuple(rejected_token_logps.shape)}")
    if chosen_token_logps.shape[0] != rejected_token_logps.shape[0]:
        raise ValueError(f"chosen_token_logps has {chosen_token_logps.shape[0]} rows but "
                         f"rejected_token_logps has {rejected_token_logps.shape[0]} (one per pair each)")
    on_c, on_r = chosen_mask != 0, rejected_mask != 0
    shared = torch.minimum(on_c.sum(-1), on_r.sum(-1)).unsqueeze(-1)

    def prefix(logps, on):
        keep = on & (on.cumsum(-1) <= shared)  # the k-th response token, k <= m
        return torch.where(keep, logps, torch.zeros_like(logps)).sum(-1)

    return prefix(chosen_token_logps, on_c), prefix(rejected_token_logps, on_r)


def wpo_weights(pi_c, pi_r, lsq_c, lsq_r, n_c, n_r):
    """WPO (Zhou et al., 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization"), Eq. 2 as
    TRL 1.16 computes it: per response w = exp(sum_t (log p(y_t) - log sum_v p_v(t)^2) / max(n, 1)),
    the length-normalised probability of the response under the policy's own sampling, and the pair's
    weight w_c * w_r, detached (no gradient flows through the weight). pi = sum_t log p(y_t) and
    lsq = sum_t log sum_v p_v(t)^2 over the response tokens."""
    with torch.no_grad():
        w_c = torch.exp((pi_c - lsq_c) / n_c.clamp_min(1))
        w_r = torch.exp((pi_r - lsq_r) / n_r.clamp_min(1))
        return w_c * w_r


LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero", "apo_down",
    "discopop", "bco_pair", "bco_pair_running_mean", "simpo", "orpo", "sft", "sppo_hard", "aot",
    "aot_unpaired", "sigmoid_norm",
)


def _check(name, t, like, floating=True):
    """floating: log-probs (a float dtype); otherwise token counts (an integer or float dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype (float32, float64, "
                        f"bfloat16 or float16)")
    if not floating and (t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"{name} has dtype {t.dtype}; expected an integer or floating dtype")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but policy_chosen_logps has {tuple(like.shape)}")


def _is_number(x) -> bool:
    # bool is an int subclass: `beta = true` in a config file must not read as beta = 1.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_loss_options(
    loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, reduction="mean", rpo_alpha=None,
    simpo_gamma=0.5, discopop_tau=0.05, *, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
    ld_alpha=None, use_weighting=False,
) -> tuple[list[str], list[float]]:
    """Validate the scalar options of `dpo_loss`; returns (loss types, their weights)."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; expected one of {LOSS_TYPES}")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    for w in weights:
        if not (_is_number(w) and math.isfinite(w) and w >= 0):
            raise ValueError(f"loss_weights must be finite numbers >= 0, got {weights!r}")
    if not (_is_number(beta) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (_is_number(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if rpo_alpha is not None and not (_is_number(rpo_alpha) and math.isfinite(rpo_alpha)
                                      and rpo_alpha >= 0):
        raise ValueError(f"rpo_alpha must be a finite number >= 0 (or None), got {rpo_alpha!r}")
    if not (_is_number(simpo_gamma) and math.isfinite(simpo_gamma)):
        raise ValueError(f"simpo_gamma must be a finite number, got {simpo_gamma!r}")
    if not (_is_number(discopop_tau) and math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ValueError(f"discopop_tau must be a finite number > 0, got {discopop_tau!r}")
    if not (isinstance(f_divergence_type, str) and f_divergence_type in F_DIVERGENCES):
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")
    if not (_is_number(f_alpha_divergence_coef) and math.isfinite(f_alpha_divergence_coef)):
        raise ValueError(f"f_alpha_divergence_coef must be a finite number, got {f_alpha_divergence_coef!r}")
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} does not apply to loss_type {bad}: "
                             f"only to {F_DIVERGENCE_LOSS_TYPES} (use 'reverse_kl' with the others)")
    if ld_alpha is not None and not (_is_number(ld_alpha) and 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha must be a number in [0, 1] (or None), got {ld_alpha!r}")
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be True or False, got {use_weighting!r}")
    if use_weighting:
        bad = [t for t in types if t in SORTED_LOSS_TYPES]
        if bad:
            raise ValueError(f"use_weighting=True cannot weight loss_type {bad}: they sort the batch, so "
                             f"their losses are per quantile and no pair's weight belongs to them")
    return types, weights


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    rpo_alpha: float | None = None,
    bco_state: BCOState | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    policy_chosen_logps_prefix: torch.Tensor | None = None,
    policy_rejected_logps_prefix: torch.Tensor | None = None,
    ref_chosen_logps_prefix: torch.Tensor | None = None,
    ref_rejected_logps_prefix: torch.Tensor | None = None,
    use_weighting: bool = False,
    chosen_log_sum_sq_probs: torch.Tensor | None = None,
    rejected_log_sum_sq_probs: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A DPO-family loss from per-sequence log-probs (B,) and TRL-named metrics.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs of the policy
            (a float dtype; get_logps' reduction="sum", not "mean": the length-normalised losses
            and sft divide by the counts themselves).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model
            (precomputed or not); required by every loss except simpo, orpo and sft.
        loss_type: one name of LOSS_TYPES or a list, combined as sum_k weight_k * loss_k (MPO).
            aot and aot_unpaired sort the batch: their entry i (reduction="none") is the i-th
            quantile's loss, not pair i's. sft's entries are all the batch's NLL per chosen token,
            sum(-policy_chosen_logps) / sum(chosen_counts) (TRL 1.16's `sft`). bco_pair is TRL
            1.16's (no reward shift); bco_pair_running_mean subtracts the running reward mean.
        loss_weights: one finite weight >= 0 per loss type (default 1 each).
        beta: > 0. label_smoothing: in [0, 0.5) (cDPO / robust / EXO / SimPO / sigmoid_norm / AOT).
        chosen_counts, rejected_counts: (B,) response token counts (an integer or float dtype);
            needed by ipo, sigmoid_norm, simpo, orpo and sft, and by rpo_alpha and use_weighting
            (get_logps(..., return_counts=True) gives them).
        simpo_gamma: SimPO target margin (finite). discopop_tau: DiscoPOP temperature (> 0).
        rpo_alpha: when set, adds rpo_alpha * the sft term (RPO; TRL 1.16 writes it as
            loss_type=["sigmoid", "sft"], loss_weights=[1.0, rpo_alpha]).
        bco_state: the running reward mean of bco_pair_running_mean (updated in place; required
            for it). Every other loss, bco_pair included, ignores it.
        f_divergence_type: one of F_DIVERGENCES (`f_divergence_scores`); a value other than
            "reverse_kl" only with the losses of F_DIVERGENCE_LOSS_TYPES, whose chosen - rejected
            difference it changes. f_alpha_divergence_coef: alpha_divergence's coefficient (finite).
        ld_alpha: LD-DPO (Liu et al., 2024, "Length Desensitization in Direct Preference
            Optimization"), in [0, 1]: each summed log-prob, policy and reference, becomes
            prefix + ld_alpha * (sum - prefix), the prefix over the pair's first min(n_c, n_r)
            response tokens (1 is plain DPO, 0 drops the longer response's excess). Needs the
            four (B,) prefixes (the reference's when the loss uses the reference), built by
            `ld_prefix_logps`. The sft / rpo_alpha NLL and the WPO weight read the plain sums, as
            TRL 1.16 does; the metrics report the LD sums, as TRL does.
        use_weighting: WPO (`wpo_weights`): each pair's loss, rpo term included, times the detached
            weight w_c * w_r. Needs chosen_log_sum_sq_probs / rejected_log_sum_sq_probs, (B,) sums
            of log sum_v p_v^2 over the response tokens (the `log_sum_sq_probs` field of
            get_logps(..., stats=("log_sum_sq_probs",)), reduction "sum"), and the counts.
        reduction: "mean" over pairs, or "none" for the (B,) per-pair losses.
        An empty batch (B = 0) is a ValueError.

    Returns:
        (loss, metrics): metrics are detached scalars named rewards/chosen, rewards/rejected,
        rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
    """
    types, weights = check_loss_options(
        loss_type, loss_weights, beta, label_smoothing, reduction, rpo_alpha, simpo_gamma, discopop_tau,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        ld_alpha=ld_alpha, use_weighting=use_weighting,
    )

    pi_c, pi_r = policy_chosen_logps, policy_rejected_logps
    _check("policy_chosen_logps", pi_c, pi_c)
    if pi_c.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be (B,), got shape {tuple(pi_c.shape)}")
    if pi_c.shape[0] == 0:
        raise ValueError("empty batch: policy_chosen_logps has 0 pairs (the mean of no losses is NaN)")
    _check("policy_rejected_logps", pi_r, pi_c)
    needs_ref = any(t not in REFERENCE_FREE for t in types)
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {types} needs ref_chosen_logps and ref_rejected_logps")
    needs_counts = any(t in NEEDS_COUNTS for t in types) or rpo_alpha is not None or use_weighting
    if needs_counts and (chosen_counts is None or rejected_counts is None):
        raise ValueError(f"loss_type {types} (or rpo_alpha, use_weighting) needs chosen_counts and "
                         f"rejected_counts")
    if "bco_pair_running_mean" in types and bco_state is None:
        raise ValueError("loss_type 'bco_pair_running_mean' needs bco_state=BCOState() (its running "
                         "reward mean)")
    prefixes = {"policy_chosen_logps_prefix": policy_chosen_logps_prefix,
                "policy_rejected_logps_prefix": policy_rejected_logps_prefix,
                "ref_chosen_logps_prefix": ref_chosen_logps_prefix,
                "ref_rejected_logps_prefix": ref_rejected_logps_prefix}
    wpo = {"chosen_log_sum_sq_probs": chosen_log_sum_sq_probs,
           "rejected_log_sum_sq_probs": rejected_log_sum_sq_probs}
    # An input given for an option that is off would be dropped without a word: refuse it instead.
    for inputs, on, option in ((prefixes, ld_alpha is not None, "ld_alpha"),
                               (wpo, use_weighting, "use_weighting")):
        given = [k for k, v in inputs.items() if v is not None]
        if given and not on:
            raise ValueError(f"{given} given but {option} is off: set {option} or leave them out")
    if ld_alpha is not None:
        need = list(prefixes)[: 4 if needs_ref else 2]
        missing = [k for k in need if prefixes[k] is None]
        if missing:
            raise ValueError(f"ld_alpha={ld_alpha} needs {missing} (ld_prefix_logps builds them)")
    if use_weighting and any(v is None for v in wpo.values()):
        raise ValueError("use_weighting=True needs chosen_log_sum_sq_probs and rejected_log_sum_sq_probs")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
                    ("chosen_counts", chosen_counts), ("rejected_counts", rejected_counts),
                    *prefixes.items(), *wpo.items()):
        if t is not None:
            _check(name, t, pi_c, floating=not name.endswith("_counts"))

    dt = pi_c.dtype
    ref_c = ref_chosen_logps.to(dt) if needs_ref else None
    ref_r = ref_rejected_logps.to(dt) if needs_ref else None
    n_c = chosen_counts.to(dt) if chosen_counts is not None else None
    n_r = rejected_counts.to(dt) if rejected_counts is not None else None
    plain_c, plain_r = pi_c, pi_r  # the plain sums, for the NLL terms and the WPO weight
    if ld_alpha is not None:
        def ld(full, prefix):
            prefix = prefix.to(dt)
            return prefix + ld_alpha * (full - prefix)

        pi_c, pi_r = ld(pi_c, policy_chosen_logps_prefix), ld(pi_r, policy_rejected_logps_prefix)
        if needs_ref:
            ref_c, ref_r = ld(ref_c, ref_chosen_logps_prefix), ld(ref_r, ref_rejected_logps_prefix)
    h_c = h_r = s_c = s_r = d = None  # the reference-free losses read none of them
    if needs_ref:
        h_c, h_r = pi_c - ref_c, pi_r - ref_r
        s_c = f_divergence_scores(h_c, f_divergence_type, f_alpha_divergence_coef)
        s_r = f_divergence_scores(h_r, f_divergence_type, f_alpha_divergence_coef)
        d = s_c - s_r  # u = h_c - h_r under reverse KL
    eps = label_smoothing

    per_type = {
        "sigmoid": lambda: sigmoid_loss(d, beta, eps),
        "robust": lambda: robust_loss(d, beta, eps),
        "hinge": lambda: hinge_loss(d, beta),
        "ipo": lambda: ipo_loss(s_c, s_r, n_c, n_r, beta),
        "exo_pair": lambda: exo_pair_loss(d, beta, eps),
        "nca_pair": lambda: nca_pair_loss(h_c, h_r, beta),
        "apo_zero": lambda: apo_zero_loss(h_c, h_r, beta),
        "apo_down": lambda: apo_down_loss(h_c, h_r, beta),
        "discopop": lambda: discopop_loss(d, beta, discopop_tau),
        "bco_pair": lambda: bco_pair_loss(h_c, h_r, beta),
        "bco_pair_running_mean": lambda: bco_pair_running_mean_loss(h_c, h_r, beta, bco_state),
        "simpo": lambda: simpo_loss(pi_c, pi_r, n_c, n_r, beta, simpo_gamma, eps),
        "orpo": lambda: orpo_loss(pi_c, pi_r, n_c, n_r, beta),
        "sft": lambda: sft_loss(plain_c, chosen_counts),  # the counts uncast: it sums them
        "sppo_hard": lambda: sppo_hard_loss(h_c, h_r, beta),
        "aot": lambda: aot_loss(pi_c, pi_r, ref_c, ref_r, beta, eps),
        "aot_unpaired": lambda: aot_unpaired_loss(h_c, h_r, beta, eps),
        "sigmoid_norm": lambda: sigmoid_norm_loss(s_c, s_r, n_c, n_r, beta, eps),
    }
    losses = sum(w * per_type[t]() for t, w in zip(types, weights, strict=True))
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * sft_loss(plain_c, chosen_counts)
    if use_weighting:
        losses = losses * wpo_weights(plain_c, plain_r, chosen_log_sum_sq_probs.to(dt),
                                      rejected_log_sum_sq_probs.to(dt), n_c, n_r)

    with torch.no_grad():
        if needs_ref:
            r_c, r_r = beta * h_c, beta * h_r
        else:  # reference-free: beta * average log-prob
            r_c, r_r = beta * _mean_logps(pi_c, n_c), beta * _mean_logps(pi_r, n_r)
        metrics = {
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (r_c > r_r).float().mean(),
            "logps/chosen": pi_c.detach().mean(),
            "logps/rejected": pi_r.detach().mean(),
        }
    return (losses.mean() if reduction == "mean" else losses), metrics
