"""DPOConfig: every option of the trainer, one flat dataclass (each field is a CLI flag)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..losses import check_loss_options


@dataclass
class DPOConfig:
    # loss
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    loss_reduction: str = "mean"  # "mean" over pairs (right) or "sum" (the failing preset)
    # optimisation
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 300
    num_epochs: int | None = None  # when set, overrides max_steps
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
    # health
    max_bad_steps: int = 3  # consecutive NaN/inf losses before training stops
    # outputs
    output_dir: str = "runs/default"
    logging_steps: int = 1
    eval_steps: int = 50
    save_steps: int = 100

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.validate()

    def validate(self) -> None:
        check_loss_options(self.loss_type, self.loss_weights, self.beta, self.label_smoothing,
                           "mean", self.rpo_alpha)
        choices = {
            "loss_reduction": ("mean", "sum"), "lr_scheduler": ("constant", "linear", "cosine"),
            "truncation_side": ("left", "right"), "precision": ("fp32", "bf16", "fp16"),
            "reference": ("model", "precomputed", "none"),
            "logps_impl": ("auto", "triton", "torch", "reference"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("batch_size", "gradient_accumulation_steps", "max_steps", "max_length",
                    "logging_steps", "eval_steps", "save_steps", "max_bad_steps")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs!r}")
        if self.reference == "none" and any(t not in ("simpo", "orpo", "sft") for t in self.loss_type):
            raise ValueError(f"reference='none' only works with reference-free losses, not {self.loss_type}")
        if max(self.warmup_steps, 0) != self.warmup_steps:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

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
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            return cls.from_dict(tomllib.loads(text))
        return cls.from_dict(json.loads(text))


PRESETS = {
    # The failing run that started this project: batch 1, summed (not averaged) loss, beta 0.1,
    # long training with a learning rate that lets the margin run away.
    "margin-explosion": dict(batch_size=1, gradient_accumulation_steps=1, loss_reduction="sum",
                             beta=0.1, learning_rate=3e-3, lr_scheduler="constant", warmup_steps=0,
                             max_grad_norm=1e9),
    # The same budget, fixed: a real batch and the loss averaged over it.
    "margin-explosion-fixed": dict(batch_size=16, loss_reduction="mean", beta=0.1,
                                   learning_rate=1e-3, lr_scheduler="cosine", max_grad_norm=1.0),
}

