"""The transformers side of the trainer: per-sequence log-probs (and, on request, per-token
statistics) of a causal LM through its hidden states and lm_head (`LogpsHead`), and switching
dropout off (`disable_dropout`)."""

from __future__ import annotations

import warnings

import torch

from .. import LogpsStats, get_logps, get_logps_from_hidden
from .._common import fold_logit_scale


def logit_scale(cfg) -> tuple[float | None, str]:
    """(s, where it came from): the factor a transformers CausalLM multiplies its logits by after
    the lm_head (before a final softcap), read from the text config in TRL 1.16's order
    (`add_fused_lm_head`): Cohere's `logit_scale`, Muse's `output_multiplier`, Falcon-H1's
    `lm_head_multiplier`, then `logits_scaling` (HyperCLOVA X multiplies by it; Granite and MiniCPM3
    divide). 1.0 when there is none (MPT's `logit_scale` is not applied by transformers' MPT);
    None when the value is not a number (the hidden path cannot reproduce it)."""
    if getattr(cfg, "model_type", None) == "mpt":
        return 1.0, ""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = getattr(cfg, name, None)
        if v is not None:
            return (float(v) if _is_number(v) else None), f"{name}={v!r}"
    v = getattr(cfg, "logits_scaling", None)
    if v is None:
        return 1.0, ""
    if not _is_number(v):
        return None, f"logits_scaling={v!r}"
    if getattr(cfg, "model_type", None) == "hyperclovax":
        return float(v), f"logits_scaling={v!r} (multiplied)"
    return 1.0 / float(v), f"logits_scaling={v!r} (divided)"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout, module or functional (HF attention reads `attention_dropout`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for k, v in list(vars(cfg).items()):
            if "dropout" in k and isinstance(v, float):
                setattr(cfg, k, 0.0)


class LogpsHead:
    """Per-sequence response log-probs of a causal LM through its final hidden states and lm_head
    (no full logits). A model the hidden path cannot reproduce falls back to the model's own
    logits, with one warning that says why (`fallback`): a head that is not exactly a
    `torch.nn.Linear` (a custom or adapter-wrapped head), no base model to read the hidden states
    from, or logits both rescaled and soft-capped (the model's order of the two is not known here).

    `stats` names the per-token statistics of `get_logps` to compute in the same pass (e.g.
    ("entropy", "mean_logits", "is_top1")), each summed over the response tokens like the
    log-probs and detached; none by default (a reference model needs only its log-probs).
    `warn=False` keeps the fallback silent (a second head on the same model)."""

    def __init__(self, model, impl: str, stats: tuple[str, ...] = (), warn: bool = True):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{type(model).__name__} has no lm_head (get_output_embeddings() is None);"
                             " DPO needs a causal language model")
        self.model, self.head, self.impl, self.stats = model, head, impl, tuple(stats)
        prefix = getattr(model, "base_model_prefix", "model")
        self.base = getattr(model, prefix, None)
        # Multimodal models keep the text model's scale and softcap on their text config.
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cap = getattr(cfg, "final_logit_softcapping", None) or None
        scale, where = logit_scale(cfg)
        folded = fold_logit_scale(scale, 1.0, cap)  # the scale as a temperature and a cap
        self.temperature, self.softcap = folded if folded is not None else (1.0, cap)
        if type(head) is not torch.nn.Linear:
            self.fallback = (f"its lm_head is {type(head).__module__}.{type(head).__qualname__}, not a "
                             f"plain torch.nn.Linear")
        elif self.base is None:
            self.fallback = f"it has no base model at .{prefix} to read the final hidden states from"
        elif folded is None:
            self.fallback = f"its logit scale ({where}) is not a positive number"
        else:
            self.fallback = None
        self.fused = self.fallback is None
        if self.fallback and warn:
            warnings.warn(f"{type(model).__name__}: log-probs from the full logits, not the hidden "
                          f"path (more memory): {self.fallback}", stacklevel=2)

    def __call__(self, batch) -> LogpsStats:
        """LogpsStats of the [chosen; rejected] batch: log-probs, response token counts and the
        requested statistics, each (2B,) and summed over the response; the others None."""
        kw = dict(impl=self.impl, return_counts=True, validate=False, reduction="sum",
                  stats=self.stats or None)
        if self.fused:
            hidden = self.base(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).last_hidden_state
            # The head's own parameters, whatever their dtype: an fp32 master weight under bf16
            # hidden states is cast a vocab chunk at a time inside, never copied whole.
            out = get_logps_from_hidden(hidden, self.head.weight, batch["input_ids"],
                                        batch["response_mask"], bias=self.head.bias,
                                        softcap=self.softcap, temperature=self.temperature, **kw)
        else:
            # The model's logits already hold its soft-cap and scale: applied as they are.
            logits = self.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
            out = get_logps(logits, batch["input_ids"], batch["response_mask"], **kw)
        # Without stats the functions return (logps, counts); one return type for the caller.
        return out if self.stats else LogpsStats(*out, None, None, None, None)
