"""The flags of `fused-dpo train` and `fused-dpo plan` made from DPOConfig's fields: each field is
`--its-name VALUE` (a boolean alone means true), parsed by its type hint."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

from ..losses import F_DIVERGENCES, LOSS_TYPES
from .config import CHOICES, DEFAULT_MAX_STEPS, DPOConfig

_WORD = {int: "an integer", float: "a number", str: "a string"}


def _parse_value(field: dataclasses.Field, text: str):
    hint = typing.get_type_hints(DPOConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if optional and text.lower() in ("none", "null"):
        return None
    base = args[0] if args and (optional or isinstance(hint, types.UnionType)) else hint
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    inner = typing.get_args(base)[0] if typing.get_origin(base) is list else None
    try:
        if inner is not None:  # "sigmoid, sft" is sigmoid,sft
            return [inner(x.strip()) for x in text.split(",") if x.strip()]
        return base(text)
    except ValueError:
        what = f"a comma-separated list of {_WORD[inner][2:]}s" if inner else _WORD[base]
        none = " or none" if optional else ""
        raise argparse.ArgumentTypeError(f"expected {what}{none}, got {text!r}") from None


def add_config_flags(ap: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """A flag for each DPOConfig field (or those in `names`), stored as `cfg_<field>`."""
    defaults = DPOConfig().to_dict()
    hints = typing.get_type_hints(DPOConfig)
    for f in dataclasses.fields(DPOConfig):
        if names is not None and f.name not in names:
            continue
        # a boolean flag alone means true (`--load-in-4bit`, as TRL's CLI reads it), or takes a value
        flag = {"nargs": "?", "const": True} if hints[f.name] is bool else {}
        ap.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None,
                        metavar="VALUE", type=lambda s, f=f: _parse_value(f, s), **flag,
                        help=f"DPOConfig.{f.name} (default {defaults[f.name]}{_HELP.get(f.name, '')})")


# What --help adds to a field's line; the allowed values come from the library's own constants.
_HELP = {
    **{name: f"; one of {', '.join(allowed)}" for name, allowed in CHOICES.items()},
    "loss_type": f"; one or several, comma-separated, of {', '.join(LOSS_TYPES)}",
    "f_divergence_type": f"; one of {', '.join(F_DIVERGENCES)}",
    "max_steps": f": {DEFAULT_MAX_STEPS} steps, or num_epochs epochs when that is set; when both are "
                 f"set, max_steps wins, as in transformers' Trainer and TRL",
    "num_epochs": "; passes over the training pairs, used when max_steps is none",
    "report_to": f"; one of {', '.join(CHOICES['report_to'])}: tensorboard writes OUTPUT_DIR/tensorboard "
                 f"(`tensorboard --logdir` it), trackio its local store; metrics.jsonl is always written",
    "save_model": "; OUTPUT_DIR/model/ (save_pretrained: from_pretrained loads it) is written at the end "
                  "of a run; true writes it at every save too",
    "merge_lora": "; with --lora-r, model/ holds the base weights with the adapters merged in (loads "
                  "with from_pretrained alone) instead of the adapters (PeftModel.from_pretrained)",
    "output_dir": "; without this flag a new run goes to the first free one of runs/default, "
                  "runs/default-2, ...",
}


_NEGATIVE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """`--learning-rate -1e-3` -> `--learning-rate=-1e-3`: argparse reads "-1e-3" as an option."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out
