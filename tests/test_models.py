"""The trainer's LogpsHead across transformers architectures (issue 12): tiny configs built offline
of Llama, Qwen2 (tied), Gemma 2 (soft-capped logits), Mistral, GPT-2 (tied), Cohere (logit_scale)
and Granite (logits_scaling). For each: the hidden path's log-probs equal fused_dpo.get_logps on the
model's own logits (float64 truth, Cut-CE's rule), and a 3-step DPO run starts at log 2 and stays
finite. A head the hidden path cannot take falls back to the logits with one warning."""

import copy
import math
import warnings

import pytest
import torch
from helpers import assert_close_to_truth
from test_train import ROWS, TOK, make_trainer

from fused_dpo import get_logps
from fused_dpo.train.data import collate, tokenize
from fused_dpo.train.hf import LogpsHead

pytestmark = pytest.mark.usefixtures("one_thread")

V = 271  # odd, above the tokenizer's 262 tokens: the rows past those are never labels
# initializer_range 0.5 (not 0.02): logits of a few units, so that a soft-cap or a scale the hidden
# path missed would show far above the tolerance.
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    # name: (config class, model class, config arguments)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM",
                       dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=5.0,
                            sliding_window=16, attn_implementation="eager")),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "gpt2-tied": ("GPT2Config", "GPT2LMHeadModel", None),
    "cohere-scale": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "granite-scaling": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.25)),
    # HyperCLOVA X multiplies by logits_scaling where Granite divides (TRL 1.16's reading too)
    "hyperclovax-scaling": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=4.0)),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, kw = MODELS[name]
    if kw is None:  # GPT-2 names its sizes its own way
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      initializer_range=0.5, bos_token_id=1, eos_token_id=2)
    else:
        cfg = getattr(transformers, config_cls)(**COMMON, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, model_cls)(cfg).eval()


def batch():
    return collate(tokenize(ROWS[:3], TOK, 64).pairs, TOK.pad_token_id)


def logits_logps(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return get_logps(logits, b["input_ids"], b["response_mask"], impl="reference")


@torch.no_grad()
def compare(name: str, model=None) -> tuple[LogpsHead, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head, its log-probs, the float32 logits path's, float64 truth) on one [chosen; rejected] batch."""
    model = model or build(name)
    b = batch()
    head = LogpsHead(model, "torch")
    return (head, head(b).logps, logits_logps(model, b),
            logits_logps(copy.deepcopy(model).double(), b))


@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_path_equals_the_models_logits(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: every one of these takes the hidden path
        head, ours, eager, truth = compare(name)
    assert head.fused
    assert_close_to_truth(ours, eager, truth, 1e-4, name)
    assert truth.abs().min() > 1.0  # log-probs of a few nats, not a degenerate 0 == 0
    cfg = head.model.config
    if getattr(cfg, "tie_word_embeddings", False):
        assert head.head.weight is head.model.get_input_embeddings().weight
    if head.softcap is not None or head.temperature != 1.0:
        # What the model does to its logits matters here: dropping it is far outside the tolerance.
        b = batch()
        with torch.no_grad():
            hidden = head.base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            raw = get_logps(hidden @ head.head.weight.T, b["input_ids"], b["response_mask"])
        assert (raw - truth.float()).abs().max() > 0.5


@pytest.mark.parametrize("name", list(MODELS))
def test_three_dpo_steps_start_at_log2(tmp_path, name):
    t = make_trainer(tmp_path, rows=ROWS[:24], eval_rows=None, model=build(name), batch_size=4,
                     max_steps=3, learning_rate=1e-2)
    assert t.policy_logps.fused
    losses = [t.train_step()["loss"] for _ in range(3)]
    assert abs(losses[0] - math.log(2)) < 1e-6
    assert all(math.isfinite(x) for x in losses) and losses[-1] != losses[0]


class Halved(torch.nn.Module):
    """A custom head: the hidden path cannot know what it does to the logits."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x) * 0.5


def test_custom_head_falls_back_to_logits_with_one_warning(tmp_path):
    model = build("gemma2-softcap")  # soft-capped: the fallback must not cap the model's logits twice
    model.lm_head = Halved(model.lm_head)
    with pytest.warns(UserWarning) as record:
        head, ours, eager, truth = compare("gemma2-softcap", model)
        head(batch())
    assert len(record) == 1, [str(w.message) for w in record]
    assert "not a plain torch.nn.Linear" in str(record[0].message) and "Halved" in str(record[0].message)
    assert not head.fused
    assert_close_to_truth(ours, eager, truth, 1e-4, "fallback")
    # One warning for the trainer too, though its reference (a copy) has the same head.
    with pytest.warns(UserWarning) as record:
        t = make_trainer(tmp_path, rows=ROWS[:8], eval_rows=None, model=model, batch_size=4, max_steps=1)
        loss = t.train_step()["loss"]
    assert len(record) == 1 and abs(loss - math.log(2)) < 1e-6


def test_non_numeric_logit_scale_falls_back():
    model = build("llama")
    model.config.logit_scale = "inv_sqrt_d_model"  # MPT-style string: not a factor the path can take
    with pytest.warns(UserWarning, match=r"logit scale \(logit_scale='inv_sqrt_d_model'\) is not a positive"):
        head = LogpsHead(model, "torch")
    assert not head.fused


def test_multimodal_text_config_scale_and_softcap():
    """Muse Glimmer keeps its scale (output_multiplier) and softcap on the text config and
    applies softcap(s * x): the hidden path takes it as softcap c/s at temperature 1/s."""
    import transformers

    if not hasattr(transformers, "MuseGlimmerConfig"):
        pytest.skip("transformers has no MuseGlimmer")
    tc = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
              initializer_range=0.5)
    # Every part tiny, not only the text model: the default vision tower (50 layers of width 1536)
    # and projector are ~1.9e9 parameters, 22 GB of RSS once compare() makes its float64 copy.
    vc = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              patch_size=2, pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16, merge_size=2)
    cfg = transformers.MuseGlimmerConfig(text_config=tc, vision_config=vc, out_hidden_size=16 * 2**2,
                                         projector_hidden_size=32)
    assert cfg.text_config.final_logit_softcapping and cfg.text_config.output_multiplier != 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.MuseGlimmerForConditionalGeneration(cfg).eval()
    # A sub-config left at its default size (one a later transformers adds, say) fails here.
    assert sum(p.numel() for p in model.parameters()) < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head, ours, eager, truth = compare("muse", model)
    assert head.fused and head.softcap is not None and head.temperature != 1.0
    assert_close_to_truth(ours, eager, truth, 1e-4, "muse")
