"""The end of a run, on rank 0: health.md and curves.png from the metrics log, and the run's
summary (what `DPOTrainer.finish` returns)."""

from __future__ import annotations

import json

from . import rundir
from .checkpoint import atomic_write_text


def write_report(self, stopped: str | None, state: dict, per_rank: list) -> dict:
    """Rank 0 of trainer `self`: health.md and curves.png from the metrics log; the run's summary."""
    d = self.dist
    log = self.out / rundir.METRICS
    rows = [json.loads(ln) for ln in (log.read_text().splitlines() if log.exists() else [])]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    extra = [f"Training data: {self.train_data.report()}."]
    if self.eval_data is not None:
        extra.append(f"Held-out data: {self.eval_data.report()}.")
    if evals:
        extra.append(f"Held-out preference accuracy at step {evals[-1]['step']}: "
                     f"{evals[-1]['eval/rewards/accuracies']:.3f}.")
    steps = [r for r in rows if "entropy" in r]  # absent from rows logged by older versions
    if steps:
        a, b = steps[0], steps[-1]
        extra.append(f"Policy entropy per response token: {a['entropy']:.3f} nats at step "
                     f"{a['step']}, {b['entropy']:.3f} at step {b['step']}; chosen tokens "
                     f"predicted top-1: {a['mean_token_accuracy']:.3f}, "
                     f"{b['mean_token_accuracy']:.3f}.")
    lora_note = " (LoRA: the reference is the policy's own base weights)" if self.lora else ""
    if d.enabled:
        extra.append(f"Model state held per rank ({self.config.parallel}, {d.world} ranks): " + "; ".join(
            f"rank {r}: total {b['total'] / 2**20:.2f} MiB" for r, b in enumerate(per_rank))
            + f"{lora_note}.")
    else:
        extra.append("Model state held: " + ", ".join(f"{k} {v / 2**20:.2f} MiB"
                                                      for k, v in state.items()) + f"{lora_note}.")
    if stopped:
        extra.append(f"**Stopped:** {stopped}")
    atomic_write_text(self.out / "health.md", self.monitor.report(extra))
    try:
        from .plots import plot_run

        plot_run(rows, self.monitor.flags, self.out / "curves.png")
    except ImportError:
        print("matplotlib is not installed: no plots (pip install fused_dpo[plot])")
    return {"steps": self.step, "flags": [f.name for f in self.monitor.flags], "stopped": stopped,
            "eval": evals[-1] if evals else {}, "metrics": rows, "model_state_bytes": state,
            "model_state_bytes_per_rank": per_rank}
