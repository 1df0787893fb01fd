"""LoRA through peft (issue 12): the reference is the policy's own model with its adapters off (one
copy of the base weights), step 0 at log 2, only the adapters train, the checkpoint holds the
adapters and resumes exactly, other LoRA settings or another base model are refused on resume."""

import copy
import json
import math

import pytest
import torch
from test_train import ROWS, TOK, make_trainer, stable

from fused_dpo.train.cli import main as cli_main
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.hf import LogpsHead
from fused_dpo.train.memory import model_state_bytes
from fused_dpo.train.models import tiny_llama

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_reference_is_the_policy_with_adapters_off(tmp_path):
    base = tiny_llama(len(TOK), seed=0)
    untouched = copy.deepcopy(base)
    t = make_trainer(tmp_path, model=base, eval_rows=ROWS[200:216], lora_r=4, max_steps=6,
                     learning_rate=1e-2)
    # Only the adapters train, and the reference holds no second copy of the base weights.
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert t.ref_model is t.model
    held = model_state_bytes([t.model, t.ref_model], t.optimizer)["parameters"]
    assert held == nbytes(untouched.parameters()) + nbytes(t.params)
    full = make_trainer(tmp_path / "full", max_steps=6)
    assert model_state_bytes([full.model, full.ref_model], full.optimizer)["parameters"] == \
        2 * nbytes(untouched.parameters())

    r = t.train(progress=False)
    assert abs(r["metrics"][0]["loss"] - math.log(2)) < 1e-6  # lora_B = 0: policy == reference
    assert r["metrics"][0]["rewards/margins"] == 0.0
    batch = t._batch(t.eval_data, list(range(8)))
    with torch.no_grad():
        ref = t._ref_forward(batch).logps  # the trainer's reference pass: adapters off
        truth = LogpsHead(untouched, "torch")(batch).logps
        policy = t.policy_logps(batch).logps
    assert torch.equal(ref, truth)  # after training, the reference is still the initial model
    assert (policy - truth).abs().max() > 1e-3  # and the policy has moved away from it
    assert t.model.training  # the reference pass put the policy back in training mode
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["reference"] == "the policy with its LoRA adapters disabled"
    assert run["lora"] == {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"],
                           "trainable_parameters": sum(p.numel() for p in t.params),
                           "parameters": sum(p.numel() for p in t.model.parameters())}
    assert run["fingerprints"]["base"] == run["fingerprints"]["reference"]
    state = r["model_state_bytes"]
    assert state["gradients"] == nbytes(t.params)  # gradients of the adapters only
    assert state["optimizer"] == 2 * nbytes(t.params) + 4 * len(t.params)  # AdamW: 2 moments + step


def test_resume_equals_uninterrupted_and_the_checkpoint_holds_the_adapters(tmp_path):
    kw = dict(lora_r=4, lora_alpha=4.0, lora_target_modules=["q_proj", "o_proj"], eval_rows=ROWS[200:212],
              max_steps=8, eval_steps=4, save_steps=4)
    full = make_trainer(tmp_path / "full", **kw).train(progress=False)
    t = make_trainer(tmp_path / "cut", **kw)
    t.train(progress=False, until_step=3)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert list(ckpt["model"]) == names and len(names) == 8  # A and B of 2 layers x 2 blocks
    assert len(ckpt["optimizer"]["state"]) == len(names)
    resumed = make_trainer(tmp_path / "cut", **kw).train(progress=False, resume=True)
    assert stable(resumed["metrics"]) == stable(full["metrics"])


def test_resume_with_other_lora_settings_or_base_is_refused(tmp_path, capsys):
    kw = dict(rows=ROWS[:16], eval_rows=None, max_steps=2, save_steps=2, batch_size=4)
    make_trainer(tmp_path, lora_r=4, **kw).train(progress=False)
    with pytest.raises(ValueError, match=r"lora_r 4 -> 8 \(the checkpoint holds LoRA adapters of that "
                                         r"shape, which cannot continue as other LoRA adapters\)"):
        make_trainer(tmp_path, lora_r=8, **kw).train(progress=False, resume=True)
    t = make_trainer(tmp_path, lora_r=4, lora_target_modules=["q_proj"], **kw)
    with pytest.raises(ValueError, match=r"lora_target_modules None -> \['q_proj'\]"):
        t.train(progress=False, resume=True)
    with pytest.raises(ValueError, match="lora_r 4 -> None .* cannot continue as full fine-tuning"):
        make_trainer(tmp_path, **kw).train(progress=False, resume=True)
    with pytest.raises(ValueError, match="the base model under the LoRA adapters differs"):
        make_trainer(tmp_path, model=tiny_llama(len(TOK), seed=1), lora_r=4,
                     **kw).train(progress=False, resume=True)
    # Through the command line: one error line, nothing changed.
    out = tmp_path / "cli"
    assert cli_main(["--data", "zen", "--max-steps", "1", "--lora-r", "4", "--no-progress",
                     "--output-dir", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert cli_main(["--resume", "--lora-alpha", "32", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the configuration differs") and err.count("\n") == 1, err
    assert "lora_alpha None -> 32.0 (the checkpoint holds LoRA adapters" in err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_gradient_checkpointing_still_trains_the_adapters(tmp_path):
    kw = dict(rows=ROWS[:32], eval_rows=None, batch_size=4, max_steps=3, lora_r=4, learning_rate=1e-2)
    plain = make_trainer(tmp_path / "a", **kw)
    checkpointed = make_trainer(tmp_path / "b", gradient_checkpointing=True, **kw)
    a = [plain.train_step()["loss"] for _ in range(3)]
    b = [checkpointed.train_step()["loss"] for _ in range(3)]
    assert a[0] == pytest.approx(math.log(2)) and a[-1] < a[0]
    assert b == pytest.approx(a, abs=1e-6)


@pytest.mark.parametrize("kw,text", [
    (dict(lora_r=0), "lora_r must be an integer >= 1"),
    (dict(lora_alpha=16.0), "lora_alpha set but lora_r is none"),
    (dict(lora_target_modules=["q_proj"]), "lora_target_modules set but lora_r is none"),
    (dict(lora_r=4, lora_alpha=float("inf")), "lora_alpha must be a finite number > 0"),
    (dict(lora_r=4, lora_target_modules=[]), "lora_target_modules must name at least one layer"),
    (dict(lora_r=4, lora_target_modules=["all-linear", "q_proj"]), "all-linear stands alone"),
], ids=["r0", "alpha-alone", "targets-alone", "alpha-inf", "targets-empty", "all-linear-mixed"])
def test_lora_config_errors(kw, text):
    with pytest.raises(ValueError, match=text):
        DPOConfig(**kw)


def test_lora_model_errors(tmp_path):
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no linear layer named nope; its linear "
                                         r"layers are down_proj, gate_proj, k_proj, lm_head, o_proj"):
        make_trainer(tmp_path, lora_r=4, lora_target_modules=["q_proj", "nope"])
    t = make_trainer(tmp_path, lora_r=2, lora_target_modules=["all-linear"])
    assert sorted(t.adapters["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                    "q_proj", "up_proj", "v_proj"]
    with pytest.raises(ValueError, match="the model is a peft PeftModelForCausalLM: pass the plain"):
        make_trainer(tmp_path, model=t.model)
