"""Fitting a large model (issue 22): one DPO step of a Llama-3-8B-shaped model on one GPU, in the
memory modes of the trainer, each with its peak `max_memory_allocated`, step time and tokens/s, and
beside it `fused-dpo plan`'s predicted peak (issue 23).

    python -m bench.fit --mode qlora                one mode, one process (what gpu_check.sh runs)
    python -m bench.fit --mode longest              the longest --max-length that fits for mode lora
                                                    with activation offloading and --padding-free
    python -m bench.fit --shape tiny --device cpu --mode all    the CPU smoke run of every mode

The modes (one pair per step, --max-length tokens per side, gradient checkpointing on; the
reference is the policy with its adapters off under LoRA, a frozen copy of the initial policy
otherwise):
    qlora       LoRA r16 on an NF4 base (double quantisation, bf16 compute), lm_head in bf16
    lora        LoRA r16 on a bf16 base
    full_8bit   full fine-tuning, bf16 weights, 8-bit AdamW (bitsandbytes)
    full_fp32   full fine-tuning, fp32 weights and AdamW with bf16 autocast (expected not to fit in
                80 GiB: the OOM is reported, and the plan must have predicted it)
    trl_lora, trl_qlora   TRL 1.16's DPOTrainer on the same model and settings (needs trl and
                datasets importable; skipped with a message otherwise)

The model is random-init, built on the device in its storage dtype (no fp32 copy first and no
download); an NF4 base is quantised on the device from those bf16 weights, layer by layer. Each
mode appends one row to OUT/fit.csv as soon as it is measured.
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
import time
from pathlib import Path

import torch

MODES = {
    "qlora": dict(lora_r=16, load_in_4bit=True, dtype="bfloat16", precision="bf16"),
    "lora": dict(lora_r=16, dtype="bfloat16", precision="bf16"),
    "full_8bit": dict(dtype="bfloat16", optim="adamw_8bit", precision="bf16"),
    "full_fp32": dict(dtype="float32", optim="adamw_torch", precision="bf16"),
}
TRL_MODES = {"trl_lora": "lora", "trl_qlora": "qlora"}
FIELDS = ["mode", "shape", "pairs", "max_length", "status", "peak_MiB", "predicted_MiB",
          "predicted/measured", "plan_fits", "step_s", "tokens_per_s", "device", "note"]
MiB = 2**20


def build_model(shape: str, dtype: torch.dtype, device: str, four_bit: bool, seed: int = 0):
    """The named shape's causal LM, random-init on `device` in `dtype`; with `four_bit`, every
    linear layer but the lm_head replaced by a bitsandbytes NF4 Linear4bit quantised on the device."""
    from transformers import AutoModelForCausalLM

    from fused_dpo.train.plan import model_config

    config = model_config(shape)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(old)
    if four_bit:
        _quantize_linears(model, device)
    return model, config


def _quantize_linears(model, device: str) -> None:
    import bitsandbytes as bnb

    from fused_dpo.train import quant

    head = model.get_output_embeddings()
    # by name, so that each bf16 layer is freed as soon as its NF4 one replaces it
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=quant.COMPUTE_DTYPE, compress_statistics=True,
                              quant_type="nf4", device="meta")
        w = child.weight.detach().to("cpu" if device == "cpu" else device)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        if child.bias is not None:
            q.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
        # moving the weight quantises it (on the GPU when the device is one)
        q.weight = q.weight.to(device) if device != "cpu" else q.weight._quantize("cpu")
        setattr(parent, child_name, q)
        del child, w, parent
    quant.for_training(model)


def _pairs(n: int, max_length: int, vocab: int, seed: int = 0):
    """n random pairs whose sequences are max_length tokens each (a quarter of them prompt)."""
    from fused_dpo.train.data import Tokenized

    g = torch.Generator().manual_seed(seed)
    p = max_length // 4
    r = max_length - p
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (p + 2 * r,), generator=g).tolist()
        out.append((ids[:p], ids[p:p + r], ids[p + r:]))
    return Tokenized(out)


def _plan(config, cfg, data, device: str) -> tuple[float | None, str]:
    """`fused-dpo plan`'s predicted peak (MiB) for this step, as the trainer's own plan computes it
    (the batch its data makes), and whether the plan says it fits on this device with slack."""
    from fused_dpo.train.plan import estimate, shape_of

    e = estimate(config, cfg, shape_of(data.pairs, cfg.batch_size), device=device)
    fits = ""
    if device == "cuda":
        fits = "yes" if e.needed <= torch.cuda.get_device_properties(0).total_memory else "no"
    return e.peak / MiB, fits


def run_mode(mode: str, shape: str, max_length: int, steps: int, device: str, extra: dict | None = None,
             pairs: int = 1):
    """One row: the mode's peak, step time and tokens/s (`pairs` pairs a step), or its OOM."""
    from fused_dpo.train.config import DPOConfig
    from fused_dpo.train.trainer import DPOTrainer

    fields = {"gradient_checkpointing": True, **MODES[mode], **(extra or {})}
    dtype = getattr(torch, fields["dtype"])
    row = {"mode": mode, "shape": shape, "pairs": pairs, "max_length": max_length,
           "device": _device_name(device), "note": ",".join(f"{k}={v}" for k, v in (extra or {}).items())}
    cuda = device == "cuda"
    model = trainer = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cfg = DPOConfig(batch_size=pairs, max_length=max_length, warmup_steps=0, max_steps=steps + 1,
                        eval_fraction=0.0, lr_scheduler="constant", learning_rate=1e-5,
                        output_dir="/nonexistent/fit", **fields)
        if fields.get("precision") == "bf16" and device == "cpu":
            cfg.precision = "fp32"  # the CPU smoke run: autocast bf16 on a CPU is slow, not wrong
        from fused_dpo.train.plan import model_config

        data = _pairs(pairs * (steps + 1), max_length, model_config(shape).vocab_size)
        predicted, row["plan_fits"] = _plan(model_config(shape), cfg, data, device)
        row["predicted_MiB"] = _fmt(predicted)
        model, config = build_model(shape, dtype, device, fields.get("load_in_4bit", False))
        _fresh_peak(cuda)  # the step's peak, not the build's (an NF4 base is built in bf16 first)
        trainer = DPOTrainer(model, None, _tokenizer(), data, None, cfg)
        trainer.train_step()  # warm-up: kernels compiled, optimizer state allocated
        _sync(cuda)
        t0 = time.perf_counter()
        for _ in range(steps):
            m = trainer.train_step()
        _sync(cuda)
        secs = (time.perf_counter() - t0) / steps
        row.update(status="ok", step_s=f"{secs:.3f}", tokens_per_s=f"{2 * pairs * max_length / secs:.0f}",
                   peak_MiB=_fmt(torch.cuda.max_memory_allocated() / MiB if cuda else None))
        if m is None or not torch.isfinite(torch.tensor(m["loss"])):
            row["status"] = "nonfinite loss"
    except torch.OutOfMemoryError:
        row.update(status="OOM", peak_MiB=_fmt(torch.cuda.max_memory_allocated() / MiB if cuda else None))
    finally:
        del model, trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if row.get("predicted_MiB") and row.get("peak_MiB") and row["status"] == "ok":
        row["predicted/measured"] = f"{float(row['predicted_MiB']) / float(row['peak_MiB']):.3f}"
    return row


def run_trl(mode: str, shape: str, max_length: int, steps: int, device: str) -> dict:
    """TRL 1.16's DPOTrainer on the same model, data and settings as `mode`'s row."""
    base = TRL_MODES[mode]
    row = {"mode": mode, "shape": shape, "max_length": max_length, "device": _device_name(device)}
    try:
        import datasets
        import trl
        from peft import LoraConfig
    except ImportError as e:
        row.update(status="skipped", note=f"needs trl and datasets ({e.name} missing)")
        return row
    fields = MODES[base]
    cuda = device == "cuda"
    row["pairs"] = 1
    try:
        model, config = build_model(shape, getattr(torch, fields["dtype"]), device,
                                    fields.get("load_in_4bit", False))
    except torch.OutOfMemoryError:
        row.update(status="OOM", note="building the model")
        return row
    pairs = _pairs(steps + 1, max_length, config.vocab_size).pairs
    ds = datasets.Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs],
                                     "chosen_ids": [c for _, c, _ in pairs],
                                     "rejected_ids": [r for _, _, r in pairs]})

    class Pretokenized(trl.DPOTrainer):
        """The pairs are token ids already (the columns TRL's own tokenisation writes)."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    times: list[float] = []

    class Clock(__import__("transformers").TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(cuda)
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            _sync(cuda)
            times[-1] = time.perf_counter() - times[-1]

    args = trl.DPOConfig(output_dir="/tmp/fit-trl", per_device_train_batch_size=1, max_length=max_length,
                         gradient_checkpointing=True, bf16=True, max_steps=steps + 1, learning_rate=1e-5,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=not cuda,
                         lr_scheduler_type="constant", warmup_steps=0)
    try:
        _fresh_peak(cuda)
        t = Pretokenized(model=model, args=args, train_dataset=ds, processing_class=_tokenizer(),
                           peft_config=LoraConfig(r=16, lora_alpha=32), callbacks=[Clock()])
        t.train()
        secs = sum(times[1:]) / max(1, len(times) - 1)
        row.update(status="ok", step_s=f"{secs:.3f}", tokens_per_s=f"{2 * max_length / secs:.0f}",
                   peak_MiB=_fmt(torch.cuda.max_memory_allocated() / MiB if cuda else None))
    except torch.OutOfMemoryError:
        row.update(status="OOM", peak_MiB=_fmt(torch.cuda.max_memory_allocated() / MiB if cuda else None))
    except Exception as e:  # a TRL failure is a row, not the end of the table
        row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return row


def longest(shape: str, steps: int, device: str, lengths: list[int]):
    """Rows of mode lora with activation offloading and padding-free at growing lengths, until one
    does not fit."""
    for n in lengths:
        row = run_mode("lora", shape, n, steps, device,
                       extra={"activation_offloading": True, "padding_free": True})
        row["mode"] = "longest(lora+offload+padding_free)"
        yield row
        if row["status"] != "ok":
            break


def _fresh_peak(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _tokenizer():
    """A tokenizer for its pad and EOS ids only: the pairs are token ids already."""
    from fused_dpo.train.models import train_tokenizer

    return train_tokenizer(["pad and eos"])


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", required=True, choices=[*MODES, *TRL_MODES, "longest", "all"])
    ap.add_argument("--shape", default="llama3-8b",
                    help="a named shape of fused-dpo plan (default llama3-8b)")
    ap.add_argument("--max-length", type=int, default=1024, help="tokens per side (default 1024)")
    ap.add_argument("--lengths", default="4096,8192,16384,24576,32768",
                    help="--mode longest: the lengths tried, in order")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (default 2)")
    ap.add_argument("--pairs", type=int, default=1, help="pairs per step (default 1)")
    ap.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default="gpu_out/fit", help="folder of fit.csv")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.pairs < 1 or args.max_length < 8:
        print("error: --steps and --pairs must be >= 1 and --max-length >= 8", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: needs a CUDA GPU (--device cpu --shape tiny for the smoke run)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()

        def emit(row: dict) -> None:
            w.writerow({k: row.get(k, "") for k in FIELDS})
            f.flush()
            print("  ".join(f"{k}={row[k]}" for k in FIELDS if row.get(k, "") != ""), flush=True)

        if args.mode == "longest":
            lengths = [int(x) for x in args.lengths.split(",")]
            for row in longest(args.shape, args.steps, args.device, lengths):
                emit(row)
            return 0
        for mode in ([*MODES, *TRL_MODES] if args.mode == "all" else [args.mode]):
            if mode in TRL_MODES:
                emit(run_trl(mode, args.shape, args.max_length, args.steps, args.device))
            else:
                extra = {"gradient_checkpointing": False} if args.no_checkpointing else None
                emit(run_mode(mode, args.shape, args.max_length, args.steps, args.device, extra,
                              pairs=args.pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
