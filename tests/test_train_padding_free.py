"""padding_free: the [chosen; rejected] batch packed into one row. The packed forward equals the
padded batch per sequence (hidden states, log-probs, counts, statistics; both attention
implementations, both LogpsHead paths); training equals the padded run (full and LoRA); the packed
collate; models that cannot mask packed sequences are refused by name."""

import pytest
import torch

from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import collate, collate_packed, packing, synthetic_sorting, tokenize
from fused_dpo.train.hf import LogpsHead
from fused_dpo.train.models import tiny_llama, train_tokenizer
from fused_dpo.train.token_metrics import STATS
from fused_dpo.train.trainer import DPOTrainer

ROWS = synthetic_sorting(120, seed=0)
TOK = train_tokenizer(r[k] for r in ROWS for k in ("prompt", "chosen", "rejected"))
VOLATILE = {"tokens_per_s", "peak_mem_MiB"}
# Metrics that count or compare: equal exactly, not just to rounding.
EXACT = {"step", "flags", "lr", "epoch", "rewards/accuracies", "eval/rewards/accuracies",
         "tokens_per_response", "mean_token_accuracy", "eval/mean_token_accuracy"}

pytestmark = pytest.mark.usefixtures("one_thread")

# (prompt, chosen, rejected): lengths 1 to 6, a 1-token chosen and a 1-token rejected response.
PAIRS = [([1, 5, 6], [7], [8, 9, 10, 2]), ([1, 11, 12, 13, 14, 15], [16, 17, 2], [18]),
         ([1], [19, 20], [21, 22, 23, 24, 2])]


def per_sequence(padded, attn, packed, cu):
    """Pairs (padded batch row s's real tokens, packed segment s) of a (S, T, ...) and a
    (1, N, ...) tensor."""
    cu = cu.tolist()
    for s in range(len(cu) - 1):
        n = int(attn[s].sum())
        yield padded[s, :n], packed[0, cu[s] : cu[s + 1]]


def test_packed_collate_holds_the_padded_batch_without_pads():
    pad = collate(PAIRS, pad_id=0)
    pk = collate_packed(PAIRS)
    assert collate(PAIRS, pad_id=0, packed=True).keys() == pk.keys()
    lengths = [len(p) + len(x) for p, c, r in PAIRS for x in (c,)] + \
              [len(p) + len(r) for p, c, r in PAIRS]
    assert pk["input_ids"].shape == (1, sum(lengths)) == (1, int(pad["attention_mask"].sum()))
    # the sequence numbers 1..2B, a run per sequence
    want = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lengths)])
    assert torch.equal(pk["attention_mask"][0], want)
    pos, cu = packing(pk["attention_mask"])
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert torch.equal(pos[0], torch.cat([torch.arange(n) for n in lengths]))
    for key in ("input_ids", "response_mask"):
        for a, b in per_sequence(pad[key], pad["attention_mask"], pk[key], cu):
            assert torch.equal(a, b), key
    # the 1-token responses are one response token each
    assert pk["response_mask"][0, cu[1] - 1 : cu[1]].tolist() == [True]  # chosen_0 = [7]
    assert int(pk["response_mask"][0, cu[4] : cu[5]].sum()) == 1  # rejected_1 = [18]


def test_packing_refuses_a_padded_batch():
    with pytest.raises(ValueError, match=r"one row \(1, total_T\).*\(6, 9\)"):
        packing(collate(PAIRS, pad_id=0)["attention_mask"])


class _Head(torch.nn.Linear):
    """An lm_head that is not exactly nn.Linear: LogpsHead falls back to the model's logits."""


def _model(impl, fallback=False):
    m = tiny_llama(len(TOK), seed=0)
    m.set_attn_implementation(impl)
    if fallback:
        head = _Head(m.lm_head.in_features, m.lm_head.out_features, bias=False)
        head.weight = m.lm_head.weight
        m.lm_head = head
    return m.train()


@pytest.mark.parametrize("fallback", [False, True], ids=["hidden", "logits"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_forward_equals_the_padded_batch(impl, fallback):
    model = _model(impl, fallback)
    pairs = tokenize(ROWS[:4], TOK, 64).pairs
    pad, pk = collate(pairs, TOK.pad_token_id), collate_packed(pairs)
    pos, cu = packing(pk["attention_mask"])
    padded_head = LogpsHead(model, "torch", stats=STATS, warn=False)
    packed_head = LogpsHead(model, "torch", stats=STATS, warn=False, packed=True)
    assert packed_head.fused is not fallback
    assert all(m.training for m in model.modules())  # the probe ran in eval mode, and restored it
    with torch.no_grad():
        h_pad = padded_head.forward(pad["input_ids"], pad["attention_mask"])
        h_pk = packed_head.forward(pk["input_ids"], position_ids=pos)
        for a, b in per_sequence(h_pad, pad["attention_mask"], h_pk, cu):
            # fp32, only the summation order differs (other matmul shapes, masked softmax rows)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        out_pad, out_pk = padded_head(pad), packed_head(pk)
    assert out_pk.logps.shape == (2 * len(pairs),)
    assert torch.equal(out_pk.counts, out_pad.counts)
    for name in ("logps", *STATS):
        torch.testing.assert_close(getattr(out_pk, name), getattr(out_pad, name),
                                   rtol=1e-5, atol=1e-5, msg=name)


def _train(tmp_path, **cfg):
    cfg = DPOConfig(**{"output_dir": str(tmp_path), "max_steps": 5, "batch_size": 8,
                       "eval_steps": 2, "save_steps": 100, **cfg})
    t = DPOTrainer(tiny_llama(len(TOK), seed=0), None, TOK, ROWS[:96], ROWS[96:], cfg)
    return t, t.train(progress=False)["metrics"]


def _assert_same_run(padded, packed):
    """Every metric of every row: exact for counts and decisions; within 2e-5 relative (1e-6 absolute
    near 0) for the rest. Both runs are fp32 and see the same tokens; packing changes only the
    shapes of the matmuls and the softmax rows, hence the summation order, so the per-token
    log-probs differ by fp32 rounding (~1e-7 relative). A response's log-prob sums ~10 of them and
    five AdamW steps carry the difference along: 1e-6 to 1e-5 relative at most, measured <= 3e-7
    (an attention leak or a wrong position moves these by 1e-2 or more)."""
    assert len(padded) == len(packed)
    for a, b in zip(padded, packed, strict=True):
        assert a.keys() == b.keys()
        for k in a.keys() - VOLATILE:
            if k in EXACT or not isinstance(a[k], float):
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
            else:
                assert abs(a[k] - b[k]) <= 2e-5 * abs(a[k]) + 1e-6, (a["step"], k, a[k], b[k])


def test_training_padding_free_equals_padded(tmp_path):
    ta, a = _train(tmp_path / "padded")
    tb, b = _train(tmp_path / "packed", padding_free=True)
    _assert_same_run(a, b)
    assert [r["step"] for r in b if "eval/loss" in r] == [0, 2, 4, 5]
    # "tokens" counts the real tokens of a batch: no pads on either side
    idx = list(range(8))
    tokens = sum(len(p) + len(c) + len(p) + len(r) for p, c, r in (ta.train_data.pairs[i] for i in idx))
    for t in (ta, tb):
        _, m, _, _ = t._forward_loss(t.train_data, idx, "train", t.bco)
        assert int(m["tokens"]) == tokens


def test_lora_padding_free_equals_padded(tmp_path):
    _, a = _train(tmp_path / "padded", lora_r=4, max_steps=4)
    _, b = _train(tmp_path / "packed", lora_r=4, max_steps=4, padding_free=True)
    _assert_same_run(a, b)
    losses = [r["loss"] for r in b if "loss" in r]
    assert losses[-1] < losses[0]  # the adapters train


def _refused(kind, impl):
    """Tiny models transformers 5.24 cannot mask packed sequences for: OPT computes its learned
    positions from the attention mask and builds no packed mask (the probe finds the leak); Bloom's
    forward takes no position_ids (refused before the probe)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32),
             "bloom": dict(hidden_size=32, n_layer=2, n_head=4)}[kind]
    cfg = AutoConfig.for_model(kind, vocab_size=len(TOK), pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, **sizes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).train()


@pytest.mark.parametrize("kind,impl,why", [("opt", "eager", "a sequence packed after another"),
                                           ("opt", "sdpa", "a sequence packed after another"),
                                           ("bloom", "eager", "BloomModel.forward takes no position")])
def test_a_model_that_cannot_mask_packed_sequences_is_refused(kind, impl, why, tmp_path):
    model = _refused(kind, impl)
    LogpsHead(model, "torch")  # padded batches: fine
    msg = (rf"padding_free: model_type '{kind}' with attn_implementation '{impl}' cannot mask "
           rf"packed sequences: {why}")
    with pytest.raises(ValueError, match=msg):
        LogpsHead(model, "torch", packed=True)
    assert all(m.training for m in model.modules())
    cfg = DPOConfig(output_dir=str(tmp_path), max_steps=1, padding_free=True)
    with pytest.raises(ValueError, match=msg):
        DPOTrainer(model, None, TOK, ROWS[:16], None, cfg)
    assert not (tmp_path / "run.json").exists()
