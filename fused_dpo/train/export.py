"""output_dir/model/: the trained policy as transformers (or peft) saves it, for from_pretrained.

    full fine-tuning   model.safetensors, config.json, generation_config.json, the tokenizer
    LoRA               adapter_model.safetensors and adapter_config.json (PeftModel.from_pretrained
                       on the base model), the tokenizer; with merge_lora the base weights with the
                       adapters merged into them instead, saved as for full fine-tuning
    always             README.md, a short model card: base model, data, loss, steps, held-out metrics

The weights are the policy's own, in the dtype they trained in (fp32 master weights unless
--dtype says otherwise); under FSDP2 the shards are gathered into rank 0's CPU memory, which
alone writes (under DDP too). checkpoint.pt is for resuming; this folder is for using the model.

The folder is written as .model.tmp-PID beside model/ and renamed into place once whole (every
file fsynced): a save that fails or is killed leaves the previous model/ as it was. A kill in the
instant between the two renames of the swap leaves no model/, both whole folders as leftovers
and the checkpoint; the next start, resume (`rundir.temporaries`) or save removes leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from . import distributed, lora, rundir
from .checkpoint import fsync_path, tmp_path
from .hf import progress_bars
from .models import COMPUTE


def save_model(trainer) -> None:
    """Write output_dir/model/ for the trainer's current weights (every rank calls it)."""
    d, cfg = trainer.dist, trainer.config
    merge = trainer.lora and cfg.merge_lora
    adapters_only = trainer.lora and not merge
    state = _state(trainer, adapters_only)  # a collective under FSDP2: every rank takes part
    if d.main:
        if merge:
            state = merged_state(trainer.model, state)
        _write(trainer, state, adapters_only)
    d.barrier()


def _state(trainer, adapters_only: bool) -> dict[str, torch.Tensor]:
    """The policy's tensors by their names in trainer.model (peft's names under LoRA): only the
    adapters when `adapters_only`. Under FSDP2 gathered whole on rank 0's CPU ({} on the others)."""
    model = trainer.model
    if trainer.dist.parallel != "fsdp2":
        return lora.adapter_state(model) if adapters_only else model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed.reshard(trainer.policy_module)  # the root may still be gathered from an evaluation
    state = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapters_only))
    # A tied weight (lm_head = embedding) comes back as two copies: one tensor again, so that
    # save_pretrained writes it once, as it does for the plain model.
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for first, *others in tied.values():
        for name in others:
            if first in state:
                state[name] = state[first]
    return state


def merged_state(peft_model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers state dict of `peft_model` (whose tensors `state` holds, by peft's names)
    with its LoRA adapters merged into the layers they adapt: W + scaling * (B @ A), transposed for
    a fan_in_fan_out layer (GPT-2's Conv1D). What peft's merge_and_unload computes, without
    touching the live model (training may go on after a --save-model save); the sum is taken in
    fp32 and rounded once to W's dtype."""
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    prefix = "base_model.model."  # peft's prefix to the transformers model's names
    out = {name.removeprefix(prefix).replace(".base_layer.", "."): t for name, t in state.items()
           if ".lora_" not in name}
    for name, m in peft_model.get_base_model().named_modules():
        if not isinstance(m, LoraLayer) or adapter not in m.lora_A:
            continue
        w = out[f"{name}.weight"]
        if not w.is_floating_point():
            raise ValueError(f"merge_lora: {name}.weight is stored as {w.dtype} (a quantized base "
                             f"model); its adapters cannot be merged into it")
        a, b = (state[f"{prefix}{name}.lora_{x}.{adapter}.weight"].float() for x in "AB")
        delta = (b @ a) * m.scaling[adapter]
        out[f"{name}.weight"] = (w.float() + (delta.T if m.fan_in_fan_out else delta)).to(w.dtype)
    return out


def _write(trainer, state: dict[str, torch.Tensor], adapters_only: bool) -> None:
    """Rank 0: save_pretrained of `state` and the tokenizer, and the model card, into a temporary
    folder, then swapped in for model/."""
    out = trainer.out
    final = out / rundir.MODEL
    for p in rundir.temporaries(out):  # what a killed save of the model left
        if p.name.startswith(f".{rundir.MODEL}.tmp-"):
            rundir.remove(p)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    tmp = tmp_path(final)
    try:
        tmp.mkdir()
        # peft's save_pretrained keeps the adapters of `state`; transformers' writes it whole (and
        # empties it as it goes)
        model = trainer.model if adapters_only else lora.unwrap(trainer.model)
        # save_embedding_layers: this trainer never resizes the embeddings, and peft's "auto" asks
        # the hub whether the base model's vocabulary changed (a warning offline, every save)
        extra = {"save_embedding_layers": False} if adapters_only else {}
        # the bars' rule of the CLI: drawn on a terminal only (in a log file they are noise)
        with progress_bars(sys.stdout.isatty() and sys.stderr.isatty()):
            model.save_pretrained(tmp, state_dict=state, **extra)
        if hasattr(trainer.tokenizer, "save_pretrained"):  # from Python, any object with the ids
            trainer.tokenizer.save_pretrained(tmp)
        else:
            print(f"model/: the tokenizer ({type(trainer.tokenizer).__name__}) has no save_pretrained "
                  f"and is not saved beside the weights")
        # peft writes a README.md template of its own: the card replaces it
        (tmp / "README.md").write_text(model_card(trainer, final, adapters_only, dtypes))
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        old = tmp.with_name(tmp.name + "-old")  # a leftover to `temporaries` too
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def model_card(trainer, path: Path, adapters_only: bool, dtypes: list[str]) -> str:
    """README.md of model/: what was trained from what, for how long, how well, and how to load it;
    plain text (no hub calls)."""
    cfg, sources = trainer.config, trainer.sources
    base = sources.get("model")
    losses = ", ".join(cfg.loss_type)
    if cfg.loss_weights is not None:
        losses += " (weights " + ", ".join(f"{w:g}" for w in cfg.loss_weights) + ")"
    lines = [f"- Base model: {base or 'not recorded'}", f"- Data: {sources.get('data', 'not recorded')}",
             f"- Loss: {losses}; beta {cfg.beta:g}",
             f"- Steps: {trainer.step} optimizer steps of {trainer.global_batch_size} pairs"]
    if trainer.lora:
        a = trainer.adapters
        kind = "the adapters alone, to load onto the base model" if adapters_only else \
            "merged into the base weights"
        lines.append(f"- LoRA: rank {a['r']}, alpha {a['alpha']:g}, on {', '.join(a['target_modules'])}; "
                     f"{kind}")
    lines.append(f"- Weights: {', '.join(dtypes)} safetensors, the dtype they trained in "
                 f"(--precision {cfg.precision}: {COMPUTE[cfg.precision]})")
    if adapters_only:
        how = (f"linear layers in NF4 (bitsandbytes, double quantisation, bf16 compute), the rest in "
               f"--dtype {cfg.dtype}" if cfg.load_in_4bit else f"--dtype {cfg.dtype}")
        lines.append(f"- Base loaded as: {how}; the adapters trained on that base")
    ev = _last_eval(trainer.out / rundir.METRICS)
    if ev:
        lines.append(f"- Held-out metrics at step {ev['step']}: " + ", ".join(
            f"{k.removeprefix('eval/')} {v:.4g}" for k, v in ev.items() if k.startswith("eval/")))
    here = repr(str(path))
    load = "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
    if adapters_only:
        # tiny and smollm2 are fused_dpo's own names (models.load_model), not from_pretrained's
        named = base not in (None, "tiny", "smollm2")
        arg, note = (repr(base), "") if named else ("BASE_MODEL", f"  # {base or 'the base model'}")
        kwargs = ""
        if cfg.load_in_4bit:
            from .quant import head_name

            head = head_name(trainer.model.get_base_model())
            load = ("import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer, "
                    "BitsAndBytesConfig\n\n"
                    "nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                    "bnb_4bit_use_double_quant=True,\n                         "
                    f"bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=[{head!r}])\n")
            kwargs = ", quantization_config=nf4"
        kwargs += f", dtype={cfg.dtype!r}"  # transformers 5's default is the file's dtype (auto)
        load = (f"from peft import PeftModel\n{load}"
                f"base = AutoModelForCausalLM.from_pretrained({arg}{kwargs}){note}\n"
                f"model = PeftModel.from_pretrained(base, {here})\n")
    else:
        load += f"model = AutoModelForCausalLM.from_pretrained({here})\n"
    load += f"tokenizer = AutoTokenizer.from_pretrained({here})\n"
    title = f"DPO fine-tuning of {base}" if base else "A DPO fine-tuned model"
    return (f"---\nlibrary_name: {'peft' if adapters_only else 'transformers'}\ntags:\n- dpo\n"
            f"- fused_dpo\n---\n\n# {title}\n\nTrained with fused_dpo's DPO trainer; the run's "
            f"metrics.jsonl and health.md are in {path.parent}.\n\n" + "\n".join(lines)
            + f"\n\n## Loading\n\n```python\n{load}```\n")


def _last_eval(path: Path) -> dict | None:
    """The last held-out evaluation row of the metrics log, if any."""
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    evals = [r for r in rows if "eval/loss" in r]
    return evals[-1] if evals else None
