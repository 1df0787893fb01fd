"""CPU proxies for the host overhead of `get_logps` (issue 9): what one call costs besides the kernels.

    python bench/cpu_proxies.py [--shape 2x512x32000] [--reps 200]

With the three launchers (`row_stats`, `seq_reduce`, `row_grad`) replaced by stubs that only
allocate what the real launcher allocates, one call's host cost is all that is left. Reported for
forward (logits requiring grad, so the autograd node is built) and backward (`out.backward(g)` with
a preallocated upstream gradient), per impl ("torch"; "triton" under TRITON_INTERPRET=1) and
validate setting:

- aten ops dispatched (counted with a TorchDispatchMode; on a GPU each is a launch or an allocation);
- kernel launches (calls of the launchers: one each is one kernel launch on a GPU);
- Python time per call, median of `--reps` after a warm-up (time.perf_counter).

Run by path, not as `-m bench...`, so that it measures whichever fused_dpo is first on PYTHONPATH:
an older commit's launchers (`row_stats` returning (lse, zy), `row_grad`; no `seq_reduce`) are
stubbed by their signature just as well.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: impl="triton" on CPU

import argparse  # noqa: E402
import collections  # noqa: E402
import inspect  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

LAUNCHERS = ("row_stats", "seq_reduce", "row_grad")


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stubs(module, launches: collections.Counter) -> dict:
    """No-op launchers for `module`, allocating what the real ones return, counting their calls."""
    new_api = "stats" in inspect.signature(module.row_stats).parameters
    # From the entropy statistics on, seq_reduce also returns their bundle (None without them).
    returns_ext = "grad_entropy" in inspect.signature(module.row_grad).parameters
    stubs = {}

    if new_api:
        def row_stats(x, labels, mask, *, stats, **kw):
            launches["row_stats"] += 1

        def seq_reduce(stats, labels, *, V, shift, reduction):
            launches["seq_reduce"] += 1
            zy = stats[0]
            B, R = zy.shape
            out = torch.empty((B, R) if reduction == "none" else (B,), dtype=zy.dtype, device=zy.device)
            counts = torch.empty(B, dtype=zy.dtype, device=zy.device)
            # zeros, not empty: the validation reads it (the real kernel writes 0 for good labels)
            bad = torch.zeros(B, dtype=torch.int32, device=zy.device)
            return (out, counts, bad, None) if returns_ext else (out, counts, bad)

        def row_grad(*args, **kw):
            launches["row_grad"] += 1

        stubs.update(row_stats=row_stats, seq_reduce=seq_reduce, row_grad=row_grad)
    else:  # 803ab3c and before: row_stats(x, ...) -> (lse, zy), each (B, R); row_grad fills grad
        def row_stats_old(x, *args, **kw):
            launches["row_stats"] += 1
            B, R = x.shape[0], x.shape[1]
            acc = _acc(x.dtype)
            return (torch.empty((B, R), dtype=acc, device=x.device),
                    torch.empty((B, R), dtype=acc, device=x.device))

        def row_grad_old(*args, **kw):
            launches["row_grad"] += 1

        stubs.update(row_stats=row_stats_old, row_grad=row_grad_old)
    return stubs


def _patch(module, stubs: dict) -> dict:
    saved = {k: getattr(module, k) for k in stubs}
    for k, f in stubs.items():
        setattr(module, k, f)
    return saved


def _median_us(fn, reps: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def measure(impl: str, validate: bool, shape, reps: int) -> dict:
    import fused_dpo
    from fused_dpo import _common

    B, T, V = shape
    logits = torch.zeros(B, T, V, dtype=torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 4 :] = True
    g1 = torch.ones(B)
    module = _common.backend(impl, logits.device)
    launches: collections.Counter = collections.Counter()
    saved = _patch(module, _stubs(module, launches))
    try:
        call = lambda: fused_dpo.get_logps(logits, ids, mask, impl=impl, validate=validate)
        call()  # first-call imports and caches out of the counts
        launches.clear()
        with CountOps() as fwd_ops:
            out = call()
        fwd_launches = sum(launches.values())
        launches.clear()
        with CountOps() as bwd_ops:
            out.backward(g1)
        bwd_launches = sum(launches.values())
        logits.grad = None

        def fwd_bwd():
            call().backward(g1)
            logits.grad = None

        with torch.no_grad():
            t_nograd = _median_us(call, reps)
        t_fwd = _median_us(call, reps)
        t_fb = _median_us(fwd_bwd, reps)
    finally:
        _patch(module, saved)
    return dict(impl=impl, validate=validate, fwd_ops=sum(fwd_ops.ops.values()),
                bwd_ops=sum(bwd_ops.ops.values()), fwd_launches=fwd_launches,
                bwd_launches=bwd_launches, fwd_nograd_us=t_nograd, fwd_us=t_fwd, fwd_bwd_us=t_fb,
                fwd_op_names=dict(fwd_ops.ops), bwd_op_names=dict(bwd_ops.ops))


def _commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=path).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2x512x32000", help="BxTxV (bf16 logits, prompt = first quarter)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--impls", default="torch,triton")
    ap.add_argument("--ops", action="store_true", help="also list the aten ops by name")
    args = ap.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    import fused_dpo

    root = Path(fused_dpo.__file__).resolve().parent.parent
    print(f"fused_dpo from {root} (commit {_commit(root)}), torch {torch.__version__}, "
          f"shape {args.shape} bf16, launchers stubbed, {args.reps} reps")
    print(f"{'impl':<7}{'validate':<9}{'aten fwd':>9}{'aten bwd':>9}{'launch fwd':>11}"
          f"{'launch bwd':>11}{'fwd no_grad us':>15}{'fwd us':>9}{'fwd+bwd us':>11}")
    for impl in args.impls.split(","):
        for validate in (False, True):
            r = measure(impl, validate, shape, args.reps)
            print(f"{impl:<7}{str(validate):<9}{r['fwd_ops']:>9}{r['bwd_ops']:>9}{r['fwd_launches']:>11}"
                  f"{r['bwd_launches']:>11}{r['fwd_nograd_us']:>15.1f}{r['fwd_us']:>9.1f}"
                  f"{r['fwd_bwd_us']:>11.1f}", flush=True)
            if args.ops:
                print(f"    forward ops:  {r['fwd_op_names']}")
                print(f"    backward ops: {r['bwd_op_names']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
