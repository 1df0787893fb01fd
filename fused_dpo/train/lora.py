"""LoRA through peft: the policy gets low-rank adapters on some linear layers and trains only those;
the reference is the same model with its adapters switched off, so the base weights exist once.

At initialisation lora_B = 0, so the policy equals the reference and the DPO loss is log 2. A
checkpoint holds the adapters only (and the optimizer state of their parameters); the frozen base
weights are rebuilt from the run's model source on resume and checked against their fingerprint.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch

from .config import ALL_LINEAR


def is_peft_model(model) -> bool:
    return type(model).__module__.startswith("peft.")


def unwrap(model):
    """The transformers model inside peft's wrapper (adapters included), or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def linear_names(model: torch.nn.Module) -> list[str]:
    """The short names (q_proj, c_attn, ...) of the layers LoRA can adapt: linear layers and
    GPT-2's Conv1D."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")})


def target_modules(model: torch.nn.Module, wanted: list[str] | None) -> list[str]:
    """The layer names to adapt: `wanted`, checked against the model, or peft's default for the
    model type (q_proj and v_proj for Llama) when None."""
    have = linear_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if wanted is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if model_type not in DEFAULTS:
            raise ValueError(f"lora_target_modules: peft has no default for model type {model_type!r}; "
                             f"name the layers to adapt (--lora-target-modules), from: {', '.join(have)}")
        return sorted(DEFAULTS[model_type])
    if wanted == [ALL_LINEAR]:
        return wanted
    missing = [t for t in wanted if t not in have]
    if missing:
        raise ValueError(f"lora_target_modules: {type(model).__name__} has no linear layer named "
                         f"{', '.join(missing)}; its linear layers are {', '.join(have)} "
                         f"(or {ALL_LINEAR})")
    return list(wanted)


def apply_lora(model: torch.nn.Module, r: int, alpha: float, targets: list[str] | None, seed: int):
    """`model` wrapped by peft with LoRA adapters (rank r, scale alpha / r) on the `targets` layers,
    every other parameter frozen. The adapters' random initialisation (lora_A) is drawn from
    `seed`, so a run is reproducible; lora_B starts at 0. The adapters are fp32 whatever the
    base's dtype (bf16, fp16, or NF4 under --load-in-4bit), and so are their gradients and AdamW
    moments: peft's autocast_adapter_dtype upcasts the adapters it creates in a half-precision
    base layer's dtype."""
    from .quant import quiet_cpu_kernel_notice

    quiet_cpu_kernel_notice()  # peft imports bitsandbytes when it is installed
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora_r needs peft: pip install 'fused_dpo[lora]'") from None
    names = target_modules(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=names[0] if names == [ALL_LINEAR] else names)
    # torch.manual_seed reseeds every CUDA device: keep all their RNG states, not just the model's
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda), \
            warnings.catch_warnings():
        # peft 0.21 asks transformers 5 for is_gradient_checkpointing, which warns it is renamed.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, config, autocast_adapter_dtype=True)


def summary(peft_model) -> dict:
    """What run.json records of the adapters: rank, alpha, the layers adapted, parameter counts."""
    cfg = peft_model.peft_config["default"]
    # peft expands all-linear into full module paths: their short names, like the other choices.
    targets = cfg.target_modules
    targets = [targets] if isinstance(targets, str) else sorted({t.rsplit(".", 1)[-1] for t in targets})
    return {"r": cfg.r, "alpha": cfg.lora_alpha, "target_modules": targets,
            "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
            "parameters": sum(weights(p) for p in peft_model.parameters())}


def weights(p: torch.Tensor) -> int:
    """The weights a parameter holds: a 4-bit one (bitsandbytes Params4bit) packs two in a byte,
    and its quant_state keeps the unpacked shape."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapters), by name: what a LoRA checkpoint holds."""
    return {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"--resume: the checkpoint's adapters do not fit this model (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}); start again with --overwrite")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


@contextmanager
def adapters_off(peft_model):
    """The base model: adapters disabled and eval mode (no dropout), both restored afterwards."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)
