"""`fused-dpo train --config dpo.yaml` with a config written for TRL's `trl dpo --config` (issue 21):
YAML, TRL's key names and meanings mapped onto DPOConfig fields and the model/data sources
(fused_dpo/train/trl_config.py), one-line errors for what cannot be honoured, flags over the file."""

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import one_error_line

from fused_dpo.train import trl_config
from fused_dpo.train.cli import DEFAULT_SOURCES, _plan, build_parser
from fused_dpo.train.cli import main as train
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import row_texts, zen_pairs
from fused_dpo.train.models import tiny_llama, train_tokenizer
from fused_dpo.train.rundir import CONFIG, read_run_json
from fused_dpo.train.trl_config import TRL_KEYS, split

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = zen_pairs()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny local Llama checkpoint with its tokenizer, as model_name_or_path."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tok = train_tokenizer(row_texts(ROWS))
    tiny_llama(len(tok), seed=0, hidden=32, layers=1).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- a TRL config, end to end ----------------------------------------------------------------------

def test_a_trl_yaml_config_trains(tmp_path, monkeypatch, capsys, checkpoint):
    """The keys as TRL documents them; dataset_name a local folder of train/test files, which
    TRL's `datasets.load_dataset(dataset_name)` and --data both read with named splits."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("peft")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # no ~/.cache writes
    data = tmp_path / "prefs"
    data.mkdir()
    for name, rows in (("train", ROWS[:15]), ("test", ROWS[15:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = write(tmp_path / "dpo.yaml", f"""\
# trl dpo --config dpo.yaml
model_name_or_path: {checkpoint}
model_revision: main
dtype: float32
dataset_name: {data}
dataset_train_split: train
dataset_test_split: test
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 5e-4
lr_scheduler_type: constant_with_warmup
warmup_steps: 1
weight_decay: 0.01
max_grad_norm: 0
beta: 0.2
loss_type: [sigmoid, sft]
loss_weights: [1.0, 0.5]
max_length: 40
truncation_mode: keep_start
precompute_ref_log_probs: true
use_peft: true
lora_r: 4
lora_target_modules: [q_proj, v_proj]
bf16: false
gradient_checkpointing: false
max_steps: 2
num_train_epochs: 1
logging_steps: 1
eval_strategy: steps
eval_steps: 2
save_strategy: steps
save_steps: 2
seed: 7
report_to: none
output_dir: {out}
trust_remote_code: false
remove_unused_columns: false
""")
    assert train(["--config", cfg, "--no-progress"]) == 0, capsys.readouterr().err
    got = json.loads((out / CONFIG).read_text())
    want = dict(dtype="float32", batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-4,
                lr_scheduler="constant", warmup_steps=1, weight_decay=0.01, max_grad_norm=None,
                beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], max_length=40,
                truncation_side="right", reference="precomputed", lora_r=4, lora_alpha=32.0,
                lora_target_modules=["q_proj", "v_proj"], precision="fp32", gradient_checkpointing=False,
                max_steps=2, num_epochs=1, logging_steps=1, eval_steps=2, save_steps=2, seed=7,
                report_to="none", output_dir=str(out))
    assert {k: got[k] for k in want} == want
    sources = read_run_json(out)["sources"]
    assert {k: sources[k] for k in ("model", "revision", "data", "data_split", "eval_split")} == {
        "model": checkpoint, "revision": None, "data": str(data), "data_split": "train",
        "eval_split": "test"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 2
    assert any("eval/rewards/accuracies" in m for m in metrics)  # the test split was evaluated


def test_a_yaml_file_of_our_fields_is_read_as_they_are(tmp_path):
    cfg = write(tmp_path / "run.yml", "beta: 0.3\nlearning_rate: 1e-4\nloss_type: ipo\nmax_steps: 1\n")
    (_, c, sources), = _plan(build_parser().parse_args(["--config", cfg, "--output-dir",
                                                        str(tmp_path / "run")]))
    assert (c.beta, c.learning_rate, c.loss_type, c.max_steps) == (0.3, 1e-4, ["ipo"], 1)
    assert sources == DEFAULT_SOURCES


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,where", [
    ("beta: 0.1\nloss_type: [sigmoid\nseed: 1\n", "line 3: expected ',' or ']'"),
    ("beta: 0.1\nseed: 1\nbeta: 0.2\n", "line 3: key 'beta' given twice (first on line 1)"),
    ("beta: 0.1\n\tseed: 1\n", "line 2: found character '\\t' that cannot start any token"),
    ("# nothing\n", "the file holds no keys"),
], ids=["syntax", "duplicate", "tab", "empty"])
def test_yaml_errors_name_the_file_and_line(tmp_path, capsys, text, where):
    cfg = write(tmp_path / "dpo.yaml", text)
    assert train(["--config", cfg, "--output-dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, f"config {cfg}: ", where)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("keys,text", [
    ({"use_dora": True}, "use_dora: true: only false is supported here"),
    ({"sync_ref_model": True}, "sync_ref_model: true: only false is supported here"),
    ({"per_device_eval_batch_size": 4}, "unknown config keys ['per_device_eval_batch_size']"),
    ({"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "unknown config keys ['env']"),
    ({"num_train_epochs": 1.5}, "num_train_epochs: 1.5: only whole epochs are supported here"),
    ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type: \"polynomial\": supported: linear, cosine"),
    ({"lr_scheduler_type": "constant", "warmup_steps": 5}, "constant schedule has no warm-up"),
    ({"eval_strategy": "epoch"}, "eval_strategy: \"epoch\": supported: no"),
    ({"save_strategy": "no"}, "save_strategy: \"no\": only steps is supported here"),
    ({"truncation_mode": "keep_end"}, "truncation_mode: \"keep_end\": keep_end (deprecated in TRL)"),
    ({"report_to": ["tensorboard", "trackio"]}, "report_to: [\"tensorboard\", \"trackio\"]: supported"),
    ({"report_to": "all"}, "report_to: \"all\": supported: none or one of tensorboard"),
    ({"warmup_steps": 0.1}, "warmup_steps: 0.1: a ratio of the run's steps"),
    ({"max_length": None}, "max_length: null: none (no truncation) is not supported here"),
    ({"weight_decay": 0.01}, "transformers exempts biases and norm weights from weight decay"),
    ({"optim": "adafactor"}, "optim: \"adafactor\": supported: adamw_torch, adamw_torch_fused"),
    ({"optim": "adamw_8bit"}, "8-bit optimizers and this trainer does not"),
    ({"lora_r": 8}, "lora_r: 8: lora_r has no effect without use_peft: true"),
    ({"use_peft": False, "lora_alpha": 8}, "lora_alpha: 8: lora_alpha has no effect without use_peft"),
    ({"use_peft": True, "disable_dropout": False}, "TRL's LoRA layers drop out (lora_dropout 0.05)"),
    ({"use_peft": True, "load_in_4bit": True}, "TRL's double-quantises only with use_bnb_nested_quant"),
    ({"use_bnb_nested_quant": True}, "use_bnb_nested_quant: true: is true exactly when load_in_4bit"),
    ({"bf16": True, "fp16": True}, "bf16 and fp16 are both true; choose one"),
], ids=lambda x: "-".join(x) if isinstance(x, dict) else None)
def test_what_cannot_be_honoured_is_one_error_line(tmp_path, capsys, keys, text):
    """Each names the key and its value, and lists the TRL keys that are supported."""
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(json.dumps({"model_name_or_path": "tiny", **keys}))  # JSON is YAML
    assert train(["--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, f"config {cfg}: ", text,
                   "TRL keys supported here: activation_offloading, adam_beta1,", "model_name_or_path")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("keys", [
    ("batch_size", "per_device_train_batch_size"), ("num_epochs", "num_train_epochs"),
    ("reference", "precompute_ref_log_probs"), ("dtype", "torch_dtype"), ("precision", "bf16"),
    ("lr_scheduler", "lr_scheduler_type"), ("truncation_side", "truncation_mode"),
    ("eval_fraction", "eval_strategy"),
], ids="-".join)
def test_a_field_given_under_two_names_is_an_error(tmp_path, capsys, keys):
    values = {"batch_size": 2, "per_device_train_batch_size": 2, "num_epochs": 1, "num_train_epochs": 1,
              "reference": "model", "precompute_ref_log_probs": False, "dtype": "float32",
              "torch_dtype": "float32", "precision": "bf16", "bf16": True, "lr_scheduler": "linear",
              "lr_scheduler_type": "linear", "truncation_side": "right", "truncation_mode": "keep_start",
              "eval_fraction": 0.0, "eval_strategy": "no"}
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(values[k])}\n" for k in keys))
    assert train(["--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, f"config {cfg}: {keys[0]} and {keys[1]} both set ", "give one of them")


def test_flags_override_the_file(tmp_path, checkpoint):
    """Defaults < the file (its fields and its model/data) < the flags."""
    cfg = write(tmp_path / "dpo.yaml", f"model_name_or_path: {checkpoint}\ndataset_name: zen\n"
                                       f"learning_rate: 1.0e-5\nbeta: 0.3\nper_device_train_batch_size: 4\n"
                                       f"output_dir: {tmp_path / 'file-run'}\n")
    args = ["--config", cfg]
    (_, c, sources), = _plan(build_parser().parse_args(args))
    assert (c.learning_rate, c.beta, c.batch_size, c.output_dir) == (1e-5, 0.3, 4, str(tmp_path / "file-run"))
    assert (sources["model"], sources["data"]) == (checkpoint, "zen")
    flags = ["--model", "tiny", "--data", "synthetic", "--learning-rate", "0.01", "--batch-size", "2",
             "--output-dir", str(tmp_path / "flag-run")]
    (_, c, sources), = _plan(build_parser().parse_args(args + flags))
    assert (c.learning_rate, c.beta, c.batch_size, c.output_dir) == (0.01, 0.3, 2, str(tmp_path / "flag-run"))
    assert (sources["model"], sources["data"]) == ("tiny", "synthetic")


# -- the table --------------------------------------------------------------------------------------

# Every TRL key: (the file beside model_name_or_path: m, the fields and sources it gives).
CASES = {
    "dataset_name": ({"dataset_name": "org/prefs"}, {"data": "org/prefs"}),
    "dataset_config": ({"dataset_config": "en"}, {"data_config": "en"}),
    "dataset_train_split": ({"dataset_train_split": "train_prefs"}, {"data_split": "train_prefs"}),
    "dataset_test_split": ({"dataset_test_split": "test_prefs"}, {"eval_split": "test_prefs"}),
    "dataset_streaming": ({"dataset_streaming": False}, {}),
    "ignore_bias_buffers": ({"ignore_bias_buffers": False}, {}),
    "model_name_or_path": ({}, {}),  # every case has it
    "model_revision": ({"model_revision": "v2"}, {"revision": "v2"}),
    "dtype": ({"dtype": "auto"}, {"dtype": "auto"}),
    "torch_dtype": ({"torch_dtype": "float32"}, {"dtype": "float32"}),
    "attn_implementation": ({"attn_implementation": None}, {}),
    "trust_remote_code": ({"trust_remote_code": False}, {}),
    "use_peft": ({"use_peft": True}, {"lora_r": 16, "lora_alpha": 32.0}),
    "lora_r": ({"use_peft": True, "lora_r": 8}, {"lora_r": 8, "lora_alpha": 32.0}),
    "lora_alpha": ({"use_peft": True, "lora_alpha": 8}, {"lora_r": 16, "lora_alpha": 8}),
    "lora_target_modules": ({"use_peft": True, "lora_target_modules": "all-linear"},
                            {"lora_r": 16, "lora_alpha": 32.0, "lora_target_modules": ["all-linear"]}),
    "lora_dropout": ({"use_peft": True, "lora_dropout": 0.1}, {"lora_r": 16, "lora_alpha": 32.0}),
    "lora_target_parameters": ({"lora_target_parameters": None}, {}),
    "lora_modules_to_save": ({"lora_modules_to_save": None}, {}),
    "lora_task_type": ({"lora_task_type": "CAUSAL_LM"}, {}),
    "use_rslora": ({"use_rslora": False}, {}),
    "use_dora": ({"use_dora": False}, {}),
    "load_in_8bit": ({"load_in_8bit": False}, {}),
    "load_in_4bit": ({"use_peft": True, "load_in_4bit": True, "use_bnb_nested_quant": True,
                      "dtype": "bfloat16"},
                     {"lora_r": 16, "lora_alpha": 32.0, "load_in_4bit": True, "dtype": "bfloat16"}),
    "bnb_4bit_quant_type": ({"bnb_4bit_quant_type": "nf4"}, {}),
    "use_bnb_nested_quant": ({"use_bnb_nested_quant": False}, {}),
    "bnb_4bit_quant_storage": ({"bnb_4bit_quant_storage": None}, {}),
    "model_init_kwargs": ({"model_init_kwargs": None}, {}),
    "disable_dropout": ({"disable_dropout": False}, {"disable_dropout": False}),
    "dataset_num_proc": ({"dataset_num_proc": None}, {}),
    "max_length": ({"max_length": 1024}, {"max_length": 1024}),
    "truncation_mode": ({"truncation_mode": "keep_start"}, {"truncation_side": "right"}),
    "padding_free": ({"padding_free": True}, {"padding_free": True}),
    "pad_to_multiple_of": ({"pad_to_multiple_of": "auto"}, {}),
    "precompute_ref_log_probs": ({"precompute_ref_log_probs": False}, {"reference": "model"}),
    "loss_type": ({"loss_type": "ipo"}, {"loss_type": "ipo"}),
    "loss_weights": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]},
                     {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]}),
    "ld_alpha": ({"ld_alpha": None}, {}),
    "f_divergence_type": ({"f_divergence_type": "js_divergence"}, {"f_divergence_type": "js_divergence"}),
    "f_alpha_divergence_coef": ({"f_alpha_divergence_coef": 0.3}, {"f_alpha_divergence_coef": 0.3}),
    "label_smoothing": ({"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "beta": ({"beta": 0.5}, {"beta": 0.5}),
    "use_weighting": ({"use_weighting": True}, {"use_weighting": True}),
    "discopop_tau": ({"discopop_tau": 0.1}, {"discopop_tau": 0.1}),
    "activation_offloading": ({"activation_offloading": True}, {"activation_offloading": True}),
    "sync_ref_model": ({"sync_ref_model": False}, {}),
    "ref_model_mixup_alpha": ({"ref_model_mixup_alpha": 0.6}, {}),
    "ref_model_sync_steps": ({"ref_model_sync_steps": 512}, {}),
    "pad_token": ({"pad_token": None}, {}),
    "use_liger_kernel": ({"use_liger_kernel": False}, {}),
    "learning_rate": ({"learning_rate": 5e-7}, {"learning_rate": 5e-7}),
    "logging_steps": ({"logging_steps": 10.0}, {"logging_steps": 10}),
    "gradient_checkpointing": ({"gradient_checkpointing": True}, {"gradient_checkpointing": True}),
    "bf16": ({"bf16": True}, {"precision": "bf16"}),
    "lr_scheduler_kwargs": ({"lr_scheduler_kwargs": {}}, {}),
    "output_dir": ({"output_dir": "out/dpo"}, {"output_dir": "out/dpo"}),
    "per_device_train_batch_size": ({"per_device_train_batch_size": 8}, {"batch_size": 8}),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 4}),
    "num_train_epochs": ({"num_train_epochs": 3.0}, {"num_epochs": 3}),
    "max_steps": ({"max_steps": -1}, {"max_steps": None}),
    "lr_scheduler_type": ({"lr_scheduler_type": "constant"}, {"lr_scheduler": "constant", "warmup_steps": 0}),
    "warmup_steps": ({"warmup_steps": 5}, {"warmup_steps": 5}),
    "weight_decay": ({"weight_decay": 0.0}, {"weight_decay": 0.0}),
    "max_grad_norm": ({"max_grad_norm": 0.0}, {"max_grad_norm": None}),
    "optim": ({"optim": "adamw_torch_fused"}, {"optim": "adamw_torch_fused"}),
    "adam_beta1": ({"adam_beta1": 0.9}, {}),
    "adam_beta2": ({"adam_beta2": 0.999}, {}),
    "adam_epsilon": ({"adam_epsilon": 1e-8}, {}),
    "seed": ({"seed": 42}, {"seed": 42}),
    "fp16": ({"fp16": True}, {"precision": "fp16"}),
    "eval_strategy": ({"eval_strategy": False}, {"eval_fraction": 0.0}),  # YAML's bare `no`
    "eval_steps": ({"eval_steps": None, "logging_steps": 5}, {"eval_steps": 5, "logging_steps": 5}),
    "save_strategy": ({"save_strategy": "steps"}, {}),
    "save_steps": ({"save_steps": 500}, {"save_steps": 500}),
    "logging_strategy": ({"logging_strategy": "steps"}, {}),
    "report_to": ({"report_to": ["none"]}, {"report_to": "none"}),
    "push_to_hub": ({"push_to_hub": False}, {}),
    "remove_unused_columns": ({"remove_unused_columns": False}, {}),
}


def test_every_trl_key_has_a_mapping_case():
    assert sorted(CASES) == sorted(TRL_KEYS)


@pytest.mark.parametrize("key", sorted(CASES))
def test_mapping(key):
    """split() is pure: the file's dict in, (fields, sources) out; the fields make a DPOConfig."""
    given, want = CASES[key]
    fields, sources = split({"model_name_or_path": "m", **given}, "dpo.yaml")
    assert {**fields, **sources} == {"model": "m", **want}
    assert set(sources) <= set(DEFAULT_SOURCES) and not set(fields) & set(DEFAULT_SOURCES)
    DPOConfig.from_dict(fields)


@pytest.mark.parametrize("given,want", [
    ({"bf16": False, "fp16": True}, {"precision": "fp16"}),
    ({"bf16": None}, {"precision": "bf16"}),  # TRL: an unset bf16 is `not fp16`
    ({"bf16": None, "fp16": True}, {"precision": "fp16"}),
    ({"use_peft": False, "lora_r": 16, "lora_alpha": 32}, {"lora_r": None, "lora_alpha": None}),
    ({"eval_strategy": "no", "dataset_test_split": "test"}, {"eval_fraction": 0.0}),  # TRL loads none
    ({"eval_strategy": "steps", "logging_steps": 3}, {"logging_steps": 3, "eval_steps": 3}),
    ({"report_to": "tensorboard"}, {"report_to": "tensorboard"}),
    ({"model_revision": "main"}, {"revision": None}),
    ({"max_steps": 50, "num_train_epochs": 2}, {"max_steps": 50, "num_epochs": 2}),
    ({"use_peft": True, "optim": "paged_adamw_8bit", "weight_decay": 0.1},
     {"lora_r": 16, "lora_alpha": 32.0, "optim": "paged_adamw_8bit", "weight_decay": 0.1}),
    ({"per_device_train_batch_size": 2, "max_steps": 3, "beta": 0.2, "loss_reduction": "sum"},
     {"batch_size": 2, "max_steps": 3, "beta": 0.2, "loss_reduction": "sum"}),  # mixed names
])
def test_mapping_of_keys_together(given, want):
    fields, sources = split({"model_name_or_path": "m", **given}, "dpo.yaml")
    assert {**fields, **sources} == {"model": "m", **want}


def test_a_file_without_trl_only_keys_is_ours():
    """max_steps -1 or max_grad_norm 0 keep this trainer's meaning (an error, not TRL's unset)."""
    d = {"max_steps": -1, "max_grad_norm": 0, "beta": 0.1}
    assert not trl_config.is_trl(d) and split(d, "run.json") == (d, {})


def test_the_table_names_trl_keys_and_their_defaults():
    """Against TRL 1.16's own dataclasses: every key is one of theirs (torch_dtype: its name before
    TRL 1.0), every no-op's accepted value starts with TRL's default, and the LoRA defaults are
    ModelConfig's."""
    pytest.importorskip("trl")
    from trl.scripts.utils import ScriptArguments
    from trl.trainer.dpo_config import DPOConfig as TRLConfig
    from trl.trainer.model_config import ModelConfig

    defaults = {}
    for cls in (ScriptArguments, ModelConfig, TRLConfig):
        for f in dataclasses.fields(cls):
            defaults[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    assert sorted(set(TRL_KEYS) - set(defaults)) == ["torch_dtype"]
    for key, (target, convert) in TRL_KEYS.items():
        if hasattr(convert, "allowed"):
            assert target is None and convert.allowed[0] == defaults[key], key
    assert (trl_config.TRL_LORA_R, trl_config.TRL_LORA_ALPHA, trl_config.TRL_LORA_DROPOUT) == (
        defaults["lora_r"], defaults["lora_alpha"], defaults["lora_dropout"])
    for key in ("use_peft", "use_bnb_nested_quant", "load_in_4bit", "sync_ref_model", "bf16", "fp16"):
        assert defaults[key] in (False, None), key  # what the converters take an absent key to be
    assert (defaults["model_revision"], defaults["truncation_mode"], defaults["max_steps"]) == (
        "main", "keep_start", -1)
    assert defaults["disable_dropout"] is True and defaults["eval_strategy"] == "no"


def test_eval_strategy_steps_evaluates_on_the_test_split_as_trl_dpo_does():
    """`trl dpo` with eval_strategy steps evaluates on the dataset's "test" split (its
    dataset_test_split default) every logging_steps (TRL's default 10), training on the whole train
    split; an explicit dataset_test_split wins."""
    from fused_dpo.train.trl_config import split

    base = {"model_name_or_path": "m", "dataset_name": "d", "eval_strategy": "steps"}
    assert split(base, "c.yaml") == ({"eval_steps": 10}, {"model": "m", "data": "d", "eval_split": "test"})
    fields, sources = split({**base, "dataset_test_split": "val", "logging_steps": 5}, "c.yaml")
    assert fields["eval_steps"] == 5 and sources["eval_split"] == "val"
