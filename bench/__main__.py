"""GPU microbenchmarks: `python -m bench {logits,hidden,all} [--quick] [--out DIR]`.

Every row reports the median time (20th/80th percentiles beside it), peak memory above the inputs,
the relative error of the per-sequence sums against float64, and the share of its roofline:
memory-bound logits path -> GB/s and % of the measured copy rate over the floor bytes
(response rows read twice, every row's gradient written once); hidden-state path -> TFLOP/s and %
of the measured bf16 matmul rate over the work on response rows. Rows whose provider computes an
entropy (`+stats`, `+entropy_grad`, `trl_kernel`) add the relative error of its per-sequence sums
against float64 (`ent_rel_err`); `extra_GiB` is the peak less the gradients the call returns. When
the rows for it are there, issue 11's ratios are printed at the end beside their goals (stats and
entropy gradient against the plain call, ours against TRL's kernels).

Each row is appended to `--out`/results.csv as it is measured; a stage stopped by `timeout`
(SIGTERM) also prints the goal ratios and draws the plot of the rows it has.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import torch

PROMPT_FRACTION = 0.25  # the first quarter of every sequence is prompt
LOGITS_SHAPES = [(8, 1024, 128256), (4, 4096, 151936), (8, 2048, 32000)]
LOGITS_SWEEP = [
    (b, t, v) for v in (32000, 128256, 151936, 256000) for (b, t) in ((2, 1024), (8, 1024), (8, 4096))
]
HIDDEN_SHAPES = [(8, 1024, 4096, 128256), (8, 1024, 2048, 128256)]


DEVICE = "cuda"  # `--device cpu` runs the same code paths on the CPU as a smoke test (timings meaningless)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> int:
    """Reset the peak counter; returns the bytes allocated now."""
    if DEVICE != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def _do_bench(fn, quantiles=(0.5, 0.2, 0.8), rep_ms=100):
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=rep_ms, quantiles=list(quantiles))
    import time

    # CPU: a smoke run, where one call shows the path works and its time means nothing
    t0 = time.perf_counter()
    fn()
    return [(time.perf_counter() - t0) * 1e3] * len(quantiles)


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke run, timings meaningless)"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _inputs(B, T, V, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.randint(0, V, (B, T), device=DEVICE, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    mask[:, int(T * PROMPT_FRACTION):] = True
    return ids, mask, g


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured now."""
    n = 2**30 // 2 if DEVICE == "cuda" else 2**22
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src), rep_ms=300)[0]
    copy_bps = 2 * src.numel() * 2 / (ms * 1e-3)
    k = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(k, k, device=DEVICE, dtype=torch.bfloat16)
    ms = _do_bench(lambda: a @ a, rep_ms=300)[0]
    return {"copy_GBps": copy_bps / 1e9, "matmul_TFLOPs": 2 * k**3 / (ms * 1e-3) / 1e12}


def _time(fn, mode, inputs):
    """(median, p20, p80) ms and peak bytes above the inputs for forward / backward / fwd+bwd."""

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        fn(*inputs).sum().backward()

    if mode == "forward":
        q, run = _do_bench(fwd), fwd
    elif mode == "fwd+bwd":
        q, run = _do_bench(fwd_bwd), fwd_bwd
    else:  # backward alone: fwd+bwd minus fwd
        q = [a - b for a, b in zip(_do_bench(fwd_bwd), _do_bench(fwd), strict=True)]
        run = fwd_bwd
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None
    if DEVICE != "cuda":  # no peak counter on the CPU: skip the extra call
        return q, 0
    base = _reset_peak()
    run()
    _sync()
    return q, _peak() - base


def _rel_err(out, truth):
    return ((out.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def bench_logits(shapes, providers, ceil, rows, modes):
    from fused_dpo.reference import get_logps_reference

    for B, T, V in shapes:
        ids, mask, g = _inputs(B, T, V, torch.bfloat16)
        logits = (torch.randn(B, T, V, device=DEVICE, generator=g) * 2).to(torch.bfloat16)
        logits.requires_grad_(True)
        truth = _stack_truth([get_logps_reference(logits[b : b + 1].detach().double(), ids[b : b + 1],
                                                  mask[b : b + 1], stats=("entropy",)) for b in range(B)])
        resp_rows = float(mask[:, 1:].sum())
        floor_bytes = {
            "forward": resp_rows * V * 2,
            "backward": resp_rows * V * 2 + B * T * V * 2,
            "fwd+bwd": 2 * resp_rows * V * 2 + B * T * V * 2,
        }
        _run_providers("logits", f"{B}x{T}x{V}", providers, (logits, ids, mask), truth, modes,
                       floor_bytes, ceil["copy_GBps"] * 1e9, "GBps", rows)
        del logits


def bench_hidden(shapes, providers, ceil, rows, modes):
    from fused_dpo.reference import get_logps_from_hidden_reference

    for B, T, H, V in shapes:
        ids, mask, g = _inputs(B, T, V, torch.bfloat16)
        hidden = torch.randn(B, T, H, device=DEVICE, generator=g).to(torch.bfloat16).requires_grad_(True)
        weight = (torch.randn(V, H, device=DEVICE, generator=g) / H**0.5).to(torch.bfloat16)
        weight.requires_grad_(True)
        # The truth is the independent eager reference in float64 (one sequence at a time to bound
        # its (1, T, V) float64 logits), not the fused code under test run in float64.
        w64 = weight.detach().double()
        truth = _stack_truth([get_logps_from_hidden_reference(hidden[b : b + 1].detach().double(), w64,
                                                              ids[b : b + 1], mask[b : b + 1],
                                                              stats=("entropy",)) for b in range(B)])
        del w64
        resp_rows = float(mask[:, 1:].sum())
        mm = 2 * resp_rows * H * V
        flops = {"forward": mm, "backward": 3 * mm, "fwd+bwd": 4 * mm}
        _run_providers("hidden", f"{B}x{T}x{H}x{V}", providers, (hidden, weight, ids, mask), truth,
                       modes, flops, ceil["matmul_TFLOPs"] * 1e12, "TFLOPs", rows)
        del hidden, weight


def _stack_truth(outs):
    """(log-prob sums, entropy sums) in float64 from one LogpsStats per sequence (computed one
    sequence at a time to bound the float64 (1, T, V) tensors)."""
    return torch.cat([o.logps for o in outs]), torch.cat([o.entropy for o in outs])


def _run_providers(path, shape, providers, inputs, truth, modes, work, rate, unit, rows):
    """Time every provider on one input set. `truth` is the float64 (log-prob sums, entropy sums).
    `work[mode]` is the floor's bytes or flops and `rate` the measured ceiling in the same unit per
    second; each row reports the achieved rate in `unit` (GBps = 1e9 B/s, TFLOPs = 1e12 flop/s) and
    its share of the ceiling."""
    scale = {"GBps": 1e9, "TFLOPs": 1e12}[unit]
    truth, ent_truth = truth
    # what every fwd+bwd must return: the inputs' gradients; extra_GiB is the peak beyond them
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs
                     if isinstance(t, torch.Tensor) and t.requires_grad)
    for name, fn in providers.items():
        if fn is None:
            print(f"  {name}: not installed, skipped")
            continue
        try:
            with torch.no_grad():
                err = _rel_err(fn(*inputs), truth)
                ent_fn = getattr(fn, "entropy", None)
                ent = {"ent_rel_err": _rel_err(ent_fn(*inputs), ent_truth)} if ent_fn else {}
            for mode in modes:
                (med, p20, p80), peak = _time(fn, mode, inputs)
                achieved = work[mode] / (med * 1e-3)
                grads = 0 if mode == "forward" or DEVICE != "cuda" else grad_bytes
                rows.append(dict(path=path, shape=shape, provider=name, mode=mode, ms=med, p20=p20,
                                 p80=p80, peak_GiB=peak / 2**30, extra_GiB=(peak - grads) / 2**30,
                                 floor_ms=work[mode] / rate * 1e3,
                                 **{unit: achieved / scale}, pct_roofline=100 * achieved / rate,
                                 rel_err=err, **ent))
                _print_row(rows[-1])
        except torch.cuda.OutOfMemoryError:
            print(f"  {name} {shape}: out of memory")
        except Exception as e:  # an optional competitor's API drift must not end the whole table
            print(f"  {name} {shape}: FAILED {type(e).__name__}: {e}")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _print_row(r):
    rate = f"{r['GBps']:8.0f} GB/s" if "GBps" in r else f"{r['TFLOPs']:8.1f} TF/s"
    ent = f"  entropy rel.err {r['ent_rel_err']:.3e}" if "ent_rel_err" in r else ""
    print(f"{r['path']:<7}{r['shape']:<22}{r['provider']:<26}{r['mode']:<9}{r['ms']:9.3f} ms "
          f"[{r['p20']:.3f}-{r['p80']:.3f}] {r['peak_GiB']:7.3f} GiB {rate} "
          f"{r['pct_roofline']:5.1f}% roof (floor {r['floor_ms']:.3f} ms)  rel.err {r['rel_err']:.3e}{ent}",
          flush=True)


# Issue 11's goals for the entropy rows (GRPO/PPO): (numerator provider, denominator provider,
# mode, column, goal, "<=" or ">=", what); the ratio is numerator / denominator of that column.
# The TRL goal holds at 8x1024x128256 and 4x4096x151936; other shapes print the ratio alone.
ENTROPY_GOALS = [
    ("logits", "fused_triton+stats", "fused_triton", "forward", "ms", 1.05, "<=",
     "forward with entropy, mean logit, top-1 / without"),
    ("logits", "fused_triton+entropy_grad", "fused_triton", "fwd+bwd", "ms", 1.10, "<=",
     "fwd+bwd with the entropy's gradient / without stats"),
    ("logits", "trl_kernel+entropy_grad", "fused_triton+entropy_grad", "fwd+bwd", "ms", 2.0, ">=",
     "TRL / ours, fwd+bwd with the entropy's gradient (speedup)"),
    ("logits", "trl_kernel", "fused_triton+stats", "fwd+bwd", "ms", 2.0, ">=",
     "TRL / ours, fwd+bwd with the entropy detached (speedup)"),
    ("hidden", "fused_triton+stats", "fused_triton", "forward", "ms", 1.05, "<=",
     "forward with entropy, mean logit, top-1 / without"),
    ("hidden", "fused_triton+entropy_grad", "fused_triton", "fwd+bwd", "ms", 1.10, "<=",
     "fwd+bwd with the entropy's gradient / without stats"),
    ("hidden", "fused_triton+entropy_grad", "trl_chunked+entropy_grad", "fwd+bwd", "ms", None, "<=",
     "ours / TRL time, fwd+bwd with the entropy's gradient"),
    ("hidden", "fused_triton+entropy_grad", "trl_chunked+entropy_grad", "fwd+bwd", "extra_GiB", 0.5,
     "<=", "ours / TRL extra memory beyond the gradients, same"),
]
TRL_GOAL_SHAPES = {"8x1024x128256", "4x4096x151936", "8x1024x4096x128256"}


def entropy_goal_lines(rows) -> list[str]:
    """Issue 11's ratios, one line per goal and shape whose two rows were measured."""
    by = {(r["path"], r["shape"], r["provider"], r["mode"]): r for r in rows}
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for path, num, den, mode, col, goal, op, what in ENTROPY_GOALS:
            a, b = by.get((path, shape, num, mode)), by.get((path, shape, den, mode))
            if a is None or b is None:
                continue
            if b[col] <= 0:
                lines.append(f"{path} {shape}: {what}: {num} {a[col]:.3f} / {den} {b[col]:.3f} ({col})")
                continue
            x = a[col] / b[col]
            verdict = ""
            if goal is not None and ("trl" not in num + den or shape in TRL_GOAL_SHAPES):
                ok = x <= goal if op == "<=" else x >= goal
                verdict = f"  {'ok' if ok else 'MISS'} (goal {op} {goal}x)"
            lines.append(f"{path} {shape}: {what}: {x:.3f}x ({a[col]:.3f} / {b[col]:.3f} {col}){verdict}")
    return lines


# The CSV's columns: a row holds GBps (logits) or TFLOPs (hidden), and ent_rel_err when its
# provider computes an entropy; the cells it lacks stay empty.
ROW_FIELDS = ["path", "shape", "provider", "mode", "ms", "p20", "p80", "peak_GiB", "extra_GiB", "floor_ms",
              "GBps", "TFLOPs", "pct_roofline", "rel_err", "ent_rel_err"]


class CsvRows(list):
    """The rows measured so far; each is also appended to the CSV at `path` (None: no file) as it
    is measured, after the columns of `meta`, so a stage killed outright (SIGKILL, the device
    call's own limit) keeps every row it measured. The file is started at the first row."""

    def __init__(self, path: Path | None, meta: dict, fields: list[str]):
        super().__init__()
        self.path, self.meta, self.fields = path, meta, list(meta) + fields

    def append(self, row: dict) -> None:
        if self.path is not None:
            first = not self
            if first:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w" if first else "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                if first:
                    w.writeheader()
                w.writerow({**self.meta, **row})
        super().append(row)


def _csv_rows(ceil, out: Path) -> CsvRows:
    import triton

    meta = dict(gpu=_device_name(), torch=torch.__version__,
                triton=triton.__version__, commit=_commit(), python=platform.python_version(),
                **{k: f"{v:.1f}" for k, v in ceil.items()})
    return CsvRows(out / "results.csv", meta, ROW_FIELDS)


def _plot(rows, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["path"] == "logits" and r["mode"] == "fwd+bwd"]
    if not sel:
        return
    # Grouped bars, one group per shape: several shapes share a vocabulary or a B*T, so a line
    # against either draws vertical segments.
    shapes = list(dict.fromkeys(r["shape"] for r in sel))
    provs = list(dict.fromkeys(r["provider"] for r in sel))
    by = {(r["shape"], r["provider"]): r for r in sel}
    width = 0.8 / len(provs)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, prov in enumerate(provs):
        xs = [i + (k - (len(provs) - 1) / 2) * width for i in range(len(shapes))]
        got = [by.get((s, prov)) for s in shapes]
        ax_t.bar(xs, [r["ms"] if r else 0 for r in got], width, label=prov)
        ax_m.bar(xs, [r["peak_GiB"] if r else 0 for r in got], width, label=prov)
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=8)
    ax_t.set(xlabel="B x T x V (bf16)", ylabel="fwd+bwd ms (log)", title="time per shape", yscale="log")
    ax_m.set(xlabel="B x T x V (bf16)", ylabel="peak GiB above inputs", title="memory per shape")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "logits.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["logits", "hidden", "sweep", "all"], nargs="?", default="all")
    ap.add_argument("--quick", action="store_true", help="forward and fwd+bwd only (no backward alone)")
    ap.add_argument("--providers", default=None, help="comma-separated subset of provider names")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated BxTxV (logits) or BxTxHxV (hidden) instead of the defaults")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: smoke-run the same code paths on tiny shapes (timings meaningless)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench needs a CUDA GPU; for the CPU benchmark run `make bench-cpu`.", file=sys.stderr)
        return 2
    from .providers import hidden_providers, logits_providers

    modes = ["forward", "fwd+bwd"] if args.quick else ["forward", "backward", "fwd+bwd"]
    ceil = ceilings()
    print(f"{_device_name()}: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    rows = _csv_rows(ceil, Path(args.out))  # each row lands in results.csv as it is measured
    want = args.providers.split(",") if args.providers else None
    # In the order given: a time-boxed stage lists the rows that matter most first.
    pick = lambda d: dict(d) if want is None else {k: d[k] for k in want if k in d}
    given = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")] if args.shapes else []
    # `timeout` sends SIGTERM: end the measurement there and still write what was measured
    prev = signal.signal(signal.SIGTERM, _stop)
    try:
        if args.what in ("logits", "all"):
            shapes = [s for s in given if len(s) == 3] or LOGITS_SHAPES
            bench_logits(shapes, pick(logits_providers()), ceil, rows, modes)
        if args.what == "sweep":
            bench_logits(LOGITS_SWEEP, pick(logits_providers()), ceil, rows, modes)
        if args.what in ("hidden", "all"):
            shapes = [s for s in given if len(s) == 4] or HIDDEN_SHAPES
            bench_hidden(shapes, pick(hidden_providers()), ceil, rows, modes)
    except _Stopped:
        print(f"stopped by SIGTERM (a stage timeout) after {len(rows)} rows; writing those")
    finally:
        signal.signal(signal.SIGTERM, prev)
    if not rows:
        print("no rows measured")
        return 1
    goals = entropy_goal_lines(rows)
    if goals:
        print("issue 11 (entropy, GRPO/PPO): ratios of the rows above")
        for line in goals:
            print("  " + line)
    print(f"wrote {rows.path}")
    try:
        _plot(rows, Path(args.out))
    except ImportError:
        print("matplotlib missing: no plots")
    return 0


class _Stopped(BaseException):
    """Not an Exception: a provider's `except Exception` must not swallow the stop."""


def _stop(signum, frame):
    raise _Stopped


if __name__ == "__main__":
    sys.exit(main())
