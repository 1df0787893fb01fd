"""Scenarios of tests/test_distributed.py that need the trainer's Python API on every rank, run as
`torchrun --nproc-per-node 2 tests/dist_worker.py SCENARIO[,SCENARIO...] OUT_DIR` (gloo, CPU).
Rank 0 writes what the test checks to OUT_DIR/result-SCENARIO.json.

    tied       FSDP2 on a Llama whose lm_head is its input embedding: the tie survives sharding
               and training, and the run matches one process (the test runs that one itself).
    lora       FSDP2 with LoRA adapters (the reference is the policy with its adapters off,
               through the same sharded root): the run matches one process.
    export     DDP and FSDP2 runs that write output_dir/model/ (`export_runs` says which).
    nan-ddp    DDP, 2 accumulation steps; rank 1 alone sees a NaN loss on the second micro-batch
    nan-fsdp2  of step 1, after the first one's backward (FSDP2: already reduced into the shards;
               DDP: held unreduced in each rank's .grad): every rank skips the step, and nothing
               of it reaches the next: the run equals, bit for bit, the same run whose step 1 is
               skipped before any forward.
    optim-ddp  DDP with each memory feature (MEMORY: adamw_8bit, adamw_cpu_offload, QLoRA): 2 steps
               in one go, and 1 step then resumed by a fresh trainer to 2.

The runs that match one process use RANK_BATCH pairs per rank and no accumulation; `reference`
is the one-process config that computes exactly what they do (see tests/test_distributed.py).
"""

import hashlib
import json
import os
import sys
from functools import partial
from pathlib import Path

if __name__ == "__main__":  # a rank; the test, which imports this module, set it up already
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fused_dpo.train import distributed  # noqa: E402
from fused_dpo.train.config import DPOConfig  # noqa: E402
from fused_dpo.train.data import synthetic_sorting  # noqa: E402
from fused_dpo.train.models import tiny_llama, train_tokenizer  # noqa: E402
from fused_dpo.train.trainer import DPOTrainer  # noqa: E402

ROWS = synthetic_sorting(40, seed=0)
WORLD = 2
RANK_BATCH = 2
HELD_OUT = RANK_BATCH * WORLD  # pairs: one evaluation batch of the ranks


def tied_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def setup(rows=ROWS):
    tok = train_tokenizer(r[k] for r in rows for k in ("prompt", "chosen", "rejected"))
    return tok, rows[:-HELD_OUT], rows[-HELD_OUT:]


def config(out: Path, **kw) -> DPOConfig:
    return DPOConfig(**{"output_dir": str(out), "max_steps": 3, "eval_steps": 2, "save_steps": 2,
                        "lr_scheduler": "constant", "warmup_steps": 0, **kw})


def reference(out: Path, **kw) -> DPOConfig:
    """The one-process config of the ranks' runs: each rank's micro-batch, in rank order."""
    return config(out, batch_size=RANK_BATCH, gradient_accumulation_steps=WORLD, **kw)


def tied(out: Path):
    d = distributed.setup("fsdp2")
    tok, train, held = setup()
    model = tied_llama(len(tok))
    t = DPOTrainer(model, None, tok, train, held,
                   config(out / "run", batch_size=RANK_BATCH, parallel="fsdp2"), dist=d)
    tied_after_wrap = model.lm_head.weight is model.model.embed_tokens.weight
    result = t.train(progress=False)
    return {"tied_after_wrap": tied_after_wrap,
            "tied_after_training": model.lm_head.weight is model.model.embed_tokens.weight,
            "rows": result.get("metrics")}


def lora(out: Path):
    d = distributed.setup("fsdp2")
    tok, train, held = setup()
    t = DPOTrainer(tiny_llama(len(tok)), None, tok, train, held,
                   config(out / "lora", batch_size=RANK_BATCH, parallel="fsdp2", lora_r=4,
                          learning_rate=1e-2), dist=d)
    return {"rows": t.train(progress=False).get("metrics")}


def poison(t, rank: int, step: int, micro: int):
    """t whose training loss is NaN on `rank` alone at micro-batch `micro` of `step`."""
    forward, seen = t._forward_loss, {}

    def poisoned(*args, **kw):
        loss, *rest = forward(*args, **kw)
        if args[2] == "train":
            k = seen[t.step] = seen.get(t.step, -1) + 1
            if t.step == step and k == micro and t.dist.rank == rank:
                loss = loss * float("nan")
        return (loss, *rest)

    t._forward_loss = poisoned
    return t


def skip(t, step: int):
    """t whose `step` is skipped before any forward: its first micro-batch's loss is NaN on every
    rank without a forward, and the pairs of its other micro-batches are drawn as a run that
    reaches them draws them."""
    forward = t._forward_loss

    def skipped(*args, **kw):
        if args[2] != "train" or t.step != step:
            return forward(*args, **kw)
        for _ in range(t.config.gradient_accumulation_steps - 1):
            t._pair_indices(t.config.batch_size * t.dist.world)
        return torch.tensor(float("nan")), {}, None, 0.0

    t._forward_loss = skipped
    return t


def weights_digest(model, trainable_only: bool = False) -> str:
    """sha256 of this rank's parameters (its shards under FSDP2), or of those it trains (all of
    them, or the LoRA adapters), bit for bit."""
    h = hashlib.sha256()
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        p = p.detach()
        h.update((p.to_local() if hasattr(p, "to_local") else p).contiguous().numpy().tobytes())
    return h.hexdigest()


def nan(out: Path, parallel: str):
    d = distributed.setup(parallel)
    tok, train, held = setup()
    runs = {}
    for how in ("poisoned", "skipped"):
        t = DPOTrainer(tiny_llama(len(tok)), None, tok, train, held,
                       config(out / f"nan-{parallel}-{how}", batch_size=RANK_BATCH, parallel=parallel,
                              gradient_accumulation_steps=2), dist=d)
        t = poison(t, rank=1, step=1, micro=1) if how == "poisoned" else skip(t, step=1)
        result = t.train(progress=False)
        runs[how] = {"flags": result["flags"], "steps": result["steps"], "rows": result.get("metrics"),
                     "weights": d.gather(weights_digest(t.model))}
    return runs


def export_runs(out: Path):
    """Runs that write model/ (tests/test_export.py): DDP, in out/export-ddp; FSDP2: a tied Llama
    trained in full, in out/export-full; LoRA adapters in out/export-lora, and the same trainer's
    adapters merged, saved once more into out/export-merged."""
    from fused_dpo.train import export

    tok, train, held = setup()
    DPOTrainer(tiny_llama(len(tok)), None, tok, train, held,
               config(out / "export-ddp", batch_size=RANK_BATCH, parallel="ddp"),
               dist=distributed.setup("ddp")).train(progress=False)
    d = distributed.setup("fsdp2")
    DPOTrainer(tied_llama(len(tok)), None, tok, train, held,
               config(out / "export-full", batch_size=RANK_BATCH, parallel="fsdp2"),
               dist=d).train(progress=False)
    t = DPOTrainer(tiny_llama(len(tok)), None, tok, train, held,
                   config(out / "export-lora", batch_size=RANK_BATCH, parallel="fsdp2", lora_r=4,
                          learning_rate=1e-2), dist=d)
    t.train(progress=False)
    t.config.merge_lora, t.out = True, out / "export-merged"
    t.out.mkdir(exist_ok=True)
    export.save_model(t)
    return {}


# The memory features of issue 22 that run under DDP: {name: the config fields it sets}.
MEMORY = {"adamw_8bit": dict(optim="adamw_8bit"), "adamw_cpu_offload": dict(optim="adamw_cpu_offload"),
          "qlora": dict(lora_r=4, load_in_4bit=True, dtype="bfloat16")}


def optim_runs(out: Path):
    """MEMORY under DDP: {name: {"optimizer": its class, "nf4_layers": n, "straight": run,
    "resumed": run}}, a run being its steps, rows (rank 0's metrics log) and every rank's
    weights_digest of what it trains, or {"error": message} for a resume that raised. The
    straight run saves at step 1 too, as the cut one does; the 4-bit base is built as load_model
    builds tiny's."""
    from fused_dpo.train.quant import quantize

    d = distributed.setup("ddp")
    tok, train, held = setup()

    def run(t, res):
        return {"steps": res["steps"], "rows": res.get("metrics"),
                "weights": d.gather(weights_digest(t.model, trainable_only=True))}

    runs = {}
    for name, kw in MEMORY.items():
        def trainer(how, kw=kw, name=name):
            model = tiny_llama(len(tok))
            if kw.get("load_in_4bit"):
                model = quantize(model, getattr(torch, kw["dtype"]))
            cfg = config(out / f"optim-{name}-{how}", batch_size=RANK_BATCH, parallel="ddp", max_steps=2,
                         save_steps=1, max_length=32, **kw)
            return DPOTrainer(model, None, tok, train, held, cfg, dist=d)

        t = trainer("straight")
        runs[name] = {"optimizer": type(t.optimizer).__name__,
                      "nf4_layers": sum(type(m).__name__ == "Linear4bit" for m in t.model.modules()),
                      "straight": run(t, t.train(progress=False))}
        trainer("resumed").train(progress=False, until_step=1)
        t = trainer("resumed")
        try:
            runs[name]["resumed"] = run(t, t.train(progress=False, resume=True))
        except RuntimeError as e:
            # Loading the checkpoint into the model raises alike on every rank (the same model and
            # files), so the job goes on to the next feature and the test shows the message.
            runs[name]["resumed"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return runs


SCENARIOS = {"tied": tied, "lora": lora, "nan-ddp": partial(nan, parallel="ddp"),
             "nan-fsdp2": partial(nan, parallel="fsdp2"), "export": export_runs,
             "optim-ddp": optim_runs}

if __name__ == "__main__":
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    for scenario in sys.argv[1].split(","):  # several in one launch: one start-up paid
        res = SCENARIOS[scenario](out)
        if distributed.Dist(rank=int(os.environ.get("RANK", "0"))).main:
            (out / f"result-{scenario}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()
    # Every result is written. Under load, 2 of about 8 full-suite runs saw rank 1 abort after this
    # point ("terminate called without an active exception", a C++ thread torn down at interpreter
    # exit; not reproduced in direct launches): end without the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
