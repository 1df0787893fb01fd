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
    memory = memory_plan(self.out, rows)
    if memory:
        extra.append(memory_line(memory, d.enabled))
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
            "model_state_bytes_per_rank": per_rank, "memory_plan": memory}


def memory_plan(out, rows: list[dict]) -> dict | None:
    """run.json's "memory_plan" (the predicted peak `fused-dpo train` recorded at start) with, on
    CUDA, the measured peak beside it: the largest step's peak_mem_MiB (max_memory_allocated, reset
    at each step) and measured / predicted. None when the run recorded no prediction."""
    try:
        plan = rundir.read_run_json(out).get("memory_plan")
    except ValueError:
        return None
    if not plan:
        return None
    plan = dict(plan)
    peaks = [r["peak_mem_MiB"] for r in rows if "peak_mem_MiB" in r]
    if plan.get("device") == "cuda" and peaks:
        plan["measured_peak_MiB"] = round(max(peaks), 1)
        plan["measured_over_predicted"] = round(max(peaks) / plan["predicted_peak_MiB"], 3)
    return plan


def memory_line(plan: dict, per_rank: bool) -> str:
    """health.md's line for `memory_plan`."""
    where = " per rank" if per_rank else ""
    head = (f"Memory{where}: predicted peak {plan['predicted_peak_MiB']:.1f} MiB (fused-dpo plan: "
            f"{plan['phase']}, batch {plan['batch'][0]} x {plan['batch'][1]} tokens)")
    if "measured_peak_MiB" in plan:
        return (f"{head}; measured {plan['measured_peak_MiB']:.1f} MiB (max_memory_allocated of the "
                f"largest step); measured / predicted {plan['measured_over_predicted']:.3f}.")
    if plan.get("device") == "cuda":
        return f"{head}; no step measured."
    return f"{head}; on the CPU the logged peak_mem_MiB is the process's RSS, not comparable."

