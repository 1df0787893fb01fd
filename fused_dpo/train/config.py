"""DPOConfig: every option of the trainer, one flat dataclass (each field is a CLI flag)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .._common import IMPLS
from ..losses import REFERENCE_FREE, check_loss_options
from .optim import FSDP2_UNSUPPORTED, check_weight_dtype, fsdp2_refusal
from .optim import NAMES as OPTIMIZERS


@dataclass
class DPOConfig:
    # loss
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False  # WPO: pair weights from log sum p^2, computed in the same pass
    loss_reduction: str = "mean"  # "mean" over pairs (right) or "sum" (the failing preset)
    # optimisation
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # The run's length: max_steps when set (it wins over num_epochs, as in transformers' Trainer
    # and TRL), else num_epochs passes over the training pairs, else DEFAULT_MAX_STEPS.
    max_steps: int | None = None
    num_epochs: int | None = None
    seed: int = 0
    # data
    max_length: int = 64
    truncation_side: str = "left"  # drop prompt tokens from the left, or response tokens from the right
    eval_fraction: float = 0.2
    # model and precision
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA; CPU runs fp32 or bf16)
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    reference: str = "model"  # model | precomputed | none
    logps_impl: str = "auto"  # fused_dpo impl for the log-probs
    # Padding-free batches: the 2B sequences of a batch packed into one row of their real tokens,
    # position_ids restarting at 0 per sequence, no attention mask (transformers masks attention
    # per sequence from them) and per-sequence log-probs from cu_seqlens: no compute or memory
    # spent on pad tokens. Same losses and metrics as padded batches up to rounding; a model that
    # cannot mask packed sequences (OPT, Bloom, MPT, recurrent models) is refused at start.
    padding_free: bool = False
    # several processes (torchrun): none | ddp | fsdp2; batch_size is then per rank
    parallel: str = "none"
    # LoRA (peft): adapters of rank lora_r on the lora_target_modules layers, scaled by
    # lora_alpha / lora_r; the reference is the same model with its adapters off. None: full FT.
    lora_r: int | None = None
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_target_modules: list[str] | None = None  # None: peft's default for the model type
    # memory (README "Fitting a large model"): the storage dtype of the loaded weights (auto: the
    # file's), the optimizer (transformers' and TRL's `optim` names), a 4-bit NF4 base under LoRA
    # adapters (QLoRA), and saved activations moved to pinned host memory during the step
    dtype: str = "float32"
    optim: str = "adamw_torch"
    load_in_4bit: bool = False
    activation_offloading: bool = False
    # health
    max_bad_steps: int = 3  # consecutive NaN/inf losses before training stops
    # outputs
    output_dir: str = "runs/default"
    logging_steps: int = 1
    eval_steps: int = 50
    save_steps: int = 100
    report_to: str = "none"  # none | tensorboard | trackio: the metrics.jsonl rows, from rank 0
    save_model: bool = False  # write output_dir/model/ (save_pretrained) at every save, not only at the end
    merge_lora: bool = False  # LoRA: output_dir/model/ holds the merged weights, not the adapters

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(DPOConfig)
        for f in dataclasses.fields(self):
            _check_type(f.name, hints[f.name], getattr(self, f.name))
        check_loss_options(self.loss_type, self.loss_weights, self.beta, self.label_smoothing,
                           "mean", self.rpo_alpha, self.simpo_gamma, self.discopop_tau,
                           f_divergence_type=self.f_divergence_type,
                           f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                           use_weighting=self.use_weighting)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        positive = ("batch_size", "gradient_accumulation_steps", "max_steps", "max_length",
                    "logging_steps", "eval_steps", "save_steps", "max_bad_steps")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and
                                                   math.isfinite(self.max_grad_norm)):
            # A negative norm flips every gradient (the run trains backwards); 0 zeroes them.
            raise ValueError(f"max_grad_norm must be a finite number > 0, or none to disable "
                             f"clipping; got {self.max_grad_norm!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs!r}")
        if self.reference == "none" and any(t not in REFERENCE_FREE for t in self.loss_type):
            raise ValueError(f"reference='none' only works with the reference-free losses "
                             f"{REFERENCE_FREE}, not {self.loss_type}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        self._validate_lora()
        self._validate_dtype()
        if self.parallel == "fsdp2" and self.optim in FSDP2_UNSUPPORTED:
            raise ValueError(fsdp2_refusal(self.optim))
        if not self.output_dir.strip():
            raise ValueError("output_dir must not be empty (it would write into the current directory)")

    def _validate_lora(self) -> None:
        if self.lora_r is None:
            given = [k for k in ("lora_alpha", "lora_target_modules") if getattr(self, k) is not None]
            given += ["merge_lora"] if self.merge_lora else []
            if given:
                raise ValueError(f"{' and '.join(given)} set but lora_r is none (LoRA off): set lora_r "
                                 f"to train LoRA adapters")
            return
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be an integer >= 1 (the adapters' rank), or none for full "
                             f"fine-tuning; got {self.lora_r!r}")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        targets = self.lora_target_modules
        if targets is not None and (not targets or not all(t.strip() for t in targets)):
            raise ValueError(f"lora_target_modules must name at least one layer (e.g. q_proj,v_proj), "
                             f"got {targets!r}")
        if targets is not None and len(targets) > 1 and ALL_LINEAR in targets:
            raise ValueError(f"lora_target_modules: {ALL_LINEAR} stands alone, got {targets!r}")

    def _validate_dtype(self) -> None:
        """--dtype and --load-in-4bit with the rest (the README's "Fitting a large model")."""
        if self.load_in_4bit and self.lora_r is None:
            raise ValueError("load_in_4bit needs lora_r: the 4-bit NF4 base is frozen and QLoRA trains "
                             "LoRA adapters on it; set lora_r, or drop load_in_4bit to fine-tune fully")
        if self.load_in_4bit and self.parallel == "fsdp2":
            # accelerate#3983, axolotl#2992: fully_shard refuses the uint8 Params4bit or rebuilds it
            # as a plain Parameter without its quantisation state (loss 0, grad norm NaN).
            raise ValueError("load_in_4bit with parallel fsdp2 is not supported: FSDP2's fully_shard "
                             "turns each bitsandbytes Params4bit into a plain DTensor shard without "
                             "its quantisation state; use parallel ddp (each rank holds the 4-bit "
                             "base) or none")
        if self.load_in_4bit and self.merge_lora:
            # export.merged_state refuses it too, but only when the run ends
            raise ValueError("merge_lora with load_in_4bit: the adapters cannot be merged into NF4 "
                             "weights (requantising would round the trained change away); drop "
                             "merge_lora: output_dir/model/ then holds the adapters, which apply to the "
                             "base model in any dtype")
        if self.dtype == "float16" and self.optim == "adamw_anyprecision":
            raise ValueError("dtype float16 with optim adamw_anyprecision: its Kahan-compensated "
                             "update is written for bfloat16 weights; use dtype bfloat16")
        if self.optim == "adamw_anyprecision" and self.lora_r is not None:
            # (fp32 weights are refused when the optimizer is built: from Python the model passed
            # may be in any dtype, whatever this field says)
            raise ValueError("optim adamw_anyprecision is made for bfloat16 weights in full fine-tuning "
                             "(Kahan-compensated updates), not for LoRA adapters, which train in "
                             "float32: use adamw_torch")
        check_weight_dtype(self, self.dtype)

    @property
    def effective_lora_alpha(self) -> float | None:
        """lora_alpha as used: its default is 2 * lora_r; None without LoRA."""
        if self.lora_r is None:
            return None
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r

    def total_steps(self, train_pairs: int, global_batch_size: int) -> int:
        """Optimizer steps of the run: max_steps if set, else num_epochs passes over `train_pairs`
        in steps of `global_batch_size` pairs (at least one), else DEFAULT_MAX_STEPS."""
        if self.max_steps is not None:
            return self.max_steps
        if self.num_epochs is not None:
            return max(1, self.num_epochs * train_pairs // global_batch_size)
        return DEFAULT_MAX_STEPS

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DPOConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> DPOConfig:
        """JSON or TOML file of DPOConfig fields."""
        return cls.from_dict(read_config_file(path))


DEFAULT_MAX_STEPS = 300  # the run's length when neither max_steps nor num_epochs is set

CHOICES = {
    "loss_reduction": ("mean", "sum"), "lr_scheduler": ("constant", "linear", "cosine"),
    "truncation_side": ("left", "right"), "precision": ("fp32", "bf16", "fp16"),
    "reference": ("model", "precomputed", "none"), "logps_impl": IMPLS,
    "parallel": ("none", "ddp", "fsdp2"),
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "optim": OPTIMIZERS,
    "report_to": ("none", "tensorboard", "trackio"),
}



ALL_LINEAR = "all-linear"  # lora_target_modules: peft's word for every linear layer but lm_head

# Fields that may change when a run is resumed: how long it runs and how often it logs, evaluates
# and saves, where its directory lives, where its metrics are reported and what model it exports.
# Every other field shapes the trajectory.
RESUMABLE_CHANGES = ("max_steps", "num_epochs", "logging_steps", "eval_steps", "save_steps",
                     "output_dir", "report_to", "save_model", "merge_lora")


def read_config_file(path: str | Path) -> dict:
    """The keys of a JSON, TOML or YAML config file, as a dict: DPOConfig fields (checked by
    DPOConfig.from_dict), or TRL's names (read by trl_config.split)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config {path}: cannot read it ({e})") from None
    if suffix == ".toml":
        import tomllib

        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config {path}: not valid TOML ({e})") from None
    elif suffix in (".yaml", ".yml"):

        d = read_yaml(text, path)
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path}: not valid JSON (line {e.lineno}: {e.msg}); the config "
                             f"file is JSON (.json), TOML (.toml) or YAML (.yaml, .yml)") from None
    if not isinstance(d, dict):
        raise ValueError(f"config {path}: expected a table of DPOConfig fields, got {type(d).__name__}")
    return d


def _check_type(name: str, hint, v) -> None:
    """Values from a JSON/TOML file arrive untyped: `learning_rate = "1e-3"` or
    `disable_dropout = "no"` must fail here, not run with a surprising meaning."""
    args = typing.get_args(hint)
    if type(None) in args:
        if v is None:
            return
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is list:
        (inner,) = typing.get_args(hint)
        if isinstance(v, list) and all(_is(inner, x) for x in v):
            return
        want = f"a list of {_WORDS[inner][1]}"
    elif _is(hint, v):
        return
    else:
        want = _WORDS[hint][0]
    none = " or none" if type(None) in args else ""
    raise ValueError(f"{name} must be {want}{none}, got {type(v).__name__} {v!r}")


_WORDS = {float: ("a number", "numbers"), int: ("an integer", "integers"),
          bool: ("a boolean (true/false)", "booleans"), str: ("a string", "strings")}


def _is(t: type, v) -> bool:
    if isinstance(v, bool):
        return t is bool
    if t is float:
        return isinstance(v, (int, float))
    return isinstance(v, t)


PRESETS = {
    # The failing run that started this project: batch 1, summed (not averaged) loss, beta 0.1,
    # long training with a learning rate that lets the margin run away, no clipping.
    "margin-explosion": dict(batch_size=1, gradient_accumulation_steps=1, loss_reduction="sum",
                             beta=0.1, learning_rate=3e-3, lr_scheduler="constant", warmup_steps=0,
                             max_grad_norm=None),
    # The same budget, fixed: a real batch and the loss averaged over it.
    "margin-explosion-fixed": dict(batch_size=16, loss_reduction="mean", beta=0.1,
                                   learning_rate=1e-3, lr_scheduler="cosine", max_grad_norm=1.0),
}


def read_yaml(text: str, path: str | Path):
    """A YAML config file's contents (the format `trl dpo --config` reads), by PyYAML's safe_load
    with two changes: `1e-6` is a float (YAML 1.2 and JSON read it so, YAML 1.1 wants `1.0e-6`,
    and TRL's parser turns it into one), and a key given twice is an error (PyYAML keeps the last).
    ValueError naming the file and the line."""
    try:
        import yaml
    except ImportError:
        raise ValueError(f"config {path}: reading YAML needs PyYAML: pip install pyyaml") from None
    try:
        d = yaml.load(text, Loader=_yaml_loader())
    except yaml.MarkedYAMLError as e:
        line = f"line {e.problem_mark.line + 1}: " if e.problem_mark is not None else ""
        raise ValueError(f"config {path}: not valid YAML ({line}{e.problem})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path}: not valid YAML ({e})") from None
    if d is None:
        raise ValueError(f"config {path}: the file holds no keys")
    return d


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first: dict = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in first:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} given twice (first on line {first[key]})",
                            key_node.start_mark)
                    first[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    exponent = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789"))
    return Loader
