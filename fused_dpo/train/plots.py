"""PNG curves of a run with the health flags marked."""

from __future__ import annotations

from pathlib import Path


def plot_run(rows: list[dict], flags, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", ["loss", "eval/loss"]),
        ("reward margin", ["rewards/margins", "eval/rewards/margins"]),
        ("preference accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
        ("log-probs", ["logps/chosen", "logps/rejected"]),
        ("policy entropy (nats per response token)", ["entropy", "eval/entropy"]),
        ("chosen tokens predicted top-1", ["mean_token_accuracy", "eval/mean_token_accuracy"]),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(11, 10), sharex=True)
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                style = "o-" if k.startswith("eval/") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=k, lw=1, ms=3)
        for i, f in enumerate(flags):
            ax.axvline(f.step, color="red", ls="--", lw=0.8, alpha=0.7,
                       label=f"flag: {f.name}" if ax is axes.flat[0] and i < 6 else None)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:  # a run logged before a panel's metric existed
            ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("fused_dpo training run" + (" (health flags in red)" if flags else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
