"""Local checkpoints (`--model PATH`, issue 20): a bf16 checkpoint trains on fp32 master weights
(policy, reference, gradients and AdamW moments) under --precision fp32 and bf16, and says so; a
checkpoint that is not a causal LM with every weight in the file is refused with the reason.
Tiny models built from configs and saved to temporary folders (no hub)."""

import json

import pytest
import torch

from fused_dpo.train.cli import main as cli_main
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import row_texts, zen_pairs
from fused_dpo.train.models import load_model, tiny_llama, train_tokenizer
from fused_dpo.train.trainer import DPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = zen_pairs()
TOK = train_tokenizer(row_texts(ROWS))
V = len(TOK)
SMALL = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, max_position_embeddings=128)


def save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    return str(path)


def bf16_llama(tmp_path) -> tuple[torch.nn.Module, str]:
    model = tiny_llama(V, seed=0, hidden=32, layers=1).to(torch.bfloat16)
    return model, save(model, tmp_path / "bf16")


def fp32_params(model) -> dict[str, torch.dtype]:
    """The parameters that are not float32 (none expected)."""
    return {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.float32}


# ---- item 1: the master weights' dtype is the precision mode's, not the file's ------------------

def test_bf16_checkpoint_loads_as_fp32_master_weights(tmp_path, capsys):
    saved, path = bf16_llama(tmp_path)
    model, _ = load_model(path, [], 0, precision="bf16")
    assert fp32_params(model) == {}
    want = saved.state_dict()
    for k, v in model.state_dict().items():  # the same numbers, upcast exactly
        assert torch.equal(v, want[k].float()), k
    out = capsys.readouterr().out
    assert (f"model: {path} (LlamaForCausalLM), saved in bfloat16, loaded as float32 master "
            f"weights (--precision bf16: bf16 autocast)") in out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_checkpoint_trains_fp32_policy_reference_and_moments(tmp_path, precision):
    _, path = bf16_llama(tmp_path)
    model, tok = load_model(path, [], 0, precision=precision, say=lambda s: None)
    cfg = DPOConfig(output_dir=str(tmp_path / "run"), precision=precision, max_steps=2, batch_size=4,
                    eval_steps=2, save_steps=2)
    t = DPOTrainer(model, None, tok, ROWS[:8], None, cfg)
    t.train(progress=False)
    assert fp32_params(t.model) == {}
    assert fp32_params(t.ref_model) == {}
    moments = {k: v.dtype for s in t.optimizer.state.values() for k, v in s.items()
               if k in ("exp_avg", "exp_avg_sq") and v.dtype != torch.float32}
    assert t.optimizer.state and moments == {}


def test_cli_prints_what_it_loaded_and_checkpoints_fp32(tmp_path, capsys):
    _, path = bf16_llama(tmp_path)
    out = tmp_path / "run"
    rc = cli_main(["--model", path, "--data", "zen", "--precision", "bf16", "--max-steps", "1",
                   "--eval-steps", "1", "--no-progress", "--output-dir", str(out)])
    assert rc == 0
    assert "saved in bfloat16, loaded as float32 master weights" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {k: v.dtype for k, v in ckpt["model"].items() if v.dtype != torch.float32} == {}
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"


# ---- item 4: only a causal LM with every weight in the checkpoint -------------------------------

def _bert(cls, **kw):
    import transformers

    return getattr(transformers, cls)(transformers.BertConfig(**SMALL, **kw))


def _llama_base(tied: bool):
    import transformers

    return transformers.LlamaModel(transformers.LlamaConfig(**SMALL, num_key_value_heads=1,
                                                            tie_word_embeddings=tied))


def _bart():
    import transformers

    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128))


def _t5():
    import transformers

    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))


def _distilbert():
    import transformers

    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=V, dim=16, hidden_dim=32, n_layers=1, n_heads=2, max_position_embeddings=128))


REFUSED = {
    # name: (build, words the message must hold)
    "bert-mlm-bidirectional": (lambda: _bert("BertForMaskedLM"),
                               ["is not a causal language model", "is_decoder false",
                                "BertLMHeadModel"]),
    "bert-base-headless": (lambda: _bert("BertModel"),
                           ["not in the checkpoint", "cls.predictions", "head"]),
    "llama-base-headless": (lambda: _llama_base(tied=False),
                            ["not in the checkpoint", "lm_head.weight", "head (lm_head)"]),
    "bart-encoder-decoder": (_bart, ["'bart'", "encoder-decoder"]),
    "t5-encoder-decoder": (_t5, ["'t5'", "encoder-decoder"]),
    "distilbert-no-causal-class": (_distilbert, ["'distilbert'", "no causal language model class"]),
}


@pytest.mark.parametrize("name", REFUSED)
def test_non_causal_or_headless_checkpoint_is_refused(tmp_path, name):
    build, words = REFUSED[name]
    path = save(build(), tmp_path / name)
    with pytest.raises(ValueError) as e:
        load_model(path, [], 0, say=lambda s: None)
    msg = str(e.value)
    for w in [path, *words]:
        assert w in msg, (w, msg)


def _gpt2():
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1,
                                                                n_head=2, n_positions=128))


def _gpt_neox():
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=128)
    assert cfg.is_decoder is False  # causal all the same: is_decoder cannot decide it
    return transformers.GPTNeoXForCausalLM(cfg)


ACCEPTED = {
    "llama-base-tied-head": lambda: _llama_base(tied=True),  # the head is the embedding: not missing
    "gpt2": _gpt2,
    "gpt-neox-is-decoder-false": _gpt_neox,
    "bert-lm-head-is-decoder-true": lambda: _bert("BertLMHeadModel", is_decoder=True),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_causal_checkpoint_is_accepted(tmp_path, name):
    path = save(ACCEPTED[name](), tmp_path / name)
    lines = []
    model, _ = load_model(path, [], 0, say=lines.append)
    assert fp32_params(model) == {}
    assert lines == [f"model: {path} ({type(model).__name__}), saved in float32, loaded as float32 "
                     f"master weights"]
