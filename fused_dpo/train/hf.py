"""The transformers side of the trainer: per-sequence log-probs (and, on request, per-token
statistics) of a causal LM through its hidden states and lm_head (`LogpsHead`), switching
dropout off (`disable_dropout`), and the probes that refuse a model the trainer cannot train
correctly (`check_causal`, `check_packing`)."""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch

from .. import LogpsStats, get_logps, get_logps_from_hidden
from .._common import fold_logit_scale
from .data import packing


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
    `warn=False` keeps the fallback silent (a second head on the same model).

    `packed=True` (padding-free): the batch is one packed row (`data.collate_packed`), whose
    attention_mask holds each token's sequence number; the model runs on the row with position_ids
    that restart at 0 for each sequence and no attention mask (transformers then masks attention
    per sequence), and the log-probs are reduced per sequence (`cu_seqlens`). A model whose packed
    forward is not the forward of each sequence alone is refused at construction (`check_packing`).
    """

    def __init__(self, model, impl: str, stats: tuple[str, ...] = (), warn: bool = True,
                 packed: bool = False):
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
        self.packed = packed
        if packed:
            check_packing(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The final hidden states (hidden path) or the logits (fallback) of the model. With
        position_ids and no attention_mask: a packed row, and no KV cache (transformers looks for
        packed sequences only without one)."""
        kw = dict(input_ids=input_ids, attention_mask=attention_mask)
        if position_ids is not None:
            kw.update(position_ids=position_ids, use_cache=False)
        if self.fused:
            return self.base(**kw).last_hidden_state
        return self.model(**kw).logits

    def __call__(self, batch) -> LogpsStats:
        """LogpsStats of the [chosen; rejected] batch: log-probs, response token counts and the
        requested statistics, each (2B,) and summed over the response; the others None."""
        kw = dict(impl=self.impl, return_counts=True, validate=False, reduction="sum",
                  stats=self.stats or None)
        if self.packed:
            position_ids, kw["cu_seqlens"] = packing(batch["attention_mask"])
            rows = self.forward(batch["input_ids"], position_ids=position_ids)
        else:
            rows = self.forward(batch["input_ids"], batch["attention_mask"])
        if self.fused:
            # The head's own parameters, whatever their dtype: an fp32 master weight under bf16
            # hidden states is cast a vocab chunk at a time inside, never copied whole.
            out = get_logps_from_hidden(rows, self.head.weight, batch["input_ids"],
                                        batch["response_mask"], bias=self.head.bias,
                                        softcap=self.softcap, temperature=self.temperature, **kw)
        else:
            # The model's logits already hold its soft-cap and scale: applied as they are.
            out = get_logps(rows, batch["input_ids"], batch["response_mask"], **kw)
        # Without stats the functions return (logps, counts); one return type for the caller.
        return out if self.stats else LogpsStats(*out, None, None, None, None)


@contextlib.contextmanager
def _probing(model: torch.nn.Module):
    """A probe's forwards: eval mode (no dropout), no autograd, each module's mode restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


# check_causal's probe: CAUSAL_PREFIX tokens kept, CAUSAL_TAIL after them replaced.
CAUSAL_PREFIX, CAUSAL_TAIL = 6, 4


def check_causal(model: torch.nn.Module, what: str = "") -> None:
    """Refuse (ValueError) a model whose logits at a position depend on the tokens after it: DPO
    scores each response token from the tokens before it, and a model that sees the target
    token scores it trivially. AutoModelForCausalLM accepts such models: BertLMHeadModel (and the
    RoBERTa, Electra, XLM-R... ones) attend in both directions unless their config says
    `is_decoder: true`, and transformers only logs a warning. The config cannot settle it (GPT-NeoX
    has `is_decoder` false and is causal), so a probe through the model's own logits: two
    sequences that share their first CAUSAL_PREFIX tokens must have the same logits there. Two
    forwards of CAUSAL_PREFIX + CAUSAL_TAIL tokens, in eval mode. `what` names the model in the
    message (e.g. its path)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = what or type(model).__name__
    V = model.get_input_embeddings().weight.shape[0]
    dev = model.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    a = torch.randint(V, (1, CAUSAL_PREFIX + CAUSAL_TAIL), generator=g)
    b = a.clone()
    b[:, CAUSAL_PREFIX:] = (a[:, CAUSAL_PREFIX:] + 1 + torch.randint(V - 1, (1, CAUSAL_TAIL),
                                                                     generator=g)) % V  # all differ
    try:
        with _probing(model):
            la, lb = (model(input_ids=x.to(dev), attention_mask=torch.ones_like(x).to(dev))
                      .logits[:, :CAUSAL_PREFIX].float() for x in (a, b))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: its forward on input_ids and attention_mask failed: {e}") from e
    moved = float((la - lb).abs().max() / la.abs().max().clamp_min(1e-30))
    # A causal model gives exactly 0 (masked keys add exact zeros; same shapes, same kernels);
    # BERT with is_decoder false moves its logits by about 1 of their scale.
    if not moved <= 1e-4:
        hint = ""
        if getattr(cfg, "is_decoder", None) is False:
            hint = (f" Its config has is_decoder false, with which {type(model).__name__} attends "
                    f"in both directions: a masked-LM (BERT-style) checkpoint is not a causal LM.")
        raise ValueError(f"{name} ({type(model).__name__}, model_type "
                         f"{getattr(cfg, 'model_type', '?')!r}) is not a causal language model: its "
                         f"logits at a position change by {moved:.2g} of their scale when a later "
                         f"token changes, so it sees the token it is scored on.{hint}")


# check_packing's probe: a sequence of PROBE_TAIL tokens packed after one of PROBE_HEAD (long, so
# that attention leaking into it moves the tail's hidden states a lot).
PROBE_HEAD, PROBE_TAIL = 24, 5


def check_packing(head: LogpsHead) -> None:
    """Refuse (ValueError) a model whose packed forward differs from the forward of each sequence
    alone. transformers 5 finds packed sequences from position_ids that restart at 0 and masks
    attention per sequence (masking_utils.find_packed_sequence_indices for eager/sdpa/flex, varlen
    for flash-attention), but only in models that pass position_ids to its mask functions: OPT,
    Bloom and MPT build their own positions or masks, and recurrent models (Mamba, RecurrentGemma)
    carry their state across the boundary. A forward without a position_ids argument is refused
    outright; rather than a list of the rest that goes stale, a probe through the head's own
    forward: a sequence C packed after A must (1) not change when A is replaced by other tokens,
    (2) equal C run alone. Three forwards of at most 29 tokens, in eval mode."""
    model = head.model
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    what = (f"padding_free: model_type {getattr(cfg, 'model_type', '?')!r} with attn_implementation "
            f"{getattr(model.config, '_attn_implementation', None)!r}")
    module = head.base if head.fused else head.model
    if "position_ids" not in inspect.signature(module.forward).parameters:
        # Bloom, MPT, Mamba: nothing tells them where a sequence starts.
        raise ValueError(f"{what} cannot mask packed sequences: {type(module).__name__}"
                         f".forward takes no position_ids, from which transformers finds the "
                         f"sequence boundaries. {_WITHOUT}")
    g = torch.Generator().manual_seed(0)
    V, dev = head.head.weight.shape[0], head.head.weight.device
    a, a2 = (torch.randint(V, (1, PROBE_HEAD), generator=g).to(dev) for _ in range(2))
    c = torch.randint(V, (1, PROBE_TAIL), generator=g).to(dev)
    pos = torch.cat([torch.arange(PROBE_HEAD), torch.arange(PROBE_TAIL)])[None].to(dev)
    try:
        with _probing(model):
            alone = head.forward(c, torch.ones_like(c))
            tail = [head.forward(torch.cat([x, c], 1), position_ids=pos)[:, PROBE_HEAD:].float()
                    for x in (a, a2)]
            low = alone.dtype in (torch.float16, torch.bfloat16)
            alone = alone.float()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: its forward on a packed row (position_ids, no attention_mask) "
                         f"failed: {e}") from e
    scale = alone.abs().max().clamp_min(1e-30)
    leak = float((tail[0] - tail[1]).abs().max() / scale)
    apart = float((tail[0] - alone).abs().max() / scale)
    # Correct masking gives leak == 0 exactly, in fp32, bf16 and fp16 (same shapes; masked keys
    # add exact zeros), and `apart` at rounding level (about 1e-7 in fp32 on Llama, Qwen2,
    # Mistral, Gemma2, GPT-2, GPT-NeoX, Falcon, Phi-3, GPT-J, eager and sdpa); OPT and
    # RecurrentGemma give 0.1 to 0.3 (transformers 5.24, random tiny models).
    if leak > 1e-3 or apart > (2e-2 if low else 1e-4):
        raise ValueError(f"{what} cannot mask packed sequences: a sequence packed after another "
                         f"does not equal the sequence alone (its hidden states move by {leak:.2g} "
                         f"of their scale when the sequence before it changes, and differ by "
                         f"{apart:.2g} from the sequence run alone). {_WITHOUT}")


_WITHOUT = ("Train it with padded batches (padding_free false), or with an attn_implementation that "
            "masks packed position_ids")


def module_name(model: torch.nn.Module, module) -> str | None:
    """The name of `module` inside `model` (named_modules), or None when it is not one of them."""
    return next((n for n, m in model.named_modules() if m is module), None)


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """transformers' progress bars on or off for the block, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    off = hf_logging.is_progress_bar_enabled() and not enabled
    if off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if off:
            hf_logging.enable_progress_bar()
