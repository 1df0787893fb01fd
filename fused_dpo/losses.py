"""Every DPO-family loss, in one place, in plain PyTorch on per-sequence log-probs.

Notation (per pair i): pi_c, pi_r = policy log-probs of the chosen / rejected response (summed over
response tokens), ref_c, ref_r = the same under the reference model, n_c, n_r = response token
counts, beta > 0. Log-ratios: h_c = pi_c - ref_c, h_r = pi_r - ref_r; margin logits u = h_c - h_r.
The implicit rewards reported as metrics are beta * h_c and beta * h_r (beta * average log-prob for
the reference-free losses).

`dpo_loss(...)` returns (loss, metrics) with TRL's metric names. The per-pair losses are averaged
over the batch (`reduction="mean"`); `reduction="none"` returns them per pair. Several losses can be
combined with weights, as in MPO (Wang et al., 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("simpo", "orpo", "sft")
NEEDS_COUNTS = ("ipo", "simpo", "orpo", "sft")


@dataclass
class BCOState:
    """Running mean of the implicit rewards for BCO (Jung et al., 2024), updated in place by
    `dpo_loss(..., bco_state=state)`: an exact mean over every reward seen so far."""

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


def bco_pair_loss(h_c, h_r, beta, state: BCOState):
    """BCO (Jung et al., 2024): with delta the running mean of all implicit rewards seen so far
    (this batch included): -log sigmoid(beta h_c - delta) - log sigmoid(-(beta h_r - delta))."""
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
    """The chosen responses' mean NLL, -pi_c / n_c (the RPO term of Pang et al., 2024)."""
    return -_mean_logps(pi_c, n_c)


LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero", "apo_down",
    "discopop", "bco_pair", "simpo", "orpo", "sft",
)


def _check(name, t, like):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but policy_chosen_logps has {tuple(like.shape)}")


def _is_number(x) -> bool:
    # bool is an int subclass: `beta = true` in a config file must not read as beta = 1.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_loss_options(
    loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, reduction="mean", rpo_alpha=None,
    simpo_gamma=0.5, discopop_tau=0.05,
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
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A DPO-family loss from per-sequence log-probs (B,) and TRL-named metrics.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs of the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model
            (precomputed or not); required by every loss except simpo, orpo and sft.
        loss_type: one name of LOSS_TYPES or a list, combined as sum_k weight_k * loss_k (MPO).
        loss_weights: one finite weight >= 0 per loss type (default 1 each).
        beta: > 0. label_smoothing: in [0, 0.5) (cDPO / robust / EXO / SimPO).
        chosen_counts, rejected_counts: (B,) response token counts; needed by ipo, simpo, orpo
            and sft (get_logps(..., return_counts=True) gives them).
        simpo_gamma: SimPO target margin (finite). discopop_tau: DiscoPOP temperature (> 0).
        rpo_alpha: when set, adds rpo_alpha * the chosen mean NLL (RPO).
        bco_state: running reward mean for bco_pair (updated in place; required for it).
        reduction: "mean" over pairs, or "none" for the (B,) per-pair losses.
        An empty batch (B = 0) is a ValueError.

    Returns:
        (loss, metrics): metrics are detached scalars named rewards/chosen, rewards/rejected,
        rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
    """
    types, weights = check_loss_options(
        loss_type, loss_weights, beta, label_smoothing, reduction, rpo_alpha, simpo_gamma, discopop_tau
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
    needs_counts = any(t in NEEDS_COUNTS for t in types) or rpo_alpha is not None
    if needs_counts and (chosen_counts is None or rejected_counts is None):
        raise ValueError(f"loss_type {types} (or rpo_alpha) needs chosen_counts and rejected_counts")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
                    ("chosen_counts", chosen_counts), ("rejected_counts", rejected_counts)):
        if t is not None:
            _check(name, t, pi_c)
    if "bco_pair" in types and bco_state is None:
        raise ValueError("loss_type 'bco_pair' needs bco_state=BCOState() (its running reward mean)")

    ref_c = ref_chosen_logps.to(pi_c.dtype) if ref_chosen_logps is not None else None
    ref_r = ref_rejected_logps.to(pi_c.dtype) if ref_rejected_logps is not None else None
    n_c = chosen_counts.to(pi_c.dtype) if chosen_counts is not None else None
    n_r = rejected_counts.to(pi_c.dtype) if rejected_counts is not None else None
    h_c = pi_c - ref_c if ref_c is not None else None
    h_r = pi_r - ref_r if ref_r is not None else None
    u = h_c - h_r if needs_ref else None
    eps = label_smoothing

    per_type = {
        "sigmoid": lambda: sigmoid_loss(u, beta, eps),
        "robust": lambda: robust_loss(u, beta, eps),
        "hinge": lambda: hinge_loss(u, beta),
        "ipo": lambda: ipo_loss(h_c, h_r, n_c, n_r, beta),
        "exo_pair": lambda: exo_pair_loss(u, beta, eps),
        "nca_pair": lambda: nca_pair_loss(h_c, h_r, beta),
        "apo_zero": lambda: apo_zero_loss(h_c, h_r, beta),
        "apo_down": lambda: apo_down_loss(h_c, h_r, beta),
        "discopop": lambda: discopop_loss(u, beta, discopop_tau),
        "bco_pair": lambda: bco_pair_loss(h_c, h_r, beta, bco_state),
        "simpo": lambda: simpo_loss(pi_c, pi_r, n_c, n_r, beta, simpo_gamma, eps),
        "orpo": lambda: orpo_loss(pi_c, pi_r, n_c, n_r, beta),
        "sft": lambda: sft_loss(pi_c, n_c),
    }
    losses = sum(w * per_type[t]() for t, w in zip(types, weights, strict=True))
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * sft_loss(pi_c, n_c)

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
