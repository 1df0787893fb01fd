"""The transformers side of the trainer: per-sequence log-probs (and, on request, per-token
statistics) of a causal LM through its hidden states and lm_head (`LogpsHead`), and switching
dropout off (`disable_dropout`)."""

from __future__ import annotations

import torch

from .. import LogpsStats, get_logps, get_logps_from_hidden


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
    (no full logits), falling back to logits when the head is not a plain linear layer.

    `stats` names the per-token statistics of `get_logps` to compute in the same pass (e.g.
    ("entropy", "mean_logits", "is_top1")), each summed over the response tokens like the
    log-probs and detached; none by default (a reference model needs only its log-probs)."""

    def __init__(self, model, impl: str, stats: tuple[str, ...] = ()):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{type(model).__name__} has no lm_head (get_output_embeddings() is None);"
                             " DPO needs a causal language model")
        self.model, self.head, self.impl, self.stats = model, head, impl, tuple(stats)
        self.base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None) or None
        scale = getattr(cfg, "logit_scale", None)
        self.temperature = 1.0 / scale if scale else 1.0
        self.fused = isinstance(head, torch.nn.Linear) and self.base is not None

    def __call__(self, batch) -> LogpsStats:
        """LogpsStats of the [chosen; rejected] batch: log-probs, response token counts and the
        requested statistics, each (2B,) and summed over the response; the others None."""
        kw = dict(impl=self.impl, softcap=self.softcap, temperature=self.temperature,
                  return_counts=True, validate=False, reduction="sum", stats=self.stats or None)
        if self.fused:
            hidden = self.base(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).last_hidden_state
            # The head's own parameters, whatever their dtype: an fp32 master weight under bf16
            # hidden states is cast a vocab chunk at a time inside, never copied whole.
            out = get_logps_from_hidden(hidden, self.head.weight, batch["input_ids"],
                                        batch["response_mask"], bias=self.head.bias, **kw)
        else:
            logits = self.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
            out = get_logps(logits, batch["input_ids"], batch["response_mask"], **kw)
        # Without stats the functions return (logps, counts); one return type for the caller.
        return out if self.stats else LogpsStats(*out, None, None, None, None)
