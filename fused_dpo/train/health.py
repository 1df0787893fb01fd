"""Training-health checks for DPO, each with a one-line explanation, and a final report.

The failure that started this project: batch size 1, no averaging, beta 0.1 -> the summed reward
margin reached 56.9 at step 30, 240.7 at step 70, 599.2 at step 150 while the loss read 0 and the
accuracy 1. It looks like convergence; it is the policy running away from the reference.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

# Thresholds, in the units the explanations use.
# |loss_0 - loss(policy == reference)|: policy and reference run the same code on the same
# weights, so a correct setup lands within float rounding (about 1e-7 here).
STEP0_TOLERANCE = 1e-4
# Margin explosion: the reward margin beta*u is past the point where the sigmoid loss has any
# gradient left (sigmoid(-15) = 3e-7) AND the log-ratio behind it has moved more than 1 nat per
# response token. A healthy run saturates below the first bound (the tiny default run peaks near
# 9); nothing in an averaged loss pushes further, so growth past it is runaway, not learning.
MARGIN_SATURATION = 15.0
MARGIN_NATS_PER_TOKEN = 1.0
MEMORISE_LOSS_FRACTION = 0.05  # loss below 5% of its start ...
MEMORISE_ACCURACY = 0.99  # ... with accuracy ~1 ...
MEMORISE_EARLY_STEPS = 20  # ... within the first steps (or 5% of the run, if longer)
DISPLACEMENT_NATS_PER_TOKEN = 0.5  # chosen log-prob per token fell by this much since the start,
DISPLACEMENT_WINDOW = 20  # on average over this many steps: a one-batch loss spike (the default run
# has one at step 153: chosen -30 -> -86 -> -47 within six steps) is not a trend
WINDOW = 5  # steps averaged before a trend check
# Loss rising: the mean training loss over the last RISE_WINDOW steps is above RISE_FACTOR x its
# start. For DPO that is 1.04 = -log sigmoid(-0.6): on average the policy now prefers the rejected
# response. Learning never holds the loss there for ten steps; a sign error does.
RISE_WINDOW = 10
RISE_FACTOR = 1.5
# Under chance: held-out accuracy below 1/2 by more than luck explains, one-sided binomial
# P(X <= correct | n, 1/2) < 1%: with 160 pairs that is <= 64 correct (0.40); with 10 pairs, 0;
# under 7 pairs it cannot fire (the overfitting check covers tiny held-out sets). The bar is the
# accuracy before training where that is lower: a reference-free loss (SimPO, ORPO, SFT) ranks
# pairs by the policy's own length-normalised log-probs, and the untrained tiny model already
# prefers the rejected response of 80% of the default held-out pairs (accuracy 0.2 at step 0); a
# run that climbs from there has learned nothing backwards. With a reference the step-0 margins
# are all 0 (ties, counted as neither), so the bar stays 1/2.
CHANCE_P_VALUE = 0.01
# Overfitting: the held-out loss is above its best so far by this fraction of its value before
# training (log 2 for DPO: +0.17 nats) while the training loss is below its start.
OVERFIT_RISE = 0.25


@dataclass
class Flag:
    name: str
    step: int
    message: str


EXPLAIN = {
    "step0_loss": "step-0 loss differs from its value at policy == reference (log 2 for DPO): "
                  "the shift/mask is wrong, or dropout is active",
    "margin_explosion": "the reward margin grows far beyond what beta and the response length "
                        "justify: the policy is running away from the reference, not converging",
    "memorising": "loss -> 0 with accuracy -> 1 within the first steps: the model is memorising "
                  "pairs, not learning a preference",
    "likelihood_displacement": "the chosen responses' log-prob is falling while the margin grows: "
                               "the margin comes from pushing everything down",
    "effective_batch_1": "effective batch size 1: every update follows a single pair, so nothing "
                         "averages the margin's growth (the failing run had this)",
    "nonfinite_loss": "NaN/inf loss: the step was skipped",
    "loss_rising": "the training loss rose from its start (log 2 for DPO) and stays well above it: "
                   "the updates push the wrong way (a sign error, a flipped gradient, swapped pairs)",
    "accuracy_below_chance": "held-out preference accuracy is below chance, and below its value "
                             "before training, by more than luck explains: the policy learned to "
                             "prefer the rejected responses",
    "overfitting": "the held-out loss rises while the training loss falls: the model memorises "
                   "its training pairs instead of learning the preference (too little data)",
}


class HealthMonitor:
    def __init__(self, beta: float, max_steps: int, expected_step0_loss: float | None,
                 max_bad_steps: int = 3):
        self.beta = beta
        self.early = max(MEMORISE_EARLY_STEPS, max_steps // 20)
        self.expected_step0_loss = expected_step0_loss
        self.max_bad_steps = max_bad_steps
        self.flags: list[Flag] = []
        self.bad_steps = 0
        self.bad_in_a_row = 0
        self.start: dict[str, float] | None = None
        self.recent: deque = deque(maxlen=WINDOW)
        self.losses: deque = deque(maxlen=RISE_WINDOW)
        self.chosen: deque = deque(maxlen=DISPLACEMENT_WINDOW)  # chosen log-prob per token
        self.eval_start: float | None = None  # held-out loss at the first evaluation
        self.eval_best: float | None = None
        # The accuracy_below_chance bar: 1/2, or the accuracy of the first evaluation if lower.
        self.chance: float = 0.5

    # -- checks -----------------------------------------------------------------------------
    def check_config(self, effective_batch_size: int) -> list[Flag]:
        if effective_batch_size == 1:
            return self._raise("effective_batch_1", 0, "batch_size * gradient_accumulation_steps = 1")
        return []

    def observe(self, step: int, m: dict[str, float]) -> list[Flag]:
        """Feed one optimizer step's metrics (loss, rewards/*, logps/*, response tokens)."""
        new: list[Flag] = []
        self.bad_in_a_row = 0
        tokens = max(m["tokens_per_response"], 1.0)
        point = {
            "loss": m["loss"],
            "acc": m["rewards/accuracies"],
            "margin": m["rewards/margins"],
            "margin_per_token": m["rewards/margins"] / (self.beta * tokens),
            "chosen_per_token": m["logps/chosen"] / tokens,
        }
        if self.start is None:
            self.start = dict(point)
            if self.expected_step0_loss is not None:
                d = abs(m["loss"] - self.expected_step0_loss)
                spread = m.get("rewards/margins_abs", 0.0)
                if d > STEP0_TOLERANCE or spread > STEP0_TOLERANCE:
                    new += self._raise("step0_loss", step, f"loss {m['loss']:.6f}, expected "
                                       f"{self.expected_step0_loss:.6f} (off by {d:.2e}); mean "
                                       f"|margin| {spread:.2e}, expected 0")
        self.recent.append(point)
        self.losses.append(m["loss"])
        self.chosen.append(point["chosen_per_token"])
        if len(self.losses) == RISE_WINDOW and self.start["loss"] > 0:
            mean = sum(self.losses) / RISE_WINDOW
            if mean > RISE_FACTOR * self.start["loss"]:
                new += self._raise("loss_rising", step, f"mean loss {mean:.4f} over the last "
                                   f"{RISE_WINDOW} steps, start {self.start['loss']:.4f}")
        if len(self.recent) < WINDOW:
            return new
        avg = {k: sum(p[k] for p in self.recent) / len(self.recent) for k in point}
        if (abs(avg["margin"]) > MARGIN_SATURATION
                and abs(avg["margin_per_token"]) > MARGIN_NATS_PER_TOKEN):
            new += self._raise("margin_explosion", step,
                               f"margin {m['rewards/margins']:.1f} = {avg['margin_per_token']:.2f} "
                               f"nats/token of log-ratio (beta {self.beta}, {tokens:.0f} tokens)")
        if (step < self.early and avg["loss"] < MEMORISE_LOSS_FRACTION * self.start["loss"]
                and avg["acc"] >= MEMORISE_ACCURACY):
            new += self._raise("memorising", step, f"loss {avg['loss']:.4f} (start "
                               f"{self.start['loss']:.4f}), accuracy {avg['acc']:.2f} at step {step}")
        fell = self.start["chosen_per_token"] - sum(self.chosen) / len(self.chosen)
        if (len(self.chosen) == DISPLACEMENT_WINDOW and fell > DISPLACEMENT_NATS_PER_TOKEN
                and avg["margin_per_token"] > self.start["margin_per_token"]):
            new += self._raise("likelihood_displacement", step,
                               f"chosen log-prob fell {fell:.2f} nats/token while the margin grew")
        return new

    def observe_eval(self, step: int, loss: float, correct: int, n: int) -> list[Flag]:
        """Feed one held-out evaluation: its mean loss per pair and the pairs ranked right."""
        new: list[Flag] = []
        if self.eval_start is None:
            self.eval_start = self.eval_best = loss
            if n:  # pairs the untrained policy already ranks (a reference-free loss)
                self.chance = min(0.5, correct / n)
        trained = step > 0  # before the first update every margin is 0 (a tie), not a preference
        p = binomial_cdf(correct, n, self.chance) if n else 1.0
        if trained and p < CHANCE_P_VALUE:
            start = f", {self.chance:.3f} before training" if self.chance < 0.5 else ""
            new += self._raise("accuracy_below_chance", step, f"{correct}/{n} held-out pairs ranked "
                               f"right (chance 0.5{start}), P(<= {correct} by luck) = {p:.1e}")
        train_fell = self.recent and self.start and (
            sum(p["loss"] for p in self.recent) / len(self.recent) < self.start["loss"])
        rise = loss - self.eval_best
        if trained and train_fell and rise > OVERFIT_RISE * abs(self.eval_start):
            new += self._raise("overfitting", step, f"held-out loss {loss:.4f}, best {self.eval_best:.4f}"
                               f", before training {self.eval_start:.4f}; training loss "
                               f"{self.recent[-1]['loss']:.4f}, start {self.start['loss']:.4f}")
        self.eval_best = min(self.eval_best, loss)
        return new

    def nonfinite(self, step: int) -> tuple[list[Flag], bool]:
        """Record a skipped NaN/inf step; returns (new flags, whether training must stop)."""
        self.bad_steps += 1
        self.bad_in_a_row += 1
        new = self._raise("nonfinite_loss", step, f"{self.bad_steps} skipped so far", always=True)
        return new, self.bad_in_a_row >= self.max_bad_steps

    def _raise(self, name: str, step: int, detail: str, always: bool = False) -> list[Flag]:
        if not always and any(f.name == name for f in self.flags):
            return []  # each condition is reported once, at its first step
        flag = Flag(name, step, f"{EXPLAIN[name]} [{detail}]")
        self.flags.append(flag)
        return [flag]

    # -- state and report ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"flags": [asdict(f) for f in self.flags], "bad_steps": self.bad_steps,
                "bad_in_a_row": self.bad_in_a_row, "start": self.start, "recent": list(self.recent),
                "losses": list(self.losses), "chosen": list(self.chosen),
                "eval_start": self.eval_start, "eval_best": self.eval_best, "chance": self.chance}

    def load_state_dict(self, s: dict) -> None:
        self.flags = [Flag(**f) for f in s["flags"]]
        self.bad_steps, self.bad_in_a_row = s["bad_steps"], s["bad_in_a_row"]
        self.start = s["start"]
        self.recent = deque(s["recent"], maxlen=WINDOW)
        self.losses = deque(s["losses"], maxlen=RISE_WINDOW)
        self.chosen = deque(s["chosen"], maxlen=DISPLACEMENT_WINDOW)
        self.eval_start, self.eval_best = s["eval_start"], s["eval_best"]
        self.chance = s.get("chance", 0.5)  # absent from older checkpoints

    def report(self, extra: list[str] | None = None) -> str:
        lines = ["# Training health", ""]
        if not self.flags:
            lines.append("No health flags were raised.")
        else:
            names = sorted({f.name for f in self.flags})
            lines.append(f"**{len(names)} condition(s) flagged:** {', '.join(names)}")
            lines.append("")
            lines += ["| step | flag | explanation |", "| ---: | --- | --- |"]
            lines += [f"| {f.step} | {f.name} | {f.message} |" for f in self.flags]
        if self.bad_steps:
            lines += ["", f"{self.bad_steps} step(s) skipped for a NaN/inf loss."]
        if extra:
            lines += [""] + extra
        return "\n".join(lines) + "\n"



def binomial_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n may be in the thousands)."""
    if k >= n or p >= 1.0:
        return 1.0
    if p <= 0.0:
        return 1.0 if k >= 0 else 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(x - top) for x in logs)
