"""Config files written for TRL's `trl dpo --config dpo.yaml`: the keys of TRL 1.16's
ScriptArguments, ModelConfig and DPOConfig (with transformers' TrainingArguments under it), read as
this trainer's DPOConfig fields and model/data sources (`TRL_KEYS`).

A file is TRL-style when it holds a key that TRL defines and DPOConfig does not
(model_name_or_path, per_device_train_batch_size, ...). Every key of such a file is then read with
TRL's meaning: max_steps -1 is unset, max_grad_norm 0 turns clipping off, bf16: true is bf16
autocast, use_peft: true with no lora_r / lora_alpha is TRL's rank 16 and alpha 32. Our own field
names may stand beside TRL's as long as no field is given under two names.

Keys the file leaves out take this trainer's defaults, not TRL's: learning_rate 1e-3 (TRL 1e-6),
max_length 64 (1024), precision fp32 (TRL bf16 unless fp16), gradient_checkpointing off (on),
truncation_side left (TRL keep_start, our right), eval on eval_fraction 0.2 of the data (TRL: no
eval, the whole split trains), seed 0 (42), batch_size 16 (8), cosine schedule with 10 warm-up
steps (linear, 0), logging_steps 1 (10), save_steps 100 (500), max_steps 300 (3 epochs).

What maps, and how closely:
- max_length: both bound each prompt + response sequence. truncation_mode keep_start keeps a
  sequence's first max_length tokens and drops a pair whose prompt alone fills them, as our
  truncation_side right does; keep_end (deprecated in TRL) cuts each sequence's start on its own,
  which ours (one prompt cut for both responses) is not, so it is refused.
- warm-up: TRL ramps the rate as step / warmup_steps from 0, ours as (step + 1) / (warmup_steps + 1)
  (no step at rate 0); the decay after it is the same. transformers' `constant` has no warm-up at
  all (it ignores warmup_steps), its `constant_with_warmup` is our `constant`.
- weight_decay and 8-bit optimizers: transformers exempts biases and norm weights from decay and
  keeps embeddings' 8-bit-optimizer state in 32 bits; this trainer does neither, which is the same
  only when the trained weights are LoRA adapters (use_peft: true).
- load_in_4bit: our QLoRA base is NF4 with double quantisation and bf16 compute; TRL's computes in
  `dtype` and double-quantises only with use_bnb_nested_quant, so both are required.
- dataset_name is TRL's `datasets.load_dataset` name (a hub id or a local folder); here it is
  whatever --data takes (a .jsonl file as well).

A TRL key whose value is TRL's default and changes nothing here (trust_remote_code: false,
sync_ref_model: false, ...) passes; any other value of it, and any key not in TRL_KEYS, is an
error naming the key and listing the supported ones: nothing is ignored silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from .config import CHOICES, DPOConfig

# The sources (the CLI's --model, --revision, --data, ... flags) a TRL key can set.
SOURCES = ("model", "revision", "data", "data_config", "data_split", "eval_split")
FIELDS = frozenset(f.name for f in dataclasses.fields(DPOConfig))

_UNSET = object()  # a converter's answer when the key sets nothing here (TRL's no-op default)

# TRL's (ModelConfig's) LoRA defaults, used when use_peft is true and the key is left out.
TRL_LORA_R, TRL_LORA_ALPHA, TRL_LORA_DROPOUT = 16, 32, 0.05


def _show(v) -> str:
    """A value as the file spells it (true, null, "text"), not as Python does."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _peft(d: dict) -> bool:
    return d.get("use_peft", False) is True


def _same(v, d):
    return v


def _text(v, d):
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v


def _text_or_none(v, d):
    return None if v is None else _text(v, d)


def _int(v, d):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be an integer")
    return v


def _steps(v, d):
    """transformers' *_steps: a count, or a float in (0, 1) read as a ratio of the run's steps."""
    if isinstance(v, float) and 0 < v < 1:
        raise ValueError("a ratio of the run's steps (transformers' meaning of a value below 1) is "
                         "not supported here; give a number of steps")
    return _whole(v, d)


def _whole(v, d):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be a whole number")
    return v


def _epochs(v, d):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v != int(v):
        raise ValueError("only whole epochs are supported here (num_epochs); use max_steps for a "
                         "part of an epoch")
    return _whole(v, d)


def _max_steps(v, d):
    return None if v == -1 and not isinstance(v, bool) else _int(v, d)  # -1: unset (use epochs)


def _max_grad_norm(v, d):
    return None if v == 0 and not isinstance(v, bool) else v  # transformers: 0 turns clipping off


def _eval_steps(v, d):
    # transformers: none means every logging_steps
    if v is None:
        return _steps(d["logging_steps"], d) if "logging_steps" in d else TRL_LOGGING_STEPS
    return _steps(v, d)


def _strategy(v) -> str:
    return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false


def _eval_strategy(v, d):
    v = _strategy(v)
    if v == "no":
        return 0.0  # no held-out part carved from the data: the whole split trains, as in TRL
    if v == "steps":
        return _UNSET
    raise ValueError("supported: no (no evaluation) and steps (every eval_steps)")


def _eval_split(v, d):
    if _strategy(d.get("eval_strategy")) == "no":
        return _UNSET  # TRL loads no test split without evaluation
    return _text(v, d)


def _steps_only(does: str, every: str):
    def convert(v, d):
        if _strategy(v) != "steps":
            raise ValueError(f"only steps is supported here: this trainer {does} every {every}")
        return _UNSET

    return convert


def _revision(v, d):
    return None if v == "main" else _text(v, d)  # main is what no revision means on the hub


def _report_to(v, d):
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("must be a string or a list of strings")
    names = [n for n in names if n != "none"]
    if not names:
        return "none"
    if len(names) == 1 and names[0] in CHOICES["report_to"]:
        return names[0]
    raise ValueError(f"supported: none or one of {', '.join(CHOICES['report_to'][1:])} (not all: "
                     f"it depends on the libraries installed)")


_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant_with_warmup": "constant",
               "constant": "constant"}


def _lr_scheduler(v, d):
    if not isinstance(v, str) or v not in _SCHEDULERS:
        raise ValueError(f"supported: {', '.join(_SCHEDULERS)}")
    if v == "constant" and d.get("warmup_steps", 0) != 0:
        raise ValueError("transformers' constant schedule has no warm-up (it ignores warmup_steps); "
                         "use constant_with_warmup, or warmup_steps 0")
    return _SCHEDULERS[v]


def _truncation(v, d):
    if v == "keep_start":
        return "right"
    if v == "keep_end":
        raise ValueError("keep_end (deprecated in TRL) cuts the start of each sequence on its own, "
                         "which this trainer does not (its truncation_side left cuts one prompt for "
                         "both responses); keep_start is supported")
    raise ValueError("supported: keep_start")


def _max_length(v, d):
    if v is None:
        raise ValueError("none (no truncation) is not supported here; give a length in tokens")
    return v


def _reference(v, d):
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return "precomputed" if v else "model"


def _precision(v, d):
    """bf16 and fp16 together (both keys map here)."""
    bf16, fp16 = d.get("bf16"), d.get("fp16", False)
    if "bf16" in d and bf16 is None:
        bf16 = not fp16  # TRL's rule for an unset bf16
    for name, x in (("bf16", bf16), ("fp16", fp16)):
        if not isinstance(x, bool) and x is not None:
            raise ValueError(f"{name} must be true or false")
    if bf16 and fp16:
        raise ValueError("bf16 and fp16 are both true; choose one")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def _optim(v, d):
    if v in ("adamw_torch", "adamw_torch_fused"):
        return v
    if v in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        if not _peft(d):
            raise ValueError("transformers keeps the embeddings' optimizer state in 32 bits under its "
                             "8-bit optimizers and this trainer does not: the same only with "
                             "use_peft: true")
        return "paged_adamw_8bit" if v.startswith("paged") else "adamw_8bit"
    raise ValueError("supported: adamw_torch, adamw_torch_fused, and under use_peft adamw_8bit "
                     "(adamw_bnb_8bit), paged_adamw_8bit (transformers' adafactor and "
                     "adamw_anyprecision are other optimizers than this trainer's)")


def _weight_decay(v, d):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0 and not _peft(d):
        raise ValueError("transformers exempts biases and norm weights from weight decay and this "
                         "trainer does not: the same only with use_peft: true (or pass "
                         "--weight-decay to decay every weight)")
    return v


def _load_in_4bit(v, d):
    if v is True:
        nested = d.get("use_bnb_nested_quant", False) is True
        dtype = d.get("dtype", d.get("torch_dtype"))
        if not nested or dtype != "bfloat16":
            raise ValueError("this trainer's 4-bit base is NF4 with double quantisation and bf16 "
                             "compute; TRL's double-quantises only with use_bnb_nested_quant: true "
                             "and computes in dtype: set both (dtype: bfloat16)")
    return v


def _nested_quant(v, d):
    if v is not (d.get("load_in_4bit", False) is True):
        raise ValueError("is true exactly when load_in_4bit is (this trainer's 4-bit base is "
                         "double-quantised)")
    return _UNSET


def _lora_r(v, d):
    """use_peft and lora_r together (both keys map here)."""
    if not isinstance(d.get("use_peft", False), bool):
        raise ValueError("use_peft must be true or false")
    r = d.get("lora_r", TRL_LORA_R)
    if not _peft(d):
        if r != TRL_LORA_R:
            raise ValueError("lora_r has no effect without use_peft: true (TRL then fine-tunes every "
                             "weight); set use_peft: true for LoRA")
        return None
    dropout = d.get("lora_dropout", TRL_LORA_DROPOUT)
    if dropout != 0 and d.get("disable_dropout", True) is False:
        raise ValueError(f"with disable_dropout false TRL's LoRA layers drop out (lora_dropout "
                         f"{dropout}) and this trainer's do not; set lora_dropout: 0")
    return _int(r, d)


def _with_peft(name: str, trl_default):
    """A LoRA key: its value under use_peft, TRL's default (a no-op) without it."""
    def convert(v, d):
        if _peft(d):
            return [v] if name == "lora_target_modules" and isinstance(v, str) else v
        if v != trl_default:
            raise ValueError(f"{name} has no effect without use_peft: true")
        return None

    return convert


def _lora_dropout(v, d):
    return _UNSET  # read by _lora_r; without dropout (disable_dropout) any value is a no-op


def _noop(*allowed):
    """A key whose TRL default (the first of `allowed`) changes nothing here."""
    def convert(v, d):
        if not any(v == a and isinstance(v, bool) == isinstance(a, bool) for a in allowed):
            raise ValueError(f"only {' or '.join(_show(a) for a in allowed)} is supported here (TRL's "
                             f"default{'' if len(allowed) == 1 else ' or another no-op'}: it changes "
                             f"nothing here)")
        return _UNSET

    convert.allowed = allowed
    return convert


# TRL key -> (the DPOConfig field or source it sets, None for a no-op; its converter: TRL value,
# the whole file -> our value, or _UNSET when it sets nothing).
TRL_KEYS: dict[str, tuple[str | None, Callable]] = {
    # ScriptArguments (trl/scripts/utils.py)
    "dataset_name": ("data", _text),
    "dataset_config": ("data_config", _text_or_none),
    "dataset_train_split": ("data_split", _text),
    "dataset_test_split": ("eval_split", _eval_split),
    "dataset_streaming": (None, _noop(False)),
    "ignore_bias_buffers": (None, _noop(False)),
    # ModelConfig (trl/trainer/model_config.py)
    "model_name_or_path": ("model", _text),
    "model_revision": ("revision", _revision),
    "dtype": ("dtype", _same),
    "torch_dtype": ("dtype", _same),  # its name before TRL 1.0
    "attn_implementation": (None, _noop(None)),
    "trust_remote_code": (None, _noop(False)),  # no model code is run from a checkpoint here
    "use_peft": ("lora_r", _lora_r),
    "lora_r": ("lora_r", _lora_r),
    "lora_alpha": ("lora_alpha", _with_peft("lora_alpha", TRL_LORA_ALPHA)),
    "lora_target_modules": ("lora_target_modules", _with_peft("lora_target_modules", None)),
    "lora_dropout": (None, _lora_dropout),  # TRL's disable_dropout zeroes it after peft wraps
    "lora_target_parameters": (None, _noop(None)),
    "lora_modules_to_save": (None, _noop(None)),
    "lora_task_type": (None, _noop("CAUSAL_LM")),
    "use_rslora": (None, _noop(False)),
    "use_dora": (None, _noop(False)),
    "load_in_8bit": (None, _noop(False)),
    "load_in_4bit": ("load_in_4bit", _load_in_4bit),
    "bnb_4bit_quant_type": (None, _noop("nf4")),
    "use_bnb_nested_quant": (None, _nested_quant),
    "bnb_4bit_quant_storage": (None, _noop(None)),
    # DPOConfig (trl/trainer/dpo_config.py, base_config.py)
    "model_init_kwargs": (None, _noop(None)),
    "disable_dropout": ("disable_dropout", _same),
    "dataset_num_proc": (None, _noop(None)),
    "max_length": ("max_length", _max_length),
    "truncation_mode": ("truncation_side", _truncation),
    "padding_free": ("padding_free", _same),  # TRL 1.16 pads anyway; same losses up to rounding
    "pad_to_multiple_of": (None, _noop("auto", None)),  # "auto" pads only on AWS Neuron
    "precompute_ref_log_probs": ("reference", _reference),
    "loss_type": ("loss_type", _same),
    "loss_weights": ("loss_weights", _same),
    "ld_alpha": (None, _noop(None)),
    "f_divergence_type": ("f_divergence_type", _same),
    "f_alpha_divergence_coef": ("f_alpha_divergence_coef", _same),
    "label_smoothing": ("label_smoothing", _same),
    "beta": ("beta", _same),
    "use_weighting": ("use_weighting", _same),
    "discopop_tau": ("discopop_tau", _same),
    "activation_offloading": ("activation_offloading", _same),
    "sync_ref_model": (None, _noop(False)),
    "ref_model_mixup_alpha": (None, _noop(0.6)),  # read only under sync_ref_model
    "ref_model_sync_steps": (None, _noop(512)),
    "pad_token": (None, _noop(None)),
    "use_liger_kernel": (None, _noop(False)),
    "learning_rate": ("learning_rate", _same),
    "logging_steps": ("logging_steps", _steps),
    "gradient_checkpointing": ("gradient_checkpointing", _same),
    "bf16": ("precision", _precision),
    "lr_scheduler_kwargs": (None, _noop(None, {})),
    # TrainingArguments (transformers/training_args.py)
    "output_dir": ("output_dir", _same),
    "per_device_train_batch_size": ("batch_size", _int),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", _same),
    "num_train_epochs": ("num_epochs", _epochs),
    "max_steps": ("max_steps", _max_steps),
    "lr_scheduler_type": ("lr_scheduler", _lr_scheduler),
    "warmup_steps": ("warmup_steps", _steps),
    "weight_decay": ("weight_decay", _weight_decay),
    "max_grad_norm": ("max_grad_norm", _max_grad_norm),
    "optim": ("optim", _optim),
    "adam_beta1": (None, _noop(0.9)),  # torch AdamW's defaults, as this trainer's optimizers use
    "adam_beta2": (None, _noop(0.999)),
    "adam_epsilon": (None, _noop(1e-8)),
    "seed": ("seed", _same),
    "fp16": ("precision", _precision),
    "eval_strategy": ("eval_fraction", _eval_strategy),
    "eval_steps": ("eval_steps", _eval_steps),
    "save_strategy": (None, _steps_only("checkpoints", "save_steps")),
    "save_steps": ("save_steps", _steps),
    "logging_strategy": (None, _steps_only("logs", "logging_steps")),
    "report_to": ("report_to", _report_to),
    "push_to_hub": (None, _noop(False)),
    # TRL's DPO collator reads only the tokenised columns whichever this is (the script's docs
    # pass --no_remove_unused_columns), and this trainer's data reads only prompt/chosen/rejected.
    "remove_unused_columns": (None, _noop(True, False)),
}

# Keys that map to one field together and are converted as a pair, not given twice.
_JOINT = (frozenset({"bf16", "fp16"}), frozenset({"use_peft", "lora_r"}))


def is_trl(d: dict) -> bool:
    """The file uses a TRL name that is not a DPOConfig field."""
    return any(k in TRL_KEYS and k not in FIELDS for k in d)


def split(d: dict, path: str | Path) -> tuple[dict, dict]:
    """(DPOConfig fields, sources) of the config file `path` read as `d`: as they are for a file of
    DPOConfig fields, through TRL_KEYS for a TRL-style one. ValueError (naming the file and key) for
    a key that is neither, a TRL value that cannot be honoured here, or a field given twice."""
    supported = f"the TRL keys supported here: {', '.join(sorted(TRL_KEYS))}"
    unknown = [k for k in d if k not in FIELDS and k not in TRL_KEYS]
    if unknown:
        raise ValueError(f"config {path}: unknown config keys {unknown}: not DPOConfig fields (the "
                         f"flags of `fused-dpo train --help`), nor among {supported}")
    if not is_trl(d):
        return dict(d), {}
    by_target: dict[str, list[str]] = {}
    values = {}
    for key, v in d.items():
        if key not in TRL_KEYS:
            target = key  # a DPOConfig field under our own name
        else:
            target, convert = TRL_KEYS[key]
            try:
                v = convert(v, d)
            except ValueError as e:
                raise ValueError(f"config {path}: {key}: {_show(d[key])}: {e}; {supported}") from None
        if v is _UNSET or target is None:
            continue
        by_target.setdefault(target, []).append(key)
        values[target] = v
    for target, keys in by_target.items():
        if len(keys) > 1 and frozenset(keys) not in _JOINT:
            raise ValueError(f"config {path}: {' and '.join(keys)} {'both' if len(keys) == 2 else 'all'} "
                             f"set {target}; give one of them")
    values.update({k: v for k, v in _implied(d).items() if k not in values})
    fields = {k: v for k, v in values.items() if k not in SOURCES}
    return fields, {k: v for k, v in values.items() if k in SOURCES}


def _implied(d: dict) -> dict:
    """What TRL's meaning of a given key implies for a key the file leaves out."""
    out = {}
    if _peft(d) and "lora_alpha" not in d:
        out["lora_alpha"] = float(TRL_LORA_ALPHA)  # TRL's, not our 2 * lora_r
    if d.get("lr_scheduler_type") == "constant":
        out["warmup_steps"] = 0  # transformers' constant schedule has no warm-up
    if _strategy(d.get("eval_strategy")) == "steps":
        if "eval_steps" not in d:
            # transformers' default for eval_steps is logging_steps, TRL's DPOConfig default 10
            out["eval_steps"] = _steps(d["logging_steps"], d) if "logging_steps" in d else TRL_LOGGING_STEPS
        if "dataset_test_split" not in d and "dataset_name" in d:
            # trl dpo evaluates on the dataset's "test" split and trains on the whole train split
            out["eval_split"] = "test"
    return out


TRL_LOGGING_STEPS = 10  # TRL 1.16's DPOConfig.logging_steps


