"""One DPO training step on a random-init Qwen2-0.5B-shaped model (tied head, V=151936), 8 sequences
x 1024 tokens, bf16: policy forward+backward and reference forward, eager logits vs fused hidden path.

    python -m bench.train_step        (needs CUDA; ~1 minute on an H100)
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a tiny model through the same code paths (smoke run)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import bench.__main__ as bench_main
    from fused_dpo import get_logps
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
    variants = {
        "eager get_logps on full logits": (eager_logps, eager_logps),
        "fused hidden-state path": (lambda m: fused_policy(batch)[0], lambda m: fused_ref(batch)[0]),
    }
    cuda = dev == "cuda"
    weights = torch.cuda.memory_allocated() if cuda else 0
    name = torch.cuda.get_device_name() if cuda else "CPU smoke run"
    print(f"{name}: Qwen2-shaped H={cfg.hidden_size} L={cfg.num_hidden_layers}, B={B} T={T} "
          f"V={cfg.vocab_size} {dtype}; weights {weights / 2**30:.2f} GiB")
    results = {}
    for label, (pol, rf) in variants.items():
        def step(pol=pol, rf=rf):
            policy.zero_grad(set_to_none=True)
            with torch.no_grad():
                r = rf(ref)
            lp = pol(policy)
            loss, _ = dpo_loss(lp[: B // 2], lp[B // 2 :], r[: B // 2], r[B // 2 :], beta=0.1)
            loss.backward()
            return loss.detach()

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
    a, b = results.values()
    print(f"  loss agreement: eager {a:.6f} fused {b:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
