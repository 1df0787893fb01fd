"""`fused-dpo train|check|bench` from a user's side (issue 10, items 9-11): every error is one
`error: ...` line on stderr with exit code 2 and nothing written; data errors name the file and
line; the rough edges of the command line."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_error_line

from fused_dpo.cli import main as top
from fused_dpo.train.cli import build_parser
from fused_dpo.train.cli import main as train

# The models here are tiny: one intra-op thread (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,content,text", [
    ("missing.toml", None, "missing.toml: no such file"),
    ("run.yaml", "beta: [0.1\n", "run.yaml: not valid YAML (line"),
    ("run.json", "beta: 0.1\n", "not valid JSON (line 1"),
    ("bad.toml", 'learning_rate = "1e-3"\n', "learning_rate must be a number, got str '1e-3'"),
    ("bad.toml", "loss_weights = 1\n", "loss_weights must be a list of numbers or none, got int 1"),
    ("bad.toml", "loss_type = 5\n", "loss_type must be a list of strings, got int 5"),
    ("bad.toml", 'disable_dropout = "no"\n', "disable_dropout must be a boolean (true/false)"),
    ("bad.toml", "beta = true\n", "beta must be a number, got bool True"),
    ("bad.toml", "discopop_tau = 0.0\n", "discopop_tau must be a finite number > 0"),
    ("bad.toml", "loss_weights = [nan]\n", "loss_weights must be finite numbers >= 0"),
], ids=["missing", "yaml", "json-syntax", "lr-str", "weights-int", "type-int", "dropout-str",
        "beta-bool", "tau-zero", "weights-nan"])
def test_config_file_errors(tmp_path, capsys, name, content, text):
    if content is not None:
        (tmp_path / name).write_text(content)
    out = tmp_path / "run"
    assert train(["--config", str(tmp_path / name), "--output-dir", str(out)]) == 2
    one_error_line(capsys, text)
    assert not out.exists()


@pytest.mark.parametrize("flags,text", [
    (["--max-grad-norm", "-1"], "max_grad_norm must be a finite number > 0, or none"),
    (["--max-grad-norm", "0"], "max_grad_norm must be a finite number > 0, or none"),
    (["--learning-rate", "-1e-3"], "learning_rate must be > 0, got -0.001"),
    (["--simpo-gamma", "nan"], "simpo_gamma must be a finite number"),
    (["--loss-type", "sigmoid,sft", "--loss-weights", "1,-0.5"], "loss_weights must be finite numbers"),
    (["--beta", "abc"], "argument --beta: expected a number, got 'abc'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--lora-r", "0"], "lora_r must be an integer >= 1 (the adapters' rank), or none"),
    (["--lora-alpha", "16"], "lora_alpha set but lora_r is none (LoRA off): set lora_r"),
    (["--lora-r", "4", "--lora-target-modules", ""], "lora_target_modules must name at least one layer"),
    pytest.param(["--lora-r", "4", "--lora-target-modules", "q_proj,qproj"],
                 "LlamaForCausalLM has no linear layer named qproj; its linear layers are down_proj,",
                 marks=pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                          reason="peft not installed")),
], ids=["clip-neg", "clip-zero", "lr-neg", "gamma-nan", "weights-neg", "beta-word", "unknown",
        "lora-r0", "lora-alpha-alone", "lora-targets-empty", "lora-target-typo"])
def test_flag_errors(tmp_path, capsys, flags, text):
    out = tmp_path / "run"
    assert train(flags + ["--output-dir", str(out)]) == 2
    one_error_line(capsys, text)
    assert not out.exists()


def test_negative_numbers_and_none_parse():
    args = build_parser().parse_args(["--max-grad-norm", "none", "--simpo-gamma=-0.5"])
    assert args.cfg_max_grad_norm is None and args.cfg_simpo_gamma == -0.5
    from fused_dpo.train.flags import join_negative_values

    args = build_parser().parse_args(join_negative_values(["--simpo-gamma", "-1e-3"]))
    assert args.cfg_simpo_gamma == -1e-3


def test_jsonl_errors_name_the_file_and_line(tmp_path, capsys):
    good = json.dumps({"prompt": "sort 2 1 ->", "chosen": " 1 2", "rejected": " 2 1"})
    cases = {
        "[1, 2, 3]": "expected an object with ('prompt', 'chosen', 'rejected'), got list",
        '{"prompt": "a", "chosen": "b"}': "missing field(s) ['rejected']",
        '{"prompt": "a", "chosen": 3, "rejected": "c"}': "field 'chosen' must be a string or a list",
    }
    for bad, text in cases.items():
        data = tmp_path / "pairs.jsonl"
        data.write_text("\n".join([good] * 6 + [bad] + [good] * 3) + "\n")
        assert train(["--data", str(data), "--output-dir", str(tmp_path / "run")]) == 2
        one_error_line(capsys, f"{data}:7: {text}")  # line 7 of the file, not a shuffled row index
    assert not (tmp_path / "run").exists()


def test_preset_applies_the_users_flags_to_both_runs(tmp_path, capsys):
    assert train(["--preset", "margin-explosion", "--beta", "0.5", "--max-steps", "1", "--data", "zen",
                  "--no-progress", "--output-dir", str(tmp_path)]) == 0
    for name in ("margin-explosion", "margin-explosion-fixed"):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["beta"] == 0.5
    assert json.loads((tmp_path / "margin-explosion/config.json").read_text())["batch_size"] == 1
    assert "--preset margin-explosion: your --beta 0.5 replaces the preset's value" in capsys.readouterr().out


def test_check_help_and_no_profiler_noise(capfd):
    with pytest.raises(SystemExit) as e:
        top(["check", "--help"])
    assert e.value.code == 0 and "usage: fused-dpo check" in capfd.readouterr().out
    assert top(["check", "--batch", "2", "--seq-len", "8", "--vocab", "64", "--dtype", "float32"]) == 0
    out, err = capfd.readouterr()
    assert "OK: fused_dpo matches" in out and "USDT" not in out + err
    assert top(["check", "--vocab", "x"]) == 2
    assert capfd.readouterr().err.startswith("error: argument --vocab")


def test_bench_is_found_from_outside_the_checkout(tmp_path):
    if not (Path(__file__).resolve().parents[1] / "bench" / "__main__.py").is_file():
        pytest.skip("not a checkout")
    # -I: no PYTHONPATH, no current directory on sys.path, as for the `fused-dpo` console script.
    code = "import sys; from fused_dpo.cli import main; sys.exit(main(['bench', '--help']))"
    p = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "usage: python -m bench" in p.stdout
