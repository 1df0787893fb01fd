"""Small shapes with a sync per call, as in a small-batch training loop (issue 9's host-overhead table).

    python -m bench.small_shapes [--shapes 2x512x32000,...] [--reps 50] [--out DIR] [--device cpu]

Each call is timed alone: a CUDA event and the host clock before it, the host clock again when the
call returns (host time: the Python-side time of the call, before any sync), a CUDA event after it,
then `torch.cuda.synchronize()`. wall = the events' span (the call's launches plus the GPU work they
queue); clock = host clock from the call's start until the synchronize returns. Median of `--reps`
after a warm-up. forward runs under no_grad (the issue's baseline measurement did); fwd+bwd is
`fn(...).sum().backward()` with the gradient reset before each call.

Providers: fused_dpo `get_logps` with validate=False and validate=True, the eager reference
(`fused_dpo.reference.get_logps_reference`) and TRL 1.16's `selective_log_softmax_and_entropy` when
it imports. Goals (issue 9) are printed beside the fused rows. With --out, each row is appended to
small_shapes.csv as it is measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import bench.__main__ as bm

SHAPES = [(2, 512, 32000), (2, 1024, 128256), (8, 1024, 128256)]
GOAL_SHAPE = (2, 512, 32000)
LARGE_SHAPE = (8, 1024, 128256)
GOALS = {
    "host_fwd_ms": 0.06,
    "host_fwd_bwd_ms": 0.15,
    "wall_fwd_bwd_ms": 0.3,  # at GOAL_SHAPE; also >= 2.5x faster than eager there
    "speedup_vs_eager": 2.5,
    "large_fwd_bwd_ms": 1.95,  # at LARGE_SHAPE: no regression
}


def providers() -> dict:
    from bench.providers import trl_logits_provider
    from fused_dpo import get_logps
    from fused_dpo.reference import get_logps_reference

    impl = "triton" if bm.DEVICE == "cuda" else "auto"
    return {
        "fused validate=False": lambda x, i, m: get_logps(x, i, m, impl=impl, validate=False),
        "fused validate=True": lambda x, i, m: get_logps(x, i, m, impl=impl, validate=True),
        "eager": lambda x, i, m: get_logps_reference(x, i, m),
        "trl_kernel": trl_logits_provider(),
    }


def time_calls(fn, reps: int, warmup: int = 10) -> dict:
    """Median wall (events), clock and host ms of `fn()` with a sync after every call."""
    cuda = bm.DEVICE == "cuda"
    for _ in range(warmup):
        fn()
    bm._sync()
    walls, clocks, hosts = [], [], []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        h0 = time.perf_counter()
        fn()
        h1 = time.perf_counter()
        if cuda:
            end.record()
            torch.cuda.synchronize()
        h2 = time.perf_counter()
        walls.append(start.elapsed_time(end) if cuda else (h2 - h0) * 1e3)
        clocks.append((h2 - h0) * 1e3)
        hosts.append((h1 - h0) * 1e3)
    med = statistics.median
    return {"wall_ms": med(walls), "clock_ms": med(clocks), "host_ms": med(hosts)}


def _goal_notes(shape, mode, r, eager) -> str:
    notes = []
    ok = lambda v, goal: f"{'ok' if v <= goal else 'MISS'} (goal <= {goal})"
    if shape == GOAL_SHAPE:
        key = "host_fwd_ms" if mode == "forward" else "host_fwd_bwd_ms"
        notes.append(f"host {ok(r['host_ms'], GOALS[key])}")
        if mode == "fwd+bwd":
            notes.append(f"wall {ok(r['wall_ms'], GOALS['wall_fwd_bwd_ms'])}")
            if eager:
                x = eager["wall_ms"] / r["wall_ms"]
                notes.append(f"{x:.2f}x eager {'ok' if x >= GOALS['speedup_vs_eager'] else 'MISS'} "
                             f"(goal >= {GOALS['speedup_vs_eager']}x)")
    if shape == LARGE_SHAPE and mode == "fwd+bwd":
        notes.append(f"wall {ok(r['wall_ms'], GOALS['large_fwd_bwd_ms'])}")
    return "; ".join(notes)


FIELDS = ["shape", "provider", "mode", "reps", "wall_ms", "clock_ms", "host_ms", "goals"]


def run(shapes, reps: int, rows: list | None = None) -> list[dict]:
    """Time every provider at every shape; appends the rows to `rows` (a bench CsvRows writes each
    to its CSV as it is measured) and returns it."""
    provs = providers()
    rows = [] if rows is None else rows
    print(f"{'shape':<16}{'provider':<22}{'mode':<9}{'wall ms':>9}{'clock ms':>10}{'host ms':>9}  goals")
    for B, T, V in shapes:
        ids, mask, g = bm._inputs(B, T, V, torch.bfloat16)
        x = (torch.randn(B, T, V, device=bm.DEVICE, generator=g) * 2).to(torch.bfloat16)
        x.requires_grad_(True)
        results = {}
        for name, fn in provs.items():
            if fn is None:
                print(f"{B}x{T}x{V:<10}{name:<22}not installed, skipped")
                continue

            def fwd(fn=fn, x=x, ids=ids, mask=mask):
                with torch.no_grad():
                    fn(x, ids, mask)

            def fwd_bwd(fn=fn, x=x, ids=ids, mask=mask):
                x.grad = None
                fn(x, ids, mask).sum().backward()

            for mode, call in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
                try:
                    r = time_calls(call, reps)
                except Exception as e:  # an optional provider's failure must not end the table
                    print(f"{B}x{T}x{V:<10}{name:<22}{mode:<9}FAILED {type(e).__name__}: {e}")
                    continue
                results[(name, mode)] = r
                notes = ""
                if name.startswith("fused"):
                    notes = _goal_notes((B, T, V), mode, r, results.get(("eager", mode)))
                row = dict(shape=f"{B}x{T}x{V}", provider=name, mode=mode, reps=reps, **r, goals=notes)
                rows.append(row)
                print(f"{row['shape']:<16}{name:<22}{mode:<9}{r['wall_ms']:9.3f}{r['clock_ms']:10.3f}"
                      f"{r['host_ms']:9.3f}  {notes}", flush=True)
        # The fused rows ran before eager: print the speedup once eager is known.
        e, f = results.get(("eager", "fwd+bwd")), results.get(("fused validate=False", "fwd+bwd"))
        if e and f:
            print(f"{B}x{T}x{V}: fused validate=False fwd+bwd is {e['wall_ms'] / f['wall_ms']:.2f}x "
                  f"eager's wall time" + (f" (goal >= {GOALS['speedup_vs_eager']}x)"
                                          if (B, T, V) == GOAL_SHAPE else ""))
        x.grad = None
        if bm.DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.small_shapes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated BxTxV (bf16 logits)")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--out", default=None, help="folder for small_shapes.csv")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the same code paths, timings of the CPU (a smoke run)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    bm.DEVICE = args.device
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    print(f"{bm._device_name()}, torch {torch.__version__}, commit {bm._commit()}: sync after every "
          f"call, median of {args.reps}")
    meta = dict(gpu=bm._device_name(), torch=torch.__version__, commit=bm._commit())
    # each row lands in the CSV as it is measured: a stage cut by its timeout keeps them
    rows = run(shapes, args.reps, bm.CsvRows(Path(args.out) / "small_shapes.csv" if args.out else None,
                                             meta, FIELDS))
    if rows.path is not None and rows:
        print(f"wrote {rows.path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
