"""`fused-dpo check`: get_logps against the eager reference on this device, with time and memory."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import torch

from ._torch_rows import cpu_threads
from .logps import get_logps
from .reference import get_logps_reference


def _measure(fn, device: torch.device, repeats: int = 3):
    """(result, median seconds, peak bytes allocated above the start) of fn()."""
    times, peak = [], 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        times.append(time.perf_counter() - t0)
    if device.type != "cuda":
        peak = measure_peak_bytes(fn)
    return out, sorted(times)[len(times) // 2], peak


def measure_peak_bytes(fn) -> int:
    """Peak bytes torch allocates on the CPU while fn() runs (replayed under the profiler): the
    running sum of every op's own allocations (+) and frees (-)."""
    from torch.profiler import ProfilerActivity, profile

    with _without_stderr_lines("USDT:"), profile(activities=[ProfilerActivity.CPU],
                                                  profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.self_cpu_memory_usage]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _without_stderr_lines(prefix: str):
    """Drop the lines starting with `prefix` that C++ code writes to fd 2 meanwhile (the CPU
    profiler prints `USDT: ... profiler_start/stop` there); every other line is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not ln.startswith(prefix)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    from ._argparse import ArgumentParser

    ap = ArgumentParser(prog="fused-dpo check", description="get_logps against the float64 eager "
                        "reference on this device (CUDA if present), forward+backward, with the "
                        "median time and the peak memory of each.")
    ap.add_argument("--batch", type=int, default=4, help="sequences (default 4)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    try:
        args = ap.parse_args(argv)
        for name in ("batch", "seq_len", "vocab"):
            if getattr(args, name) < (2 if name == "seq_len" else 1):
                raise ValueError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _check(args.batch, args.seq_len, args.vocab, args.dtype)


def _check(B: int, T: int, V: int, dtype: str) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dt).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 4 :] = True  # first quarter is prompt
    mask = mask.to(device)

    def run(fn):
        def step():
            x = logits.detach().requires_grad_(True)
            out = fn(x)
            out.sum().backward()
            return out.detach(), x.grad

        return step

    truth = get_logps_reference(logits.double(), ids, mask)
    rows = []
    for name, fn in (
        ("eager reference", lambda x: get_logps_reference(x, ids, mask)),
        ("fused_dpo", lambda x: get_logps(x, ids, mask)),
    ):
        (out, _), secs, peak = _measure(run(fn), device)
        rel = ((out.double() - truth).abs().max() / truth.abs().max()).item()
        rows.append((name, secs * 1e3, peak / 2**20, rel))
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:  # the fused path's own count: a count that is right for one large op is not for its chunks
        name = (f"CPU; eager on {torch.get_num_threads()} torch threads, fused_dpo on "
                f"{cpu_threads()} (FUSED_DPO_TORCH_THREADS)")
    print(f"get_logps check on {device} ({name}), "
          f"B={B} T={T} V={V} {dtype}, forward+backward, prompt = first quarter")
    print(f"{'provider':<18}{'ms':>10}{'peak MiB':>12}{'max rel err vs fp64':>22}")
    for name, ms, mib, rel in rows:
        print(f"{name:<18}{ms:>10.1f}{mib:>12.1f}{rel:>22.2e}")
    ok = rows[1][3] <= 1e-5
    print("OK: fused_dpo matches the float64 reference" if ok else "MISMATCH")
    return 0 if ok else 1
