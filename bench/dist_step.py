"""The trainer through its distributed code path (issue 13).

    python -m bench.dist_step              one GPU: FSDP2 with world size 1 (NCCL) against the plain
                                           trainer: the same numbers on a tiny model, then the
                                           Qwen2-0.5B-shaped step (8 x 1024, V=151936, bf16) timed
                                           both ways, with the ratio beside its goal (<= 1.05)
    python -m bench.dist_step --device cpu the same on the CPU with small shapes (a smoke run)
    python -m bench.dist_step memory       the CPU, gloo: model-state bytes per rank (parameters,
                                           gradients, AdamW moments; policy and reference) of a
                                           one-step run, plain and DDP and FSDP2 on 1, 2 and 4
                                           ranks, launched with torchrun
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.05  # the FSDP2 world-size-1 step at most 1.05x the plain step


def _trainer(model, pairs, cfg_kw: dict, out: str, parallel: str, eval_pairs=None):
    from fused_dpo.train import distributed
    from fused_dpo.train.config import DPOConfig
    from fused_dpo.train.data import Tokenized
    from fused_dpo.train.trainer import DPOTrainer

    d = distributed.setup(parallel)
    cfg = DPOConfig(**{"output_dir": out, "parallel": parallel, **cfg_kw})
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    held = Tokenized(eval_pairs) if eval_pairs else None
    return DPOTrainer(model, None, tok, Tokenized(pairs), held, cfg, dist=d)


def _random_pairs(n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [(draw(prompt), draw(response), draw(response)) for _ in range(n)]


def same_numbers(dev: str) -> float:
    """A tiny Llama trained 4 steps plain and through FSDP2 (world size 1): the largest relative
    difference over the logged losses, margins, gradient norms and held-out metrics."""
    from fused_dpo.train.models import tiny_llama

    pairs = _random_pairs(40, 8, 8, 96)
    kw = dict(max_steps=4, batch_size=4, eval_steps=2, save_steps=4, lr_scheduler="constant",
              warmup_steps=0)
    rows = {}
    for parallel in ("none", "fsdp2"):
        with tempfile.TemporaryDirectory() as tmp:
            t = _trainer(tiny_llama(96).to(dev), pairs[:32], kw, tmp + "/run", parallel, pairs[32:])
            rows[parallel] = t.train(progress=False)["metrics"]
    worst = 0.0
    for a, b in zip(rows["none"], rows["fsdp2"], strict=True):
        for k, v in a.items():
            if k in ("tokens_per_s", "peak_mem_MiB") or not isinstance(v, float):
                continue
            worst = max(worst, abs(b[k] - v) / max(abs(v), 1e-6))
    print(f"tiny Llama, 4 steps: plain vs FSDP2 world size 1, largest relative difference of the logged "
          f"metrics {worst:.2e}")
    return worst


def step_time(dev: str, steps: int) -> None:
    """The Qwen2-0.5B-shaped DPO step (policy forward+backward, reference forward, AdamW) of the
    trainer, plain and through FSDP2 with world size 1: median ms per step and peak memory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if dev == "cuda":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          tie_word_embeddings=True, max_position_embeddings=2048)
        B, prompt, response = 4, 256, 768  # 4 pairs: 8 sequences of 1024 tokens
    else:
        cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        B, prompt, response = 2, 8, 24
    pairs = _random_pairs(B * (steps + 3), prompt, response, cfg.vocab_size)
    kw = dict(max_steps=steps + 3, batch_size=B, precision="bf16" if dev == "cuda" else "fp32",
              eval_steps=10**6, save_steps=10**6, learning_rate=1e-5)
    res = {}
    for parallel in ("none", "fsdp2"):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(dev)  # fp32 master weights
        with tempfile.TemporaryDirectory() as tmp:
            t = _trainer(model, pairs, kw, tmp + "/run", parallel)
            times, peak = [], 0.0
            for i in range(steps + 3):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m = t.train_step()
                if dev == "cuda":
                    torch.cuda.synchronize()
                if i >= 3:  # warm-up: allocator, autotuning, FSDP2's lazy init
                    times.append((time.perf_counter() - t0) * 1e3)
                    peak = max(peak, m["peak_mem_MiB"])
        res[parallel] = statistics.median(times)
        name = {"none": "plain trainer", "fsdp2": "FSDP2, world size 1"}[parallel]
        print(f"  {name:<22} {res[parallel]:8.1f} ms/step (median of {steps}; "
              f"{min(times):.1f}-{max(times):.1f})  peak {peak / 1024:6.2f} GiB", flush=True)
        del t, model
        if dev == "cuda":
            torch.cuda.empty_cache()
    ratio = res["fsdp2"] / res["none"]
    print(f"  FSDP2 world-size-1 step / plain step = {ratio:.3f}  (goal <= {GOAL}: "
          f"{'ok' if ratio <= GOAL else 'MISS'})")


def memory(ranks: list[int]) -> list[dict]:
    """Launch one-step runs with torchrun (gloo, CPU) and collect each rank's model-state bytes."""
    rows = []
    for parallel, n in [("none", 1)] + [(p, n) for p in ("ddp", "fsdp2") for n in ranks]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(n), "-m", "bench.dist_step", "memory-worker", parallel, tmp]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1",
                   "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{parallel} on {n} ranks failed")
            per_rank = json.loads((Path(tmp) / "state.json").read_text())
        rows.append({"parallel": parallel, "ranks": n, "per_rank": per_rank})
        mib = {k: v / 2**20 for k, v in per_rank[0].items()}.get
        print(f"{parallel:<6} {n} rank(s): rank 0 holds {mib('total'):7.2f} MiB (parameters "
              f"{mib('parameters'):6.2f}, gradients {mib('gradients'):6.2f}, optimizer "
              f"{mib('optimizer'):6.2f}); every rank: {', '.join(_mib(r) for r in per_rank)}",
              flush=True)
    return rows


def _mib(b: dict) -> str:
    return f"{b['total'] / 2**20:.2f}"


def memory_worker(parallel: str, out: str) -> None:
    """One rank of `memory`: a Llama of 6.8M parameters (H=256, 4 layers, V=8192), one step."""
    from fused_dpo.train.models import tiny_llama

    torch.set_num_threads(1)
    pairs = _random_pairs(16, 8, 8, 8192)
    t = _trainer(tiny_llama(8192, hidden=256, layers=4), pairs,
                 dict(max_steps=1, batch_size=2, eval_steps=10**6, save_steps=10**6), out + "/run",
                 parallel)
    res = t.train(progress=False)
    if t.dist.main:
        Path(out, "state.json").write_text(json.dumps(res["model_state_bytes_per_rank"]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["memory-worker"]:
        memory_worker(*argv[1:3])
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.dist_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["step", "memory"], default="step")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--out", help="memory: write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.what == "memory":
        rows = memory([int(x) for x in args.ranks.split(",")])
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU smoke run"
    print(f"{name}, torch {torch.__version__}")
    same_numbers(args.device)
    print("Qwen2-0.5B-shaped DPO step through the trainer" if args.device == "cuda" else
          "Qwen2-shaped (tiny) DPO step through the trainer")
    step_time(args.device, args.steps)
    import torch.distributed as dist

    if dist.is_initialized():  # the group of one that the FSDP2 trainers joined
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
