"""Packed sequences and vocab-parallel log-probs on one GPU (issue 14's goals).

    python -m bench.packed_vp               (CUDA, about 30 s)
    python -m bench.packed_vp --device cpu  (small shapes through the same code: a smoke run)

Packed: 8 sequences of 128, 256, ..., 1024 tokens (4608 real tokens; 8192 in the padded batch of
8 x 1024), the last three quarters of each its response, H=2048, V=128256, bf16.
  - the op alone: get_logps_from_hidden forward+backward, padded (B=8, T=1024) against packed
    (1, 4608) with cu_seqlens; with compact=False (every row through the head) and the default
    compact=True (response rows only: padding is skipped already there);
  - model + op: a Qwen2-0.5B-shaped model's forward+backward and the op, padded against packed
    (position_ids restarting per sequence, no attention mask and no KV cache: transformers then
    masks packed sequences from the resets). Goal: packed <= 0.6x padded.
Vocab-parallel with world size 1 (a process group of one): get_logps on 8 x 1024 x 128256 logits
and get_logps_from_hidden on 8 x 1024 x 2048 x 128256, forward+backward, against the same calls
without process_group. Goal: within 3%.
"""

from __future__ import annotations

import sys

import torch

PACKED_GOAL, VP_GOAL = 0.6, 1.03


def _lengths(dev: str) -> list[int]:
    return [128 * k for k in range(1, 9)] if dev == "cuda" else [4 * k for k in range(1, 9)]


def _batches(dev: str, V: int):
    """(padded ids, attention mask, response mask), (packed ids, response mask, position_ids,
    cu_seqlens) of the same 8 sequences."""
    g = torch.Generator().manual_seed(0)
    lens = _lengths(dev)
    T = max(lens)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in lens]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    attn = torch.zeros(len(lens), T, dtype=torch.long)
    resp = torch.zeros(len(lens), T, dtype=torch.bool)
    for k, s in enumerate(seqs):
        ids[k, : len(s)], attn[k, : len(s)] = s, 1
        resp[k, len(s) // 4 : len(s)] = True
    pids = torch.cat(seqs)[None]
    presp = torch.cat([resp[k, : n] for k, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    to = lambda *ts: [t.to(dev) for t in ts]  # noqa: E731
    return to(ids, attn, resp), to(pids, presp, pos, cu)


def packed(dev: str, bench) -> None:
    from fused_dpo import get_logps_from_hidden

    H, V, dt = (2048, 128256, torch.bfloat16) if dev == "cuda" else (64, 1000, torch.float32)
    (ids, attn, resp), (pids, presp, pos, cu) = _batches(dev, V)
    torch.manual_seed(0)
    w = (torch.randn(V, H, device=dev) * H**-0.5).to(dt).requires_grad_()
    h_pad = torch.randn(*ids.shape, H, device=dev, dtype=dt, requires_grad=True)
    h_pack = torch.randn(*pids.shape, H, device=dev, dtype=dt, requires_grad=True)
    real, total = int(attn.sum()), ids.numel()
    print(f"packed: 8 sequences of {_lengths(dev)[0]}..{_lengths(dev)[-1]} tokens, {real} real of "
          f"{total} padded; H={H} V={V} {dt}")
    for compact in (False, True):
        def pad_step(compact=compact):
            w.grad = h_pad.grad = None
            get_logps_from_hidden(h_pad, w, ids, resp, compact=compact, validate=False).sum().backward()

        def pack_step(compact=compact):
            w.grad = h_pack.grad = None
            get_logps_from_hidden(h_pack, w, pids, presp, cu_seqlens=cu, compact=compact,
                                  validate=False).sum().backward()

        a, b = bench(pad_step)[0], bench(pack_step)[0]
        print(f"  op only, compact={compact!s:<5}  padded {a:8.2f} ms  packed {b:8.2f} ms  "
              f"packed/padded {b / a:.3f}  (real/padded tokens {real / total:.3f})", flush=True)


def model_and_op(dev: str, bench) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fused_dpo import get_logps_from_hidden

    if dev == "cuda":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          tie_word_embeddings=True, max_position_embeddings=2048)
    else:
        cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    (ids, attn, resp), (pids, presp, pos, cu) = _batches(dev, cfg.vocab_size)
    share = int(attn.sum()) / ids.numel()

    def pad_step():
        model.zero_grad(set_to_none=True)
        h = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        get_logps_from_hidden(h, model.lm_head.weight, ids, resp, validate=False).sum().backward()

    def pack_step():
        model.zero_grad(set_to_none=True)
        h = model.model(input_ids=pids, position_ids=pos, use_cache=False).last_hidden_state
        get_logps_from_hidden(h, model.lm_head.weight, pids, presp, cu_seqlens=cu,
                              validate=False).sum().backward()

    with torch.no_grad():  # the same numbers both ways, or the timing compares different work
        h = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        a = get_logps_from_hidden(h, model.lm_head.weight, ids, resp).float()
        h = model.model(input_ids=pids, position_ids=pos, use_cache=False).last_hidden_state
        b = get_logps_from_hidden(h, model.lm_head.weight, pids, presp, cu_seqlens=cu).float()
    agree = float(((a - b).abs() / a.abs().clamp_min(1)).max())
    ta, tb = bench(pad_step)[0], bench(pack_step)[0]
    print(f"  Qwen2-shaped model + op (H={cfg.hidden_size}, {cfg.num_hidden_layers} layers): padded "
          f"{ta:8.2f} ms  packed {tb:8.2f} ms  packed/padded {tb / ta:.3f} (goal <= {PACKED_GOAL}: "
          f"{'ok' if tb / ta <= PACKED_GOAL else 'MISS'}; real/padded tokens {share:.3f}); per-sequence "
          f"log-probs agree to {agree:.1e} relative", flush=True)


def vocab_parallel(dev: str, bench) -> None:
    import torch.distributed as dist

    from fused_dpo import get_logps, get_logps_from_hidden

    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    group = dist.group.WORLD
    B, T, H, V = (8, 1024, 2048, 128256) if dev == "cuda" else (2, 32, 64, 1000)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    ids = torch.randint(0, V, (B, T), device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    mask[:, T // 4 :] = True
    logits = torch.randn(B, T, V, device=dev, dtype=dt, requires_grad=True)
    hid = torch.randn(B, T, H, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(V, H, device=dev) * H**-0.5).to(dt).requires_grad_()
    print(f"vocab-parallel, world size 1: logits {B}x{T}x{V}, hidden {B}x{T}x{H}x{V}, {dt}")
    calls = {
        "logits": lambda kw: get_logps(logits, ids, mask, validate=False, **kw),
        "hidden": lambda kw: get_logps_from_hidden(hid, w, ids, mask, validate=False, **kw),
    }
    for name, call in calls.items():
        times = []
        for kw in ({}, {"process_group": group}):
            def step(call=call, kw=kw):
                logits.grad = hid.grad = w.grad = None
                call(kw).sum().backward()

            times.append(bench(step)[0])
        r = times[1] / times[0]
        print(f"  {name:<7} plain {times[0]:8.2f} ms  process_group {times[1]:8.2f} ms  ratio {r:.3f} "
              f"(goal <= {VP_GOAL}: {'ok' if r <= VP_GOAL else 'MISS'})", flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import argparse

    import bench.__main__ as bench_main

    ap = argparse.ArgumentParser(prog="python -m bench.packed_vp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu)", file=sys.stderr)
        return 2
    bench_main.DEVICE = args.device

    def bench(fn):
        return bench_main._do_bench(fn, rep_ms=300)

    print(torch.cuda.get_device_name() if args.device == "cuda" else "CPU smoke run")
    packed(args.device, bench)
    model_and_op(args.device, bench)
    vocab_parallel(args.device, bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
