"""One DPO training step on a random-init Qwen2-0.5B-shaped model (tied head, V=151936), 8 sequences
x 1024 tokens, bf16: policy forward+backward and reference forward, eager logits vs fused hidden path.

    python -m bench.train_step        (needs CUDA; ~1 minute on an H100)
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from triton.testing import do_bench

    from fused_dpo import get_logps
    from fused_dpo.losses import dpo_loss
    from fused_dpo.train.trainer import LogpsHead

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    ref = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).requires_grad_(False).eval()
    B, T = 8, 1024
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    mask = torch.zeros(B, T, dtype=torch.bool, device="cuda")
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
    weights = torch.cuda.memory_allocated()
    print(f"{torch.cuda.get_device_name()}: Qwen2-0.5B-shaped, B={B} T={T} V={cfg.vocab_size} bf16; "
          f"weights {weights / 2**30:.2f} GiB")
    for name, (pol, rf) in variants.items():
        def step(pol=pol, rf=rf):
            policy.zero_grad(set_to_none=True)
            with torch.no_grad():
                r = rf(ref)
            lp = pol(policy)
            loss, _ = dpo_loss(lp[: B // 2], lp[B // 2 :], r[: B // 2], r[B // 2 :], beta=0.1)
            loss.backward()

        step()
        policy.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = do_bench(step, warmup=3, rep=40, quantiles=[0.5, 0.2, 0.8])
        print(f"  {name:<32} {ms[0]:8.1f} ms [{ms[1]:.1f}-{ms[2]:.1f}]  peak above weights {peak:6.2f} GiB",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
