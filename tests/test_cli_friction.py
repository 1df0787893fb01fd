"""`fused-dpo train` from a user's side, issue 20 (items 5, 6, 12-16, 20): what a flag means, what
a false alarm or a wrong message says instead of the truth, and how a run ends when the disk
fills up or Ctrl-C is pressed. Every CLI error is one `error: ...` line, exit 2, nothing written."""

import errno
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import one_error_line

from fused_dpo import __version__
from fused_dpo.cli import main as top
from fused_dpo.losses import LOSS_TYPES
from fused_dpo.train import models
from fused_dpo.train.cli import build_parser
from fused_dpo.train.cli import main as train
from fused_dpo.train.config import CHOICES, DPOConfig
from fused_dpo.train.data import synthetic_sorting
from fused_dpo.train.health import HealthMonitor
from fused_dpo.train.models import tiny_llama, train_tokenizer
from fused_dpo.train.trainer import DPOTrainer

# The models here are tiny: one intra-op thread (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")

ZEN = ["--data", "zen", "--batch-size", "4", "--no-progress"]  # 16 training pairs: 4 steps an epoch
README = Path(__file__).resolve().parents[1] / "README.md"


def logged_steps(out):
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


# -- item 5: max_steps wins over num_epochs, as in transformers' Trainer and TRL ----------------

def test_max_steps_wins_over_num_epochs(tmp_path, capsys):
    assert train(ZEN + ["--num-epochs", "1", "--max-steps", "1", "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "done: 1 steps" in out and "max_steps wins" in out
    assert train(ZEN + ["--num-epochs", "1", "--output-dir", str(tmp_path / "b")]) == 0
    assert "done: 4 steps" in capsys.readouterr().out  # one epoch of 16 pairs, 4 a step
    assert DPOConfig().total_steps(16, 4) == 300 and DPOConfig(num_epochs=2).total_steps(16, 4) == 8
    help_ = next(a.help for a in build_parser()._actions if a.dest == "cfg_max_steps")
    assert "max_steps wins" in help_


# -- item 6: no accuracy_below_chance for a reference-free loss that starts below chance ---------

@pytest.mark.parametrize("flags", [["--loss-type", "simpo"], ["--loss-type", "sft"],
                                   ["--loss-type", "orpo"],
                                   ["--loss-type", "simpo", "--reference", "none"]],
                         ids=["simpo", "sft", "orpo", "reference-none"])
def test_reference_free_losses_raise_no_false_chance_alarm(tmp_path, flags):
    # The untrained tiny model ranks 32 of the 160 default held-out pairs right (0.2) on the
    # length-normalised log-probs these losses compare; one step later it is still near there.
    out = tmp_path / "run"
    assert train(flags + ["--max-steps", "3", "--eval-steps", "1", "--no-progress",
                          "--output-dir", str(out)]) == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/rewards/accuracies"] < 0.3  # the premise: below chance before training
    assert not any("accuracy_below_chance" in r.get("flags", []) for r in rows)


def test_a_reference_free_run_trained_backwards_is_still_flagged(tmp_path):
    rows = synthetic_sorting(240, seed=0)
    tok = train_tokenizer(r[k] for r in rows for k in ("prompt", "chosen", "rejected"))
    cfg = DPOConfig(output_dir=str(tmp_path), loss_type=["simpo"], max_steps=20, eval_steps=10,
                    batch_size=8, learning_rate=3e-3)
    t = DPOTrainer(tiny_llama(len(tok), seed=0), None, tok, rows[:200], rows[200:], cfg)
    t.scheduler.base_lrs = [-3e-3]  # trains toward the rejected responses
    r = t.train(progress=False)
    assert "accuracy_below_chance" in r["flags"]
    assert "before training" in next(f.message for f in t.monitor.flags
                                     if f.name == "accuracy_below_chance")


def test_the_chance_bar_is_the_step0_accuracy_when_lower():
    m = HealthMonitor(beta=0.1, max_steps=10, expected_step0_loss=None)
    assert m.observe_eval(0, 1.0, correct=32, n=160) == []  # untrained: 0.2
    assert m.observe_eval(1, 1.0, correct=31, n=160) == []  # 0.19: no change to speak of
    assert [f.name for f in m.observe_eval(2, 1.0, correct=5, n=160)] == ["accuracy_below_chance"]
    ties = HealthMonitor(beta=0.1, max_steps=10, expected_step0_loss=None)
    assert ties.observe_eval(0, 0.69, correct=0, n=0) == []  # policy == reference: all ties
    assert [f.name for f in ties.observe_eval(5, 0.8, correct=50, n=160)] == ["accuracy_below_chance"]


# -- item 12: a tokenizer with neither pad nor EOS, refused before the run directory -------------

def test_tokenizer_without_pad_or_eos_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                            monkeypatch):
    def load_model(name, texts, seed, **kwargs):
        tok = train_tokenizer(texts)
        tok.pad_token = tok.eos_token = None
        return tiny_llama(len(tok), seed), tok

    monkeypatch.setattr(models, "load_model", load_model)
    out = tmp_path / "run"
    assert train(ZEN + ["--max-steps", "1", "--output-dir", str(out)]) == 2
    one_error_line(capsys, "has neither a pad token nor an EOS token")
    assert not out.exists()


# -- item 13: a full disk during a save -----------------------------------------------------------

@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                 "file data/0: file write failed"),
], ids=["ENOSPC", "torch-writer"])
def test_disk_full_during_a_save_names_the_file_and_the_last_good_checkpoint(tmp_path, capsys,
                                                                            monkeypatch, error):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"half a checkpoint")
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert train(ZEN + ["--max-steps", "4", "--save-steps", "2", "--output-dir", str(out)]) == 2
    one_error_line(capsys, f"no space left on device writing {out / 'checkpoint.pt'}",
                   "last good checkpoint: step 2")
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # still whole


# -- item 14: Ctrl-C writes the report for what ran and says how to continue ----------------------

def test_ctrl_c_writes_the_report_and_resume_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/default, which `--resume` alone finds
    train_step = DPOTrainer.train_step

    def step_or_ctrl_c(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(DPOTrainer, "train_step", step_or_ctrl_c)
    args = ZEN + ["--max-steps", "10", "--save-steps", "5", "--eval-steps", "5"]
    try:
        rc = train(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command")
    out, err = capsys.readouterr()
    assert rc == 130 and "Traceback" not in err
    assert "interrupted at step 7; last checkpoint step 5; `--resume` continues" in out
    run = tmp_path / "runs/default"
    assert "interrupted at step 7" in (run / "health.md").read_text()
    assert (run / "curves.png").exists() or "matplotlib is not installed" in out
    monkeypatch.setattr(DPOTrainer, "train_step", train_step)
    assert train(["--resume", "--no-progress"]) == 0
    assert "resuming at step 5" in capsys.readouterr().out
    assert logged_steps(run)[-1] == 10
    assert json.loads((run / "run.json").read_text())["resumes"] == [{"step": 5, "changed": {}}]


# -- item 15: no prefix matching -----------------------------------------------------------------

@pytest.mark.parametrize("flags,text", [
    (["--lr", "1e-3"], "unrecognized arguments: --lr 1e-3"),
    (["--max-step", "3"], "unrecognized arguments: --max-step 3; did you mean --max-steps"),
], ids=["lr", "max-step"])
def test_abbreviated_flags_are_refused(tmp_path, capsys, flags, text):
    out = tmp_path / "run"
    assert train(flags + ["--output-dir", str(out)]) == 2
    one_error_line(capsys, text)
    assert not out.exists()


def test_check_takes_no_abbreviations_either(capsys):
    assert top(["check", "--batch", "2", "--seq-len", "8", "--voc", "64", "--dtype", "float32"]) == 2
    one_error_line(capsys, "unrecognized arguments: --voc 64")


# -- item 16: messages that say what is wrong ------------------------------------------------------

def test_model_folder_that_is_empty_or_lacks_a_tokenizer(tmp_path, capsys):
    empty, bare = tmp_path / "empty", tmp_path / "bare"
    empty.mkdir()
    tiny_llama(96).save_pretrained(bare)  # config and weights, no tokenizer files
    capsys.readouterr()
    for folder, text in ((empty, "is an empty directory, not a transformers checkpoint"),
                         (bare, "has no tokenizer files")):
        out = tmp_path / "run"
        assert train(["--model", str(folder), "--output-dir", str(out)]) == 2
        err = one_error_line(capsys, f"--model {folder} {text}")
        assert "sentencepiece" not in err and not out.exists()


def test_missing_jsonl_is_no_such_file(tmp_path, capsys):
    assert train(["--data", str(tmp_path / "pairs.jsonl"), "--output-dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, f"--data {tmp_path / 'pairs.jsonl'}: no such file")


def test_resume_with_another_model_names_the_model_not_the_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(ZEN + ["--max-steps", "2", "--output-dir", str(out)]) == 0
    other = tmp_path / "other"
    tok = train_tokenizer(["a different corpus, so a different vocabulary"] * 4)
    tiny_llama(len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    capsys.readouterr()  # transformers' "Writing model shards" bar
    assert train(["--resume", "--model", str(other), "--output-dir", str(out), "--no-progress"]) == 2
    err = one_error_line(capsys, f"the model differs from the run's: --model {other} here, the run "
                                 f"was trained from --model tiny")
    assert "the data differs" not in err


# -- item 20: friction ---------------------------------------------------------------------------------

def test_help_lists_the_allowed_values():
    helps = {a.dest: a.help for a in build_parser()._actions}
    allowed = {"loss_type": LOSS_TYPES, **{k: CHOICES[k] for k in
                                           ("reference", "precision", "parallel", "lr_scheduler")}}
    for name, values in allowed.items():
        missing = [v for v in values if v not in helps["cfg_" + name]]
        assert not missing, (name, missing)


def test_list_values_lose_their_spaces():
    args = build_parser().parse_args(["--loss-type", "sigmoid, sft", "--loss-weights", "1, 0.2"])
    assert args.cfg_loss_type == ["sigmoid", "sft"] and args.cfg_loss_weights == [1.0, 0.2]


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    seen = []
    real = DPOTrainer.train

    def spy(self, **kwargs):
        seen.append(kwargs["progress"])
        return real(self, **kwargs)

    monkeypatch.setattr(DPOTrainer, "train", spy)
    quick = ["--data", "zen", "--max-steps", "1"]
    assert train(quick + ["--output-dir", str(tmp_path / "a")]) == 0  # captured: not a terminal
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert train(quick + ["--output-dir", str(tmp_path / "b")]) == 0
    assert seen == [False, True]


def test_version(capsys):
    assert top(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"fused-dpo {__version__}")


def test_smollm2_install_hint_is_the_readmes(monkeypatch):
    if not README.is_file():
        pytest.skip("not a checkout")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError) as e:
        models.smollm2()
    commands = re.findall(r"`[^`]+`", str(e.value))
    text = README.read_text()
    assert commands and all(c in text for c in commands), (commands, str(e.value))


def test_a_batch_larger_than_the_data_set_warns(tmp_path, capsys):
    assert train(["--data", "zen", "--batch-size", "32", "--max-steps", "1", "--no-progress",
                  "--output-dir", str(tmp_path)]) == 0
    assert "warning: a step takes 32 pairs (batch_size 32) but the training set has 16" in \
        capsys.readouterr().out
