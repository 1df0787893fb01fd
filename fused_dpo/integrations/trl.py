"""TRL 1.16 drop-in: its trainers compute every token log-prob with fused_dpo.

    import fused_dpo.integrations.trl as fused_trl

    fused_trl.patch()                 # before building the trainer (precomputed reference
    trainer = DPOTrainer(...)         # log-probs are computed in DPOTrainer.__init__)
    trainer.train()
    fused_trl.unpatch()               # TRL's own functions again

    with fused_trl.patched(impl="auto"):   # the same, scoped
        DPOTrainer(...).train()

Where TRL 1.16 computes log-probs (trl/trainer/utils.py), and what `patch()` replaces:

- The hidden-state path. `add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)`
  gives a model a forward that, called with `fused_lm_head=True`, runs the backbone and scores the
  labelled positions through the LM head with `_ChunkedLogProbFunction.apply(hidden, weight, bias,
  targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`, a module
  global read at every call. DPOTrainer adds this head to the policy and to the reference model
  unconditionally (there is no config flag: in 1.16 it is the only path), and scores through it the
  policy and reference passes of `_compute_loss` and the precomputed reference log-probs
  (`precompute_ref_log_probs`, via `compute_ref_log_probs`). GRPOTrainer, RLOOTrainer, KTOTrainer
  and SFTTrainer go through the same head, so they are covered by the same patch. We replace
  `trl.trainer.utils._ChunkedLogProbFunction` only: TRL's forward around it is kept as is, so the
  label shift, the `-100` mask and the compaction to the labelled rows, the FSDP2 `DTensor` head
  gathered once per call (`full_tensor()`), `cast_lm_head_to_fp32`, autocast and the forward's
  ZeRO-3 gather (`maybe_gather_lm_head_ctx`) are TRL's own code. The backward re-enters
  `maybe_gather_lm_head_ctx(weight, bias)` as TRL's does (a ZeRO-3 head is partitioned again by
  then; the gather is looked up in trl.trainer.utils at call time).
- The logits path. `selective_log_softmax(logits, index, temperature, row_mask)` and
  `selective_log_softmax_and_entropy(logits, index, entropy_requires_grad, temperature,
  row_mask)`. DPOTrainer and GRPOTrainer do not call them in 1.16; the experimental trainers do
  (CPO, ORPO, TPO, A2PO, SDFT, SDPO import them by name). They are replaced in trl.trainer.utils
  and in every loaded `trl.*` module that bound the same object, which is where those trainers
  look them up; a module imported while patched reads the patched name, and `unpatch()` restores
  every binding it finds in `trl.*` modules. Code outside TRL that bound the names itself
  (`from trl.trainer.utils import selective_log_softmax`) keeps what it bound: TRL's function if
  it was imported before `patch()`, fused_dpo's if imported while patched.

Why a patch and not a `DPOTrainer` subclass: the log-probs are computed in module-level code that
the trainers reach through TRL's own model forward, not in a trainer method. A subclass would have
to re-implement `_compute_loss`, `compute_ref_log_probs` and the precompute in `__init__` (a few
hundred lines that drift with every TRL release) or patch these same globals anyway, and it would
cover DPO only. The patch is one call for every trainer, `unpatch()` undoes it, and `check_trl()`
refuses a TRL whose names or signatures differ from 1.16's, so an upgrade fails loudly instead of
silently bypassing fused_dpo.

Contracts kept (TRL's -> ours):
- `temperature`, `final_logit_softcapping` (our `softcap`), `bias`, and which optional outputs
  are computed (`outputs`: entropy, log_sum_sq_probs, mean_logits, is_top1, as `stats=`); the
  returned 5-tuple has None for the ones not asked for; `is_top1` is bool as TRL returns it.
- `logit_scale` s (TRL: z = softcap(x * s) / T; fused_dpo has no such argument): without a
  softcap and with s > 0 it is folded into the temperature (T / s, free); otherwise (softcap, or
  s <= 0) the compacted hidden rows and the bias are multiplied by s before the head, one (N, H)
  copy, and autograd carries s into their gradients. In bf16 that rounds h * s to bf16 where TRL
  rounds the logits before scaling: a bf16-rounding-level difference. (With a softcap, folding s
  into the cap and temperature as the trainer's head does, `_common.fold_logit_scale`, saves the
  copy but was measured less exact here: d hidden 4.49e-6 from float64, over the 4.36e-6 that
  test_hidden_path_matches_trl[T0.8-cap5-scale3] allows (stock TRL's error plus a few fp32
  ulps), fp32, CPU.)
- The entropy carries a gradient (TRL's head returns it differentiable; DPO uses it detached,
  GRPO's entropy bonus does not); `entropy_requires_grad=False` on the logits path detaches it.
  A stat whose gradient never arrives costs nothing in the backward.
- Row masks skip rows (0 in both outputs) and are not weights: a float `row_mask` is used as
  `row_mask != 0`, as TRL does.
- Output dtype (a deliberate difference): log-probs and entropy are float32 for float32, bf16 and
  fp16 inputs, as TRL's own kernels (CUDA, and the fused head) return them; TRL's CPU fallback of
  `selective_log_softmax` / `selective_log_softmax_and_entropy` returns the input dtype, bf16 for
  bf16 logits. float32 is the more exact of the two (a bf16 log-prob carries ~3 significant
  digits); TRL's own `test_selective_log_softmax[float16]` / `[bfloat16]`, which assert the input
  dtype, fail patched for this reason alone. float64 inputs (tests) give float64, where TRL's
  hidden-state kernel would give float32.
- `backward(retain_graph=True)` and then another backward through the patched head work as in
  stock TRL (the gradients add up); the inner graph is freed with the head's node after a
  backward that does not retain it. Double backward (`create_graph=True`, then differentiating
  the gradient) is not supported by fused_dpo's ops and raises a RuntimeError saying so (stock
  TRL's head fails on `create_graph=True` already, in its `mm(..., out=)`).
- TRL's `chunk_size` (vocab columns per tile) is not used: fused_dpo picks its own
  (`patch(chunk_size=...)` overrides it).
- What fused_dpo does not take is left to TRL's original, counted as a fallback in
  `call_counts()`: `selective_log_softmax` with a top-K index (..., K), empty or 1-D logits, and
  an all-masked micro-batch on the hidden path (zero rows; TRL returns a differentiable empty
  result).

Not replaced: `entropy_from_logits` (an entropy, no log-prob) and direct calls of
`trl.kernels.*` (TRL's kernel namespace is left alone; the trainers do not look there).

Precomputed reference log-probs are cached by `datasets` under a fingerprint of the dataset and
the model's weights, not of the implementation: a cache written by an unpatched run is read back
by a patched one (they agree to float32 rounding).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import trl
import trl.trainer.utils as trl_utils
from trl.kernels import chunked_logprob as trl_chunked

from .. import get_logps, get_logps_from_hidden, token_logps_and_entropy
from .._common import ID_DTYPES, IMPLS, STATS

__all__ = ["call_counts", "check_trl", "is_patched", "patch", "patched", "unpatch"]

# The names replaced in trl.trainer.utils (and wherever a trl module bound the same object), and
# the parameters TRL 1.16 gives them: check_trl() refuses any other signature.
LOGITS_SIGNATURES = {
    "selective_log_softmax": ("logits", "index", "temperature", "row_mask"),
    "selective_log_softmax_and_entropy": ("logits", "index", "entropy_requires_grad",
                                          "temperature", "row_mask"),
}
HIDDEN_NAME = "_ChunkedLogProbFunction"
HIDDEN_SIGNATURE = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                    "final_logit_softcapping", "logit_scale", "outputs")
# Globals the fused_lm_head forward that add_fused_lm_head installs must read at call time
FORWARD_GLOBALS = (HIDDEN_NAME, "maybe_gather_lm_head_ctx")


@dataclass(frozen=True)
class _Options:
    impl: str = "auto"
    validate: bool = True
    chunk_size: int | None = None


_options = _Options()
_active = False
# What patch() found in trl.trainer.utils (TRL's functions unless another patcher came first); the
# fallbacks call these.
_originals: dict[str, object] = {name: getattr(trl_utils, name, None)
                                 for name in (*LOGITS_SIGNATURES, HIDDEN_NAME)}
_calls: Counter[str] = Counter()


# ---- the guard -----------------------------------------------------------------------------------

def _params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _nested_code(code, name: str):
    for const in code.co_consts:
        if inspect.iscode(const):
            if const.co_name == name:
                return const
            found = _nested_code(const, name)
            if found is not None:
                return found
    return None


def check_trl() -> None:
    """Raise RuntimeError, naming each difference, unless the installed TRL has every name that
    `patch()` replaces, with TRL 1.16's signatures, and its fused LM head still reads them."""
    problems = []
    for name, expected in LOGITS_SIGNATURES.items():
        fn = _originals[name] if _active else getattr(trl_utils, name, None)
        if not callable(fn):
            problems.append(f"trl.trainer.utils.{name} is missing")
        elif _params(fn) != expected:
            problems.append(f"trl.trainer.utils.{name} has parameters {_params(fn)}, expected {expected}")
    fn_cls = _originals[HIDDEN_NAME] if _active else getattr(trl_utils, HIDDEN_NAME, None)
    if not (isinstance(fn_cls, type) and issubclass(fn_cls, torch.autograd.Function)):
        problems.append(f"trl.trainer.utils.{HIDDEN_NAME} is missing or not an autograd.Function")
    elif _params(fn_cls.forward) != HIDDEN_SIGNATURE:
        problems.append(f"{HIDDEN_NAME}.forward has parameters {_params(fn_cls.forward)}, "
                        f"expected {HIDDEN_SIGNATURE}")
    if tuple(getattr(trl_chunked, "OPTIONAL_OUTPUTS", ())) != STATS:
        problems.append(f"trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS is "
                        f"{getattr(trl_chunked, 'OPTIONAL_OUTPUTS', None)}, expected {STATS}")
    add = getattr(trl_utils, "add_fused_lm_head", None)
    fwd = _nested_code(add.__code__, "_fused_forward") if callable(add) else None
    if fwd is None:
        problems.append("trl.trainer.utils.add_fused_lm_head (with its nested _fused_forward) is missing")
    else:
        for g in FORWARD_GLOBALS:
            if g not in fwd.co_names:
                problems.append(f"add_fused_lm_head's forward no longer reads the global {g}")
    if not callable(getattr(trl_utils, "maybe_gather_lm_head_ctx", None)):
        problems.append("trl.trainer.utils.maybe_gather_lm_head_ctx is missing")
    if problems:
        raise RuntimeError(
            f"fused_dpo.integrations.trl supports TRL 1.16; the installed trl {trl.__version__} "
            "differs where it patches:\n  " + "\n  ".join(problems))


# ---- the logits path -------------------------------------------------------------------------------

def _logits_fit(logits, index, row_mask) -> bool:
    """What get_logps takes: float logits (..., V) with V >= 1 and at least one row, one id per
    row, a row mask shaped like the ids."""
    return (isinstance(logits, torch.Tensor) and isinstance(index, torch.Tensor)
            and logits.dim() >= 2 and logits.numel() > 0 and logits.is_floating_point()
            and index.dtype in ID_DTYPES and tuple(index.shape) == tuple(logits.shape[:-1])
            and (row_mask is None or (isinstance(row_mask, torch.Tensor)
                                      and row_mask.shape == index.shape)))


def _skip_mask(row_mask):
    # TRL skips rows where the mask is 0 and does not weight the others; fused_dpo would weight
    return None if row_mask is None else row_mask != 0


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """`trl.trainer.utils.selective_log_softmax` computed by `fused_dpo.get_logps` (installed by
    `patch()`): log_softmax(logits / temperature) at `index`, (...) like index, 0 where
    row_mask == 0. float32 for bf16/fp16 logits, where TRL's CPU code returns the input dtype
    (see "Output dtype" in the module docstring)."""
    if not _logits_fit(logits, index, row_mask):
        _calls["fallback:selective_log_softmax"] += 1
        return _originals["selective_log_softmax"](logits, index, temperature, row_mask)
    _calls["selective_log_softmax"] += 1
    lead, V = tuple(index.shape), logits.shape[-1]
    x = logits if logits.dim() == 3 else logits.reshape(1, -1, V)
    mask = _skip_mask(row_mask)
    out = get_logps(x, index.reshape(x.shape[:2]),
                    None if mask is None else mask.reshape(x.shape[:2]), shift=False,
                    reduction="none", temperature=temperature, impl=_options.impl,
                    validate=_options.validate)
    return out.reshape(lead)


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
                                      row_mask=None):
    """`trl.trainer.utils.selective_log_softmax_and_entropy` computed by
    `fused_dpo.token_logps_and_entropy` (installed by `patch()`); float32 for bf16/fp16 logits,
    as `selective_log_softmax`."""
    if not _logits_fit(logits, index, row_mask):
        _calls["fallback:selective_log_softmax_and_entropy"] += 1
        return _originals["selective_log_softmax_and_entropy"](logits, index, entropy_requires_grad,
                                                               temperature, row_mask)
    _calls["selective_log_softmax_and_entropy"] += 1
    return token_logps_and_entropy(logits, index, entropy_requires_grad, temperature,
                                   _skip_mask(row_mask), impl=_options.impl,
                                   validate=_options.validate)


# ---- the hidden-state path -------------------------------------------------------------------------

def _score_rows(hidden, weight, bias, targets, temperature, softcap, logit_scale, stats,
                entropy_grad):
    """(log-probs (N,), {stat: (N,)}) of N aligned rows: z = softcap(h W^T + b) * s) / T."""
    if logit_scale != 1:
        if softcap is None and logit_scale > 0:
            temperature = temperature / logit_scale
        else:
            hidden = hidden * logit_scale
            bias = None if bias is None else bias * logit_scale
    out = get_logps_from_hidden(hidden[None], weight, targets[None], bias=bias, shift=False,
                                reduction="none", temperature=temperature, softcap=softcap,
                                impl=_options.impl, chunk_size=_options.chunk_size,
                                validate=_options.validate, stats=stats or None,
                                entropy_grad=entropy_grad)
    if not stats:
        return out[0], {}
    return out.logps[0], {name: getattr(out, name)[0] for name in stats}


def _trl_tuple(logps, vals):
    """TRL's (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), None where not asked."""
    if "is_top1" in vals:
        vals = {**vals, "is_top1": vals["is_top1"] > 0.5}
    return (logps, *(vals.get(name) for name in STATS))


class _GatherHeadInBackward(torch.autograd.Function):
    """fused_dpo's hidden-state op, run under a node whose backward re-enters TRL's ZeRO-3 gather
    of the head (a partitioned weight is empty again by the time the backward runs), as TRL's
    ChunkedLogProbFunction does. The op's graph is built inside the forward on the head itself
    (not a detached alias, which would keep the gathered weight alive until the backward) and
    differentiated with torch.autograd.grad.

    The inner graph lives in this node's saved tensors (its outputs and the hidden-state leaf,
    not ctx attributes), so autograd decides its lifetime: freed with this node's saved tensors
    after a backward, kept by `backward(retain_graph=True)` for another one (TRL's head supports
    both)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, stats):
        h = hidden.detach().requires_grad_(hidden.requires_grad)
        with torch.enable_grad():
            logps, vals = _score_rows(h, weight, bias, targets, temperature, softcap, logit_scale,
                                      stats, entropy_grad="entropy" in stats)
        ctx.save_for_backward(h, logps, vals.get("entropy"))
        ctx.head = (weight, bias)
        ctx.set_materialize_grads(False)
        out = _trl_tuple(logps.detach(), {k: v.detach() for k, v in vals.items()})
        ctx.mark_non_differentiable(*(t for t in out[2:] if t is not None))
        return out

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_):
        h, logps, entropy = ctx.saved_tensors  # raises once freed (a second backward without
        weight, bias = ctx.head                # retain_graph), as any autograd node does
        outs, grads = [], []
        if grad_logps is not None:
            outs.append(logps)
            grads.append(grad_logps)
        if grad_entropy is not None and entropy is not None:
            outs.append(entropy)
            grads.append(grad_entropy)
        wanted = [(i, t) for i, t in enumerate((h, weight, bias)) if ctx.needs_input_grad[i]]
        result = [None, None, None]
        if outs and wanted:
            # looked up at call time, as TRL's backward does (and tests can stand in for ZeRO-3);
            # retain_graph: the inner graph is freed with this node's saved tensors;
            # create_graph as the outer backward's, so that differentiating these gradients
            # again reaches fused_dpo's clear error rather than treating them as constants
            with trl_utils.maybe_gather_lm_head_ctx(weight, bias):
                got = torch.autograd.grad(outs, [t for _, t in wanted], grads, allow_unused=True,
                                          retain_graph=True, create_graph=torch.is_grad_enabled())
            for (i, _t), g in zip(wanted, got, strict=True):
                result[i] = g
        return (*result, None, None, None, None, None)


class FusedChunkedLogProb:
    """Stands in for `trl.trainer.utils._ChunkedLogProbFunction` while patched: `apply` takes
    TRL 1.16's arguments and returns its 5-tuple, computed by `fused_dpo.get_logps_from_hidden`
    on the (N, H) rows TRL hands over (already shifted, compacted on CUDA, the head gathered)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=STATS):
        unknown = [o for o in outputs if o != "log_probs" and o not in STATS]
        if unknown:
            raise ValueError(f"fused_dpo.integrations.trl: unknown outputs {unknown}; fused_dpo "
                             f"computes 'log_probs' and {STATS}")
        if hidden.shape[0] == 0:  # an all-masked micro-batch: TRL's differentiable empty result
            _calls["fallback:chunked_logprob"] += 1
            return _originals[HIDDEN_NAME].apply(hidden, weight, bias, targets, temperature,
                                                 chunk_size, final_logit_softcapping, logit_scale,
                                                 outputs)
        _calls["chunked_logprob"] += 1
        stats = tuple(name for name in STATS if name in outputs)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        if not needs_grad:  # reference passes and precompute: no graph, no gather in a backward
            return _trl_tuple(*_score_rows(hidden, weight, bias, targets, temperature,
                                           final_logit_softcapping, logit_scale, stats, False))
        return _GatherHeadInBackward.apply(hidden, weight, bias, targets, temperature,
                                           final_logit_softcapping, logit_scale, stats)


# ---- patch / unpatch ---------------------------------------------------------------------------

_REPLACEMENTS = {
    "selective_log_softmax": selective_log_softmax,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    HIDDEN_NAME: FusedChunkedLogProb,
}


def _trl_modules() -> list:
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "trl" or name.startswith("trl."))]


def patch(*, impl: str = "auto", validate: bool = True, chunk_size: int | None = None) -> None:
    """Make TRL 1.16's trainers compute their log-probs with fused_dpo (see the module docstring
    for what is replaced). Call it before constructing the trainer.

    Args:
        impl: fused_dpo's implementation, as in `get_logps` ("auto": Triton on CUDA, else the
            chunked PyTorch rows).
        validate: check that every scored label id is in [0, V) (a clear ValueError; one host
            sync per call). False: no sync, an out-of-range id gives NaN.
        chunk_size: vocab columns per chunk on the hidden-state path (default: fused_dpo's
            rule, one (rows, chunk) block near 256 MiB).

    Raises:
        RuntimeError: already patched, or the installed TRL differs from 1.16 where this patches.
    """
    global _options, _active
    if _active:
        raise RuntimeError("fused_dpo.integrations.trl is already patched; call unpatch() first")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    check_trl()
    for name in _REPLACEMENTS:
        _originals[name] = getattr(trl_utils, name)
    _options = _Options(impl, bool(validate), chunk_size)
    _calls.clear()
    for module in _trl_modules():
        for name, new in _REPLACEMENTS.items():
            if module.__dict__.get(name) is _originals[name]:
                setattr(module, name, new)
    _active = True


def unpatch() -> None:
    """Restore TRL's functions in every trl module bound to a replacement (no-op if not patched)."""
    global _active
    for module in _trl_modules():
        for name, new in _REPLACEMENTS.items():
            if module.__dict__.get(name) is new:
                setattr(module, name, _originals[name])
    _active = False


def is_patched() -> bool:
    return _active


@contextlib.contextmanager
def patched(*, impl: str = "auto", validate: bool = True,
            chunk_size: int | None = None) -> Iterator[None]:
    """`patch(...)` for the duration of a `with` block, `unpatch()` on the way out."""
    patch(impl=impl, validate=validate, chunk_size=chunk_size)
    try:
        yield
    finally:
        unpatch()


def call_counts() -> dict[str, int]:
    """Calls of each replacement since the last `patch()`; `fallback:<name>` counts the calls
    handed to TRL's original (inputs fused_dpo does not take)."""
    return dict(_calls)
