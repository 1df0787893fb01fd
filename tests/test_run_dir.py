"""A run directory never loses or mixes runs (issue 10, items 5-9, 11, 12).

Each test is one story: a run, then something that goes wrong (a second run in the same place, a
kill, a changed flag, a damaged file), then what the next command must do. Runs are tiny: 64
training pairs, batches of 4, a checkpoint every 2 steps.
"""

import json
import os

import pytest
import torch

from fused_dpo.train import rundir
from fused_dpo.train.checkpoint import KEYS
from fused_dpo.train.cli import main as cli_main
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import synthetic_sorting
from fused_dpo.train.models import tiny_llama, train_tokenizer
from fused_dpo.train.trainer import DPOTrainer

ROWS = synthetic_sorting(80, seed=0)
TOK = train_tokenizer(r[k] for r in ROWS for k in ("prompt", "chosen", "rejected"))


# The models here are tiny: one intra-op thread (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(out, rows=ROWS[:64], model_seed=0, **cfg):
    cfg = DPOConfig(**{"output_dir": str(out), "max_steps": 4, "batch_size": 4, "eval_steps": 2,
                       "save_steps": 2, **cfg})
    return DPOTrainer(tiny_llama(len(TOK), seed=model_seed), None, TOK, rows, ROWS[64:], cfg)


class Killed(BaseException):
    """Stands in for `kill -9`: the loop dies where it is, nothing after it runs."""


def killed_at(t, step):
    """t, set to die when it reaches `step` (before that step's update)."""
    train_step = t.train_step

    def step_or_die():
        if t.step == step:
            raise Killed
        return train_step()

    t.train_step = step_or_die
    return t


def snapshot(out):
    """Every file under the run directory (model/ holds several), by its path in it."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def steps(out):
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


# -- item 5: a second run never destroys the first -------------------------------------------

def test_a_second_run_is_refused_unless_overwrite(tmp_path):
    trainer(tmp_path).train(progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds a run .*--resume continues it, --overwrite"):
        trainer(tmp_path, beta=0.5).train(progress=False)
    assert snapshot(tmp_path) == before  # nothing written: 5 metrics rows, the same checkpoint
    (tmp_path / "notes.txt").write_text("mine")
    r = trainer(tmp_path, beta=0.5).train(progress=False, overwrite=True)
    assert r["steps"] == 4 and json.loads((tmp_path / "config.json").read_text())["beta"] == 0.5
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_make_run_twice_and_resume_through_the_cli(tmp_path, monkeypatch, capsys):
    # `make run` is `fused-dpo train` with no --output-dir: the second run goes to runs/default-2.
    monkeypatch.chdir(tmp_path)
    quick = ["--data", "zen", "--max-steps", "2", "--no-progress"]
    assert cli_main(quick + ["--beta", "0.5"]) == 0
    assert cli_main(quick) == 0
    first, second = tmp_path / "runs/default", tmp_path / "runs/default-2"
    assert steps(first) == steps(second) == [0, 1, 2]
    assert json.loads((first / "config.json").read_text())["beta"] == 0.5
    assert "runs/default holds an earlier run: this one goes to runs/default-2" in capsys.readouterr().out
    # --resume takes the latest default run, with its own config and data (zen, from run.json):
    # only max_steps changes, and that change is recorded.
    assert cli_main(["--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert steps(second) == [0, 1, 2, 3]
    run = json.loads((second / "run.json").read_text())
    assert run["resumes"] == [{"step": 2, "changed": {"max_steps": [2, 3]}}]
    assert json.loads((second / "config.json").read_text())["max_steps"] == 3
    assert "resuming at step 2; changed: max_steps 2 -> 3" in capsys.readouterr().out
    # An explicit --output-dir that holds a run is refused, in one line, nothing written.
    before = snapshot(first)
    assert cli_main(["--output-dir", "runs/default"] + quick) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs/default already holds a run") and err.count("\n") == 1
    assert snapshot(first) == before
    # A damaged checkpoint on --resume: one error line, exit 2, the directory untouched.
    (first / "checkpoint.pt").write_bytes((first / "checkpoint.pt").read_bytes()[:1000])
    before = snapshot(first)
    assert cli_main(["--resume", "--output-dir", "runs/default", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: runs/default/checkpoint.pt is not a readable checkpoint")
    assert err.count("\n") == 1 and snapshot(first) == before


# -- item 6: a new run killed before its first save cannot resume into the old model ----------

def test_restarted_run_killed_before_its_first_save_does_not_resume_the_old_one(tmp_path):
    trainer(tmp_path).train(progress=False)  # a finished run: checkpoint at step 4, seed 0
    with pytest.raises(Killed):
        killed_at(trainer(tmp_path, seed=1), step=1).train(progress=False, overwrite=True)
    assert not (tmp_path / "checkpoint.pt").exists()  # the old model went first
    with pytest.raises(ValueError, match="stopped before its first checkpoint .* --overwrite"):
        trainer(tmp_path, seed=1).train(progress=False, resume=True)


def test_a_checkpoint_from_another_run_is_refused(tmp_path):
    trainer(tmp_path / "a").train(progress=False)
    trainer(tmp_path / "b").train(progress=False, until_step=2)
    (tmp_path / "b/checkpoint.pt").write_bytes((tmp_path / "a/checkpoint.pt").read_bytes())
    with pytest.raises(ValueError, match="belongs to another run"):
        trainer(tmp_path / "b").train(progress=False, resume=True)


# -- item 7: resume with a different config, data or reference is refused, naming them --------

def test_resume_refuses_a_different_config_data_or_reference(tmp_path):
    trainer(tmp_path).train(progress=False, until_step=2)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"in batch_size 4 -> 8, beta 0.1 -> 0.5; only max_steps"):
        trainer(tmp_path, beta=0.5, batch_size=8).train(progress=False, resume=True)
    with pytest.raises(ValueError, match="the data differs from the run's"):
        trainer(tmp_path, rows=ROWS[:60]).train(progress=False, resume=True)
    with pytest.raises(ValueError, match="the reference model differs .* a frozen copy of the initial"):
        trainer(tmp_path, model_seed=1).train(progress=False, resume=True)
    assert snapshot(tmp_path) == before
    # What may change: the length and the logging, eval and save cadence.
    r = trainer(tmp_path, max_steps=6, eval_steps=3).train(progress=False, resume=True)
    assert r["steps"] == 6 and steps(tmp_path) == [0, 1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "run.json").read_text())["resumes"][0]["changed"] == {
        "eval_steps": [2, 3], "max_steps": [4, 6]}


def test_a_checkpoint_from_before_a_new_config_field_resumes(tmp_path):
    """A field added to DPOConfig later (parallel, padding_free) is absent from an older run's
    checkpoint and config.json: it reads as its default, the value that run trained with."""
    trainer(tmp_path).train(progress=False, until_step=2)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("parallel", "padding_free"):
        del ckpt["config"][key]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    assert trainer(tmp_path).train(progress=False, resume=True)["steps"] == 4
    with pytest.raises(ValueError, match=r"in padding_free False -> True; only max_steps"):
        trainer(tmp_path, padding_free=True, max_steps=6).train(progress=False, resume=True)


# -- item 8: a kill in the middle of a write -------------------------------------------------

def test_torn_metrics_tail_and_leftover_temporaries_are_repaired(tmp_path, capsys):
    full = trainer(tmp_path / "full").train(progress=False)
    cut = tmp_path / "cut"
    trainer(cut).train(progress=False, until_step=2)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.69, "rewards/chos')  # killed mid-line
    (cut / ".checkpoint.pt.tmp-999999").write_bytes(b"half a checkpoint")  # killed mid-save
    r = trainer(cut).train(progress=False, resume=True)
    out = capsys.readouterr().out
    assert "metrics.jsonl: dropped a torn last line" in out
    assert "removed .checkpoint.pt.tmp-999999, left by a save that was killed" in out
    assert not list(cut.glob(".*tmp*"))
    drop = {"tokens_per_s", "peak_mem_MiB"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in r["metrics"]] == [
        {k: v for k, v in m.items() if k not in drop} for m in full["metrics"]]


def test_damaged_metrics_log_is_an_error_naming_it(tmp_path):
    trainer(tmp_path).train(progress=False, until_step=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        trainer(tmp_path).train(progress=False, resume=True)
    (tmp_path / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=r"metrics.jsonl is missing"):
        trainer(tmp_path).train(progress=False, resume=True)


# -- item 9: damaged checkpoints and unusable output directories -----------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    trainer(tmp_path).train(progress=False, until_step=2)
    ckpt = tmp_path / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "garbage": b"\x00not a checkpoint" * 100}[damage])
    with pytest.raises(ValueError, match="checkpoint.pt is not a readable checkpoint"):
        trainer(tmp_path).train(progress=False, resume=True)


def test_output_dir_that_is_a_file_empty_or_read_only(tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    cases = {str(f): "is a file, not a directory", str(f / "sub"): f"lies under {f}, which is a file",
             "": "output_dir must not be empty"}
    for out, text in cases.items():
        assert cli_main(["--output-dir", out, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and err.count("\n") == 1, err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes through permissions: ask as if the filesystem were read-only
        monkeypatch.setattr(rundir.os, "access", lambda p, mode: str(p) != str(ro))
    assert cli_main(["--output-dir", str(ro / "run"), "--max-steps", "1"]) == 2
    assert f"{ro} is not writable" in capsys.readouterr().err
    assert list(ro.iterdir()) == [] and f.read_text() == "x"


# -- items 11 and 12: what a checkpoint holds; what the summary lists -------------------------

def test_checkpoint_holds_no_frozen_reference(tmp_path):
    t = trainer(tmp_path)
    t.train(progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == set(KEYS)  # no "ref_model": it is rebuilt from its source on resume
    assert ckpt["fingerprints"]["reference"]
    model_bytes = sum(p.numel() * p.element_size() for p in t.model.state_dict().values())
    # policy + AdamW's two moments = 3x the weights; a stored reference made it 4x
    assert (tmp_path / "checkpoint.pt").stat().st_size < 3.5 * model_bytes


def test_resume_with_precomputed_reference_keeps_no_reference_model(tmp_path):
    trainer(tmp_path, reference="precomputed").train(progress=False, until_step=2)
    t = trainer(tmp_path, reference="precomputed")
    t.train(progress=False, resume=True)
    assert t.ref_model is None and set(t.ref_cache) == {"train", "eval"}


def test_summary_lists_only_the_files_written(tmp_path, capsys):
    from fused_dpo.train.cli import _summary

    t = trainer(tmp_path, max_bad_steps=1)

    def poison(module, args, out):
        out.last_hidden_state.fill_(float("nan"))

    t.model.model.register_forward_hook(poison)
    r = t.train(progress=False)
    assert r["stopped"] and not (tmp_path / "checkpoint.pt").exists()
    _summary(r, tmp_path)
    listing = capsys.readouterr().out.splitlines()[-1]
    assert "checkpoint.pt" not in listing and "metrics.jsonl" in listing
