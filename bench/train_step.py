"""One DPO training step on a random-init Qwen2-0.5B-shaped model (tied head, V=151936), 8 sequences
x 1024 tokens, bf16: policy forward+backward and reference forward, eager logits vs fused hidden path.

    python -m bench.train_step             (needs CUDA; ~1 minute on an H100)
    python -m bench.train_step --profile   (then a torch profiler over a few fused steps: top ops
                                            by self CUDA and self CPU time, and the host syncs)
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a tiny model through the same code paths (smoke run)")
    ap.add_argument("--profile", action="store_true",
                    help="profile a few fused steps: where the step's time goes beyond the model")
    ap.add_argument("--profile-steps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import bench.__main__ as bench_main
    from fused_dpo import dpo_loss_from_hidden, get_logps
    from fused_dpo.losses import dpo_loss
    from fused_dpo.train.trainer import LogpsHead

    dev = bench_main.DEVICE = args.device
    if dev == "cuda":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          tie_word_embeddings=True, max_position_embeddings=2048)
        B, T, dtype = 8, 1024, torch.bfloat16
    else:
        cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        B, T, dtype = 4, 32, torch.float32
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(cfg).to(dev, dtype)
    ref = Qwen2ForCausalLM(cfg).to(dev, dtype).requires_grad_(False).eval()
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    mask[:, T // 4 :] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask}

    def eager_logps(model):
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        return get_logps(logits, ids, mask, impl="reference")

    fused_policy, fused_ref = LogpsHead(policy, "auto"), LogpsHead(ref, "auto")

    def loss_3mm(r):
        # The loss's gradient formed pair by pair in the forward: 3 head matmuls instead of 4.
        hidden = policy.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        loss, _ = dpo_loss_from_hidden(hidden, policy.lm_head.weight, ids, mask, ref_logps=r,
                                       beta=0.1, grad_in_forward=True, validate=False)
        return loss

    variants = {
        "eager get_logps on full logits": (eager_logps, eager_logps),
        "fused hidden-state path": (lambda m: fused_policy(batch)[0], lambda m: fused_ref(batch)[0]),
        "fused, 3 matmuls": (None, lambda m: fused_ref(batch)[0]),
    }
    cuda = dev == "cuda"
    weights = torch.cuda.memory_allocated() if cuda else 0
    name = torch.cuda.get_device_name() if cuda else "CPU smoke run"
    print(f"{name}: Qwen2-shaped H={cfg.hidden_size} L={cfg.num_hidden_layers}, B={B} T={T} "
          f"V={cfg.vocab_size} {dtype}; weights {weights / 2**30:.2f} GiB")
    results, steps = {}, {}
    for label, (pol, rf) in variants.items():
        def step(pol=pol, rf=rf):
            policy.zero_grad(set_to_none=True)
            with torch.no_grad():
                r = rf(ref)
            if pol is None:
                loss = loss_3mm(r)
            else:
                lp = pol(policy)
                loss, _ = dpo_loss(lp[: B // 2], lp[B // 2 :], r[: B // 2], r[B // 2 :], beta=0.1)
            loss.backward()
            return loss.detach()

        steps[label] = step
        results[label] = float(step())
        policy.zero_grad(set_to_none=True)
        peak = 0.0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = bench_main._do_bench(step, rep_ms=1000)
        print(f"  {label:<32} {ms[0]:8.1f} ms [{ms[1]:.1f}-{ms[2]:.1f}]  peak above weights {peak:6.2f} GiB",
              flush=True)
    a, b, c = results.values()
    print(f"  loss agreement: eager {a:.6f} fused {b:.6f} fused3mm {c:.6f}")
    if args.profile:
        profile_steps(steps["fused hidden-state path"], args.profile_steps, cuda)
    return 0


# Host syncs show up as these runtime calls (a D2H copy blocks until the stream is done).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
D2H_EVENTS = ("Memcpy DtoH",)  # the copy as the GPU side records it (.item(), bool(), .cpu())


def profile_steps(step, n: int, cuda: bool, top: int = 15) -> None:
    """Run `n` steps under torch.profiler and print the top ops by self CUDA and self CPU time,
    and the count of host syncs (stream/device syncs, device-to-host copies) per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()  # warm-up outside the trace
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"\nprofile of {n} fused steps (totals over the {n} steps)")
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    syncs = sum(e.count for e in events if any(k in e.key for k in SYNC_EVENTS))
    d2h = sum(e.count for e in events if any(k in e.key for k in D2H_EVENTS))
    local_dense = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
    nonzero = sum(e.count for e in events if e.key == "aten::nonzero")
    print(f"host syncs per step: {syncs / n:.1f} stream/device syncs, {d2h / n:.1f} D2H copies "
          f"(aten::_local_scalar_dense {local_dense / n:.1f}: .item()/bool(); aten::nonzero "
          f"{nonzero / n:.1f})")


if __name__ == "__main__":
    sys.exit(main())
