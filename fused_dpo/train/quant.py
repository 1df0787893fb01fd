"""QLoRA's base (`--load-in-4bit`): the linear layers as bitsandbytes NF4 with double quantisation
(Dettmers et al., "QLoRA", 2023), matmuls in bf16, and every other weight (embeddings, norms, the
lm_head) unquantised in the run's `--dtype`. The LoRA adapters on top stay fp32 (`lora.apply_lora`).

The lm_head is kept a plain `torch.nn.Linear` so the hidden path (`hf.LogpsHead`) still scores
through it without logits. peft's `prepare_model_for_kbit_training` is not used: it casts every
unquantised weight to fp32 (which --dtype float32, the default, already gives, and which would undo
--dtype bfloat16) and turns on gradient checkpointing, which is --gradient-checkpointing's call
(non-reentrant here, so the frozen embeddings need no input-grad hook). A checkpoint holds the
adapters only; on resume the base is quantised again (deterministic) and checked by fingerprint.
"""

from __future__ import annotations

import copy
import importlib.util
import logging

import torch

# The matmul dtype of the 4-bit layers whatever --dtype is: NF4 weights carry 4 bits, so an fp32
# dequantised copy would only cost twice the bytes; bf16 is QLoRA's compute dtype.
COMPUTE_DTYPE = torch.bfloat16
DOES = "NF4 4-bit linear layers (bitsandbytes, double quantisation, bf16 compute)"


def require() -> None:
    """A one-line ValueError naming what --load-in-4bit lacks (transformers' bitsandbytes path
    needs accelerate too)."""
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"load_in_4bit needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    quiet_cpu_kernel_notice()


def quiet_cpu_kernel_notice() -> None:
    """Drop the warning bitsandbytes' CPU backend logs when it is first imported (by this module or
    by peft, which imports it whenever it is installed): an optional hub kernel for one-token CPU
    inference (gemv) is not installed. Training does not use that kernel; other messages pass."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _drop_gemv_notice not in log.filters:
        log.addFilter(_drop_gemv_notice)


def _drop_gemv_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def bnb_config(head: str):
    """transformers' BitsAndBytesConfig for QLoRA, leaving the lm_head (module `head`) unquantised."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=COMPUTE_DTYPE, llm_int8_skip_modules=[head])


def head_name(model: torch.nn.Module) -> str:
    """The module name of `model`'s lm_head (get_output_embeddings), e.g. "lm_head"."""
    from .hf import module_name

    name = module_name(model, model.get_output_embeddings())
    if name is None:
        raise ValueError(f"load_in_4bit: {type(model).__name__} has no lm_head module to keep unquantised")
    return name


def head_name_of_config(cfg) -> str:
    """head_name of the model `cfg` describes, from a skeleton on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return head_name(AutoModelForCausalLM.from_config(cfg))


def quantize(model: torch.nn.Module, dtype) -> torch.nn.Module:
    """A model built in memory (tiny, smollm2) with its linear layers in NF4, through the same
    from_pretrained path as a checkpoint on disk, its weights passed as a state dict (no files:
    under torchrun, save_pretrained writes on rank 0 only), the other weights in `dtype` (a torch
    dtype or "auto")."""
    require()
    config = bnb_config(head_name(model))
    out = type(model).from_pretrained(None, config=copy.deepcopy(model.config), state_dict=model.state_dict(),
                                      dtype=dtype, quantization_config=config)
    # what it was built from, not None (peft's save looks for a config.json there)
    out.name_or_path = out.config.name_or_path = model.config.name_or_path
    for_training(out)
    return out


def for_training(model: torch.nn.Module) -> None:
    """Make a freshly loaded 4-bit `model` trainable, in place. Refuses (ValueError) one whose
    lm_head was quantised too: the hidden path reads its weight as a dense matrix.

    bitsandbytes 0.50's CPU backend, on a CPU with AVX512-BF16, repacks a Linear4bit's weight for
    inference at its first forward in eval mode without autograd (the trainer's reference and
    held-out passes), and from then on runs every forward, in training too, through a kernel with
    no backward: no gradient reaches the layers below (torch only warns), and the repacking rounds
    the block scales to bf16. Switched off here, so every forward dequantises the NF4 weight (the
    path with a backward); a CUDA forward never takes that branch."""
    head = model.get_output_embeddings()
    if type(head).__module__.startswith("bitsandbytes."):
        raise ValueError(f"load_in_4bit: the lm_head of {type(model).__name__} was quantised "
                         f"({type(head).__name__}); it must stay a plain torch.nn.Linear")
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
