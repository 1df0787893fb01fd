"""Training-health checks for DPO, each with a one-line explanation, and a final report.

The failure that started this project: batch size 1, no averaging, beta 0.1 -> the summed reward
margin reached 56.9 at step 30, 240.7 at step 70, 599.2 at step 150 while the loss read 0 and the
accuracy 1. It looks like convergence; it is the policy running away from the reference.
"""

from __future__ import annotations

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
DISPLACEMENT_NATS_PER_TOKEN = 0.5  # chosen log-prob per token fell by this much since the start
WINDOW = 5  # steps averaged before a trend check


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
        fell = self.start["chosen_per_token"] - avg["chosen_per_token"]
        if fell > DISPLACEMENT_NATS_PER_TOKEN and avg["margin_per_token"] > self.start["margin_per_token"]:
            new += self._raise("likelihood_displacement", step,
                               f"chosen log-prob fell {fell:.2f} nats/token while the margin grew")
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
                "bad_in_a_row": self.bad_in_a_row, "start": self.start, "recent": list(self.recent)}

    def load_state_dict(self, s: dict) -> None:
        self.flags = [Flag(**f) for f in s["flags"]]
        self.bad_steps, self.bad_in_a_row = s["bad_steps"], s["bad_in_a_row"]
        self.start = s["start"]
        self.recent = deque(s["recent"], maxlen=WINDOW)

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

