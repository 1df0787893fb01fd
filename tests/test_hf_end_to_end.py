"""Issue 21's "done when", as a new user takes the path: the installed `fused-dpo` console script in
a subprocess, offline (HF_HOME a fresh cache holding one tiny model in the hub layout,
HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1), `--model` a hub id, `--data` a parquet file or a
save_to_disk Dataset, `--report-to tensorboard`. Then output_dir/model/ loaded with transformers'
from_pretrained (peft's PeftModel for LoRA) gives exactly the log-probs of the trained weights
that checkpoint.pt holds, and tensorboard's reader finds the loss of metrics.jsonl. Once more
from a config file written as TRL documents `trl dpo --config dpo.yaml`, with LoRA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_error_line, put_snapshot

from fused_dpo.reference import get_logps_reference
from fused_dpo.train.cli import main as train
from fused_dpo.train.data import FIELDS, collate, pad_id, synthetic_sorting, tokenize
from fused_dpo.train.lora import apply_lora, load_adapter_state
from fused_dpo.train.models import tiny_llama, train_tokenizer

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              # peft 0.21's from_pretrained asks transformers 5 for a renamed attribute
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

CLI = Path(sys.executable).with_name("fused-dpo")  # the console script the package installs
REPO, COMMIT = "org/tiny-dpo", "c" * 40
ROWS = synthetic_sorting(20, seed=0)
SMALL = ["--max-steps", "2", "--max-length", "32", "--batch-size", "2", "--no-progress"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user's working directory, with an HF_HOME whose hub cache holds REPO (a tiny Llama and
    its tokenizer, as a download leaves them); (that directory, the snapshot). This process is
    offline on that cache too, for loading the results as the user would (huggingface_hub reads
    the variables when imported: its constants are patched)."""
    from huggingface_hub import constants

    tok = train_tokenizer(r[k] for r in ROWS for k in FIELDS)
    hub = tmp_path / "hf" / "hub"
    snap = put_snapshot(hub, REPO, COMMIT, tiny_llama(len(tok), seed=0, hidden=32), tok, "main")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return tmp_path, snap


def fused_dpo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`fused-dpo ARGS` in `cwd`, offline, with cwd/hf as the only HF cache."""
    assert CLI.is_file(), f"{CLI}: the console script is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items()  # a cache variable of the caller's would win
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(cwd / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # a clean run says what it did on stdout; no bars on a pipe, no library warnings
    assert "Writing model shards" not in r.stderr and "Could not find a config" not in r.stderr, r.stderr
    return r


def write_data(cwd: Path, kind: str) -> str:
    """ROWS as the user has them: a parquet file (explicit prompts), or a Dataset saved with
    save_to_disk whose rows are whole sequences (the prompt implicit, shared by both)."""
    if kind == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(cwd / "pairs.parquet")
        return "pairs.parquet"
    whole = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in ROWS]
    datasets.Dataset.from_list(whole).save_to_disk(cwd / "pairs")
    return "pairs"


@torch.no_grad()
def logps(model, tok) -> torch.Tensor:
    """Per-sequence response log-probs of a batch by the eager reference on the model's logits."""
    b = collate(tokenize(ROWS[:4], tok, 32).pairs, pad_id(tok))
    model.eval()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return get_logps_reference(logits, b["input_ids"], b["response_mask"])


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def assert_tensorboard_holds_the_loss(out: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(loss) == [0, 1]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert got == {s: torch.tensor(v, dtype=torch.float32).item() for s, v in loss.items()}  # float32
    assert "eval/loss" in acc.Tags()["scalars"]


COMMAND = f"train --model {REPO} --data pairs.parquet --report-to tensorboard"  # as in the README


@pytest.mark.parametrize("data", ["parquet", "saved"])
def test_hub_id_and_data_in_tensorboard_and_a_from_pretrained_model_out(user, data):
    cwd, snap = user
    source = write_data(cwd, data)
    r = fused_dpo(cwd, *COMMAND.replace("pairs.parquet", source).split(), "--output-dir", "runs/hub",
                  *SMALL)
    assert f"model: {REPO} (LlamaForCausalLM)" in r.stdout and f"data {source}: 16 train / 4 held-out" \
        in r.stdout, r.stdout
    out = cwd / "runs" / "hub"
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    trained = transformers.AutoModelForCausalLM.from_pretrained(snap)  # the architecture, then
    trained.load_state_dict(checkpoint(out)["model"])  # the weights the run trained
    want = logps(trained, tok)
    assert torch.equal(logps(model, tok), want)
    assert not torch.equal(logps(transformers.AutoModelForCausalLM.from_pretrained(snap), tok), want)
    base_tok = transformers.AutoTokenizer.from_pretrained(snap)
    assert tok("sort 3 1 4 -> 1 3 4").input_ids == base_tok("sort 3 1 4 -> 1 3 4").input_ids
    assert_tensorboard_holds_the_loss(out)


TRL_YAML = f"""\
# dpo.yaml, as for `trl dpo --config dpo.yaml`
model_name_or_path: {REPO}
dataset_name: pairs.parquet
report_to: tensorboard
use_peft: true
lora_r: 4
per_device_train_batch_size: 2
max_length: 32
max_steps: 2
output_dir: runs/trl
"""


def test_trl_yaml_config_with_lora_gives_a_peft_model(user):
    peft = pytest.importorskip("peft")
    cwd, snap = user
    write_data(cwd, "parquet")
    (cwd / "dpo.yaml").write_text(TRL_YAML)
    r = fused_dpo(cwd, "train", "--config", "dpo.yaml", "--no-progress")
    assert "LoRA r=4 alpha=32 on q_proj, v_proj" in r.stdout, r.stdout  # TRL's lora_alpha default
    out = cwd / "runs" / "trl"
    # as a user loads it: the base by its hub id (from the cache), the adapters from model/
    base = transformers.AutoModelForCausalLM.from_pretrained(REPO)
    model = peft.PeftModel.from_pretrained(base, out / "model")
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    s = checkpoint(out)
    cfg = s["config"]
    trained = apply_lora(transformers.AutoModelForCausalLM.from_pretrained(snap), cfg["lora_r"],
                         cfg["lora_alpha"], cfg["lora_target_modules"], cfg["seed"])
    load_adapter_state(trained, s["model"])  # as --resume restores the adapters
    want = logps(trained, tok)
    assert torch.equal(logps(model, tok), want)
    with model.disable_adapter():
        assert not torch.equal(logps(model, tok), want)  # the adapters trained
    assert_tensorboard_holds_the_loss(out)


@pytest.mark.parametrize("flags,text", [
    (["--model", "org/tiny-dpp"], ["--model org/tiny-dpp: no such local directory, and not in the local "
                                   "HF cache", "did you mean org/tiny-dpo (in the cache)?"]),
    (["--data", "pairs"], ["pairs: no 'rejected' column (its columns: prompt, chosen)"]),
    (["--data", "dd", "--eval-split", "validation"],
     ["--eval-split validation: --data dd has no split 'validation'; its splits are ['train', 'test']"]),
], ids=["hub-id-typo", "no-rejected", "no-such-eval-split"])
def test_common_mistakes_are_one_line_naming_them(user, monkeypatch, capsys, flags, text):
    cwd, _ = user
    monkeypatch.chdir(cwd)
    datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen")} for r in ROWS]).save_to_disk("pairs")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:16]),
                          "test": datasets.Dataset.from_list(ROWS[16:])}).save_to_disk("dd")
    capsys.readouterr()
    args = {"--model": REPO, "--data": "dd", **dict(zip(flags[::2], flags[1::2], strict=True))}
    assert train([x for kv in args.items() for x in kv] + SMALL + ["--output-dir", "runs/x"]) == 2
    one_error_line(capsys, *text)
    assert not (cwd / "runs").exists()


def test_the_readme_shows_these_commands():
    if not README.is_file():
        pytest.skip("not a checkout")
    text = README.read_text()
    assert f"fused-dpo {COMMAND}" in text
    assert "\n".join(TRL_YAML.splitlines()[1:]) in text  # the config, without its comment
    assert " ".join(SMALL[:-1]) in text
