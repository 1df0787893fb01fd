"""Scenarios of tests/test_distributed.py that need the trainer's Python API on every rank, run as
`torchrun --nproc-per-node N tests/dist_worker.py SCENARIO[,SCENARIO...] OUT_DIR` (gloo, CPU).
Rank 0 writes what the test checks to OUT_DIR/result-SCENARIO.json.

    tied   FSDP2 on a Llama whose lm_head is its input embedding: the tie survives sharding and
           training, and the run matches one process (the test runs that one itself).
    lora   FSDP2 with LoRA adapters (the reference is the policy with its adapters off, through
           the same sharded root): the run matches one process.
    nan    DDP; rank 1 alone sees a NaN loss at step 1: every rank skips that step, and the
           weights stay identical across ranks.
    nanacc FSDP2, 2 accumulation steps; rank 1 alone sees a NaN loss on the second micro-batch of
           step 1, after the first one's backward: the step is skipped and nothing of it leaks
           into the next (the test compares with one process that skips the same micro-batch).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fused_dpo.train import distributed  # noqa: E402
from fused_dpo.train.config import DPOConfig  # noqa: E402
from fused_dpo.train.data import synthetic_sorting  # noqa: E402
from fused_dpo.train.models import train_tokenizer  # noqa: E402
from fused_dpo.train.trainer import DPOTrainer  # noqa: E402

ROWS = synthetic_sorting(40, seed=0)


def tied_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def setup(rows=ROWS):
    tok = train_tokenizer(r[k] for r in rows for k in ("prompt", "chosen", "rejected"))
    return tok, rows[:32], rows[32:]


def config(out: Path, **kw) -> DPOConfig:
    return DPOConfig(**{"output_dir": str(out), "max_steps": 3, "eval_steps": 2, "save_steps": 2,
                        "lr_scheduler": "constant", "warmup_steps": 0, **kw})


def tied(out: Path):
    d = distributed.setup("fsdp2")
    tok, train, held = setup()
    model = tied_llama(len(tok))
    t = DPOTrainer(model, None, tok, train, held, config(out / "run", batch_size=2, parallel="fsdp2"),
                   dist=d)
    tied_after_wrap = model.lm_head.weight is model.model.embed_tokens.weight
    result = t.train(progress=False)
    return {"tied_after_wrap": tied_after_wrap,
            "tied_after_training": model.lm_head.weight is model.model.embed_tokens.weight,
            "rows": result.get("metrics")}


def lora(out: Path):
    d = distributed.setup("fsdp2")
    tok, train, held = setup()
    from fused_dpo.train.models import tiny_llama

    t = DPOTrainer(tiny_llama(len(tok)), None, tok, train, held,
                   config(out / "lora", batch_size=2, parallel="fsdp2", lora_r=4, learning_rate=1e-2),
                   dist=d)
    return {"rows": t.train(progress=False).get("metrics")}


def poison(t, rank: int, step: int, micro: int):
    """t whose training loss is NaN on `rank` at micro-batch `micro` of `step` (-1: every rank)."""
    forward, seen = t._forward_loss, {}

    def poisoned(*args, **kw):
        loss, *rest = forward(*args, **kw)
        if args[2] == "train":
            k = seen[t.step] = seen.get(t.step, -1) + 1
            if t.step == step and k == micro and rank in (-1, t.dist.rank):
                loss = loss * float("nan")
        return (loss, *rest)

    t._forward_loss = poisoned
    return t


def nanacc(out: Path, parallel="fsdp2", batch_size=2, rank=1):
    d = distributed.setup(parallel)
    tok, train, held = setup()
    from fused_dpo.train.models import tiny_llama

    t = DPOTrainer(tiny_llama(len(tok)), None, tok, train, held,
                   config(out / f"nanacc-{parallel}", batch_size=batch_size, parallel=parallel,
                          gradient_accumulation_steps=2, max_steps=3), dist=d)
    result = poison(t, rank, step=1, micro=1).train(progress=False)
    return {"flags": result["flags"], "rows": result.get("metrics")}


def nan(out: Path):
    d = distributed.setup("ddp")
    tok, train, held = setup()
    from fused_dpo.train.models import tiny_llama

    t = DPOTrainer(tiny_llama(len(tok)), None, tok, train, None,
                   config(out / "run", batch_size=2, parallel="ddp", max_steps=3), dist=d)
    forward = t._forward_loss

    def poisoned(*args, **kw):
        loss, *rest = forward(*args, **kw)
        if d.rank == 1 and t.step == 1:
            loss = loss * float("nan")
        return (loss, *rest)

    t._forward_loss = poisoned
    result = t.train(progress=False)
    digest = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]).double().sum().item()
    return {"flags": result["flags"], "steps": result["steps"], "digests": d.gather(digest),
            "rows": result.get("metrics")}


if __name__ == "__main__":
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    for scenario in sys.argv[1].split(","):  # several in one launch: one start-up paid
        res = {"tied": tied, "lora": lora, "nan": nan, "nanacc": nanacc}[scenario](out)
        if distributed.Dist(rank=int(os.environ.get("RANK", "0"))).main:
            (out / f"result-{scenario}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()
