"""The CPU torch path under CPU contention: its own thread count against torch's, and the eager
reference, forward+backward, timed in turn in one process (issue 20 item 7).

    python bench/cpu_threads.py [--shape 4x256x32000] [--rounds 7] [--contend 1] [--out FILE.csv]

Providers: `fused threads=N` is get_logps(impl="torch") with FUSED_DPO_TORCH_THREADS=N (0: torch's
own count, which the path used before it set one); `eager` is the eager reference under torch's
count. One round times each provider once, in turn, so that a change in the machine's load falls
on all of them; the table gives each provider's median over the rounds and the median of its
per-round ratio to eager. `--contend N` starts N busy-loop processes pinned to the first N
processors for the duration (the contention setup of the issue: a competing job holding a core);
0 measures the machine as it is. Timings are perf_counter wall times, not asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fused_dpo import get_logps
from fused_dpo.reference import get_logps_reference


@contextlib.contextmanager
def busy_processes(n: int):
    """n child processes spinning in Python, child i pinned to processor i (mod the count)."""
    cpus = sorted(os.sched_getaffinity(0))
    procs = []
    for i in range(n):
        cpu = cpus[i % len(cpus)]
        procs.append(subprocess.Popen(
            [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]))
    try:
        yield [cpus[i % len(cpus)] for i in range(n)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _inputs(B, T, V):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, T, V, generator=g) * 2).bfloat16()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 4 :] = True  # first quarter is prompt
    return x, ids, mask


def _step(fn, x):
    xx = x.detach().requires_grad_(True)
    fn(xx).sum().backward()


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=root).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4x256x32000", help="BxTxV, bf16 logits (default: fused-dpo check's)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,0", help="FUSED_DPO_TORCH_THREADS values to time (default 1,0)")
    ap.add_argument("--contend", type=int, default=1, help="busy processes pinned beside the run (default 1)")
    ap.add_argument("--out", help="append the rows to this CSV file")
    args = ap.parse_args(argv)
    B, T, V = (int(n) for n in args.shape.split("x"))
    x, ids, mask = _inputs(B, T, V)
    providers = [(f"fused threads={n}", n, lambda t: get_logps(t, ids, mask, impl="torch"))
                 for n in args.threads.split(",")]
    providers.append(("eager", None, lambda t: get_logps_reference(t, ids, mask)))
    times: dict[str, list[float]] = {name: [] for name, _, _ in providers}
    with busy_processes(args.contend) as pinned:
        for _name, n, fn in providers:  # warm-up, out of the figures
            with _env("FUSED_DPO_TORCH_THREADS", n):
                _step(fn, x)
        for _ in range(args.rounds):
            for name, n, fn in providers:
                with _env("FUSED_DPO_TORCH_THREADS", n):
                    t0 = time.perf_counter()
                    _step(fn, x)
                    times[name].append(time.perf_counter() - t0)
    print(f"get_logps fwd+bwd, B={B} T={T} V={V} bf16, CPU ({os.cpu_count()} processors, "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads), "
          f"{args.contend} busy process(es) pinned to processors {pinned}, {args.rounds} rounds, "
          f"commit {_commit()}")
    print(f"{'provider':<20}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'/ eager (median)':>18}")
    rows = []
    for name, _, _ in providers:
        ts = times[name]
        ratio = statistics.median(a / e for a, e in zip(ts, times["eager"], strict=True))
        rows.append(dict(provider=name, shape=args.shape, contend=args.contend, rounds=args.rounds,
                         median_ms=round(1e3 * statistics.median(ts), 1), min_ms=round(1e3 * min(ts), 1),
                         max_ms=round(1e3 * max(ts), 1), ratio_to_eager=round(ratio, 3),
                         cpu=platform.processor() or platform.machine(), processors=os.cpu_count(),
                         torch=torch.__version__, commit=_commit()))
        r = rows[-1]
        print(f"{name:<20}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}{r['max_ms']:>9.1f}{ratio:>18.3f}")
    if args.out:
        path = Path(args.out)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
