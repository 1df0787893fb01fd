"""The transformers side of the trainer: per-sequence log-probs (and, on request, per-token
statistics) of a causal LM through its hidden states and lm_head (`LogpsHead`), and switching
dropout off (`disable_dropout`)."""

from __future__ import annotations

import warnings

import torch

from .. import LogpsStats, get_logps, get_logps_from_hidden

# Config attributes by which a transformers CausalLM rescales its logits after the lm_head:
# (name, True when the logits are multiplied by it, False when divided). The hidden path takes a
# rescaling as its temperature: Cohere's `logit_scale`, Granite's `logits_scaling`, Muse's
# `output_multiplier`.
LOGIT_SCALES = (("logit_scale", True), ("logits_scaling", False), ("output_multiplier", True))


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
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None) or None
        scales = {name: v for name, mul in LOGIT_SCALES
                  if (v := getattr(cfg, name, None)) is not None and v != 1}
        multiplier = 1.0
        for name, mul in LOGIT_SCALES:
            if name in scales:
                multiplier = multiplier * scales[name] if mul else multiplier / scales[name]
        self.temperature = 1.0 / multiplier
        if type(head) is not torch.nn.Linear:
            self.fallback = (f"its lm_head is {type(head).__module__}.{type(head).__qualname__}, not a "
                             f"plain torch.nn.Linear")
        elif self.base is None:
            self.fallback = f"it has no base model at .{prefix} to read the final hidden states from"
        elif scales and self.softcap is not None:
            self.fallback = (f"its logits are rescaled ({', '.join(f'{k}={v}' for k, v in scales.items())}) "
                             f"and soft-capped (final_logit_softcapping={self.softcap}), in an order "
                             f"the hidden path does not know")
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
