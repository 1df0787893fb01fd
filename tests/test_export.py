"""output_dir/model/ (issue 21): what from_pretrained (or PeftModel.from_pretrained on the base)
loads from it is the trained policy: the same log-probs (fused_dpo.reference on its logits) and the
same weights, in the dtype they trained in; for full fine-tuning, LoRA adapters and merged LoRA,
in one process and under DDP and FSDP2 on 2 ranks. With the tokenizer and a model card; written
at every save with --save-model; a save that fails or is killed leaves the previous model/, and
its leftover goes at the next start or resume; model/ is part of the run (--overwrite replaces
it, a fresh run refuses it)."""

import copy
import json
import shutil
import types

import pytest
import torch
from dist_worker import ROWS as DIST_ROWS
from dist_worker import WORLD, tied_llama
from safetensors.torch import load_file
from test_distributed import ROOT, finished, torchrun

from fused_dpo.reference import get_logps_reference
from fused_dpo.train import export, lora, sharded
from fused_dpo.train.checkpoint import weights_fingerprint
from fused_dpo.train.cli import main as cli_main
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import collate, pad_id, synthetic_sorting, tokenize
from fused_dpo.train.models import tiny_llama, train_tokenizer
from fused_dpo.train.trainer import DPOTrainer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              # peft 0.21's from_pretrained asks transformers 5 for a renamed attribute
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

ROWS = synthetic_sorting(48, seed=0)
TOK = train_tokenizer(r[k] for r in ROWS for k in ("prompt", "chosen", "rejected"))
SOURCES = {"model": "tiny", "data": "sorting"}


def base():
    return tiny_llama(len(TOK), seed=0, hidden=32)


def trainer(out, model=None, **kw) -> DPOTrainer:
    cfg = DPOConfig(**{"output_dir": str(out), "max_steps": 3, "batch_size": 4, "eval_steps": 3,
                       "save_steps": 3, "learning_rate": 1e-2, "lr_scheduler": "constant",
                       "warmup_steps": 0, **kw})
    return DPOTrainer(model or base(), None, TOK, ROWS[:40], ROWS[40:], cfg, sources=SOURCES)


def batch(tok=TOK, rows=ROWS[:4]) -> dict:
    return collate(tokenize(rows, tok, 64).pairs, pad_id(tok))


@torch.no_grad()
def logps(model, b) -> torch.Tensor:
    """Per-sequence response log-probs of `model` by the eager reference on its logits."""
    model.eval()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return get_logps_reference(logits, b["input_ids"], b["response_mask"])


def card(path) -> str:
    return (path / "README.md").read_text()


def last_eval(out) -> dict:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "eval/loss" in r][-1]


def adapters(peft_model) -> dict:
    return {n: p.detach() for n, p in peft_model.named_parameters() if ".lora_" in n}


def assert_same_state(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def base_in(dtype, tmp_path):
    """base() stored in `dtype` as from_pretrained loads it (`.to` would also cast the rotary
    frequencies, which from_pretrained keeps in fp32)."""
    if dtype == torch.float32:
        return base()
    base().save_pretrained(tmp_path / "init")
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "init", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_fine_tuning_loads_with_from_pretrained(tmp_path, dtype):
    t = trainer(tmp_path / "run", model=base_in(dtype, tmp_path), gradient_checkpointing=True)
    t.train(progress=False)
    path = tmp_path / "run" / "model"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    b = batch()
    want = logps(t.model, b)
    assert torch.equal(logps(loaded, b), want)  # the same weights, the same arithmetic
    assert not torch.equal(logps(base_in(dtype, tmp_path), b), want)  # trained, not the initial
    assert_same_state(loaded.state_dict(), t.model.state_dict())
    name = str(dtype).removeprefix("torch.")
    assert json.loads((path / "config.json").read_text())["dtype"] == name
    assert (path / "generation_config.json").is_file()
    # gradient checkpointing is the trainer's setting, not the model's
    assert not any(getattr(m, "gradient_checkpointing", False) for m in loaded.modules())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "sort 3 1 4 1 5 -> 1 1 3 4 5"
    assert tok(text).input_ids == TOK(text).input_ids
    assert (tok.pad_token, tok.eos_token, tok.chat_template) == (TOK.pad_token, TOK.eos_token,
                                                                 TOK.chat_template)
    text = card(path)
    ev = last_eval(tmp_path / "run")
    assert ev["step"] == 3
    for line in ("- Base model: tiny", "- Data: sorting", "- Loss: sigmoid; beta 0.1",
                 "- Steps: 3 optimizer steps of 4 pairs",
                 f"- Weights: {name} safetensors, the dtype they trained in (--precision fp32",
                 f"- Held-out metrics at step 3: loss {ev['eval/loss']:.4g}, "
                 f"rewards/accuracies {ev['eval/rewards/accuracies']:.4g}"):
        assert line in text, (line, text)
    assert "LoRA" not in text
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_lora_adapters_load_with_peft_on_the_base(tmp_path):
    t = trainer(tmp_path, lora_r=4)
    t.train(progress=False)
    path = tmp_path / "model"
    names = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    loaded = peft.PeftModel.from_pretrained(base(), path)
    b = batch()
    assert torch.equal(logps(loaded, b), logps(t.model, b))
    assert_same_state(adapters(loaded), adapters(t.model))
    text = card(path)  # ours, not peft's template
    assert "- LoRA: rank 4, alpha 8, on q_proj, v_proj; the adapters alone" in text, text
    assert "PeftModel.from_pretrained(base, " in text and "Model Card for Model ID" not in text


def test_merged_lora_loads_with_from_pretrained_and_leaves_the_policy_alone(tmp_path):
    t = trainer(tmp_path, lora_r=4, merge_lora=True)
    t.train(progress=False)
    path = tmp_path / "model"
    assert not (path / "adapter_config.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    # exactly what peft's merge_and_unload makes of the trained policy
    assert_same_state(loaded.state_dict(), copy.deepcopy(t.model).merge_and_unload().state_dict())
    b = batch()
    torch.testing.assert_close(logps(loaded, b), logps(t.model, b))  # W + BA vs W and BA: rounding
    # the live policy is untouched: the same base weights, adapters still on
    assert weights_fingerprint(t.model, skip="lora_") == t.fingerprints["base"]
    assert lora.is_peft_model(t.model) and t.model.active_adapters == ["default"]
    assert "merged into the base weights" in card(path)


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    code, log = finished(torchrun(WORLD, ROOT / "tests" / "dist_worker.py", "export", out, module=False))
    assert code == 0, log
    return out


def test_ddp_and_fsdp2_model_is_the_trained_policy(dist_runs):
    """The weights rank 0 wrote (under FSDP2, gathered from both ranks' shards) are the run's final
    checkpoint, read here by one process: every tensor, the tie of lm_head to the embedding, the
    log-probs."""
    tok = train_tokenizer(r[k] for r in DIST_ROWS for k in ("prompt", "chosen", "rejected"))
    b = batch(tok, DIST_ROWS[:4])
    run = dist_runs / "export-ddp"
    want = tiny_llama(len(tok))
    assert sharded.load_model_state(run, want) == 3
    assert_same_state(transformers.AutoModelForCausalLM.from_pretrained(run / "model").state_dict(),
                      want.state_dict())

    run = dist_runs / "export-full"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(run / "model")
    want = tied_llama(len(tok))
    assert sharded.load_model_state(run, want) == 3
    assert_same_state(loaded.state_dict(), want.state_dict())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    want.save_pretrained(dist_runs / "plain")  # the tied weight once, as for the plain model
    assert set(load_file(run / "model" / "model.safetensors")) == \
        set(load_file(dist_runs / "plain" / "model.safetensors"))
    assert torch.equal(logps(loaded, b), logps(want, b))
    assert "- Steps: 3 optimizer steps of 4 pairs" in card(run / "model")

    # LoRA: the adapters, and the same adapters merged
    run = dist_runs / "export-lora"
    want = lora.apply_lora(tiny_llama(len(tok)), 4, 8.0, None, seed=0)
    assert sharded.load_model_state(run, want) == 3
    loaded = peft.PeftModel.from_pretrained(tiny_llama(len(tok)), run / "model")
    assert_same_state(adapters(loaded), adapters(want))
    assert torch.equal(logps(loaded, b), logps(want, b))
    merged = transformers.AutoModelForCausalLM.from_pretrained(dist_runs / "export-merged" / "model")
    assert_same_state(merged.state_dict(), copy.deepcopy(want).merge_and_unload().state_dict())


def test_save_model_writes_model_at_every_save(tmp_path, monkeypatch):
    """--save-model true: model/ after each checkpoint, holding that checkpoint's weights."""
    real, seen = export.save_model, []

    def spy(t):
        real(t)
        saved = load_file(t.out / "model" / "model.safetensors")
        ckpt = torch.load(t.out / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == t.step
        assert_same_state(saved, ckpt["model"])
        seen.append((t.step, f"- Steps: {t.step} optimizer steps" in card(t.out / "model")))

    monkeypatch.setattr(export, "save_model", spy)
    out = tmp_path / "run"
    assert cli_main(["--data", "zen", "--batch-size", "4", "--no-progress", "--max-steps", "4",
                     "--save-steps", "2", "--save-model", "true", "--output-dir", str(out)]) == 0
    assert seen == [(2, True), (4, True)]
    seen.clear()
    assert cli_main(["--data", "zen", "--batch-size", "4", "--no-progress", "--max-steps", "4",
                     "--save-steps", "2", "--overwrite", "--output-dir", str(out)]) == 0
    assert seen == [(4, True)]  # without it, at the end only


def files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_save_that_fails_or_is_killed_leaves_the_previous_model(tmp_path, monkeypatch, capsys):
    kw = dict(max_steps=4, save_steps=2, save_model=True)
    trainer(tmp_path, **kw).train(progress=False, until_step=2)
    before = files(tmp_path / "model")
    assert "- Steps: 2 optimizer steps" in card(tmp_path / "model")
    real = transformers.PreTrainedModel.save_pretrained

    def half(self, *args, **kwargs):  # the weights are written, then the save goes wrong
        real(self, *args, **kwargs)
        raise OSError("disk went away")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", half)
    # The resume finds the step-4 checkpoint (saved before model/) and saves model/ again.
    with pytest.raises(OSError, match="disk went away"):
        trainer(tmp_path, **kw).train(progress=False, resume=True)
    assert files(tmp_path / "model") == before
    assert not list(tmp_path.glob(".model*"))  # a failed save cleans up after itself
    # A kill cleans up nothing: the half-written folder stays behind.
    monkeypatch.setattr(export, "shutil", types.SimpleNamespace(rmtree=lambda *a, **k: None))
    with pytest.raises(OSError, match="disk went away"):
        trainer(tmp_path, **kw).train(progress=False, resume=True)
    assert files(tmp_path / "model") == before
    (left,) = tmp_path.glob(".model.tmp-*")
    assert (left / "model.safetensors").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    trainer(tmp_path, **kw).train(progress=False, resume=True)
    assert f"removed {left.name}, left by a save that was killed" in capsys.readouterr().out
    assert not list(tmp_path.glob(".model*"))
    assert "- Steps: 4 optimizer steps" in card(tmp_path / "model")


def test_model_folder_is_part_of_the_run(tmp_path):
    """A folder holding only model/ holds a run; --overwrite replaces it, and clears a leftover."""
    trainer(tmp_path / "a", max_steps=1).train(progress=False)
    out = tmp_path / "b"
    out.mkdir()
    shutil.copytree(tmp_path / "a" / "model", out / "model")
    (out / ".model.tmp-1").mkdir()
    (out / ".model.tmp-1" / "model.safetensors").write_bytes(b"half a model")
    with pytest.raises(ValueError, match=r"already holds a run \(model\)"):
        trainer(out, max_steps=2).train(progress=False)
    trainer(out, max_steps=2).train(progress=False, overwrite=True)
    assert "- Steps: 2 optimizer steps" in card(out / "model")
    assert not list(out.glob(".*tmp*"))
