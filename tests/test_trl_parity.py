"""Parity with TRL 1.16's RL kernels and DPO losses on the same inputs (CPU).

- `token_logps_and_entropy` against `trl.trainer.utils.selective_log_softmax_and_entropy`
  (the torch fallback TRL takes on the CPU): log-probs, entropy and the logits gradient of
  (logps * a).sum() + (entropy * b).sum(), with and without a row mask, temperature != 1.
- `token_logps_and_entropy_from_hidden` and `get_logps_from_hidden(shift=False,
  reduction="none", stats=<all four>)` against `trl.kernels.ChunkedLogProbFunction` (its torch
  tiles on the CPU): log-probs, entropy, log sum p^2, mean logit, top-1, and the gradients w.r.t.
  hidden, weight and bias; with a row mask, TRL gets the compacted rows, as its fused_lm_head patch
  passes them.
- `dpo_loss` against `trl.trainer.dpo_trainer.DPOTrainer._compute_loss` itself, run unbound on a
  stand-in trainer and model that return given per-token log-probs (float64): every TRL loss type,
  MPO combinations, RPO, with and without WPO weighting; the loss and its gradient w.r.t. each
  response token's log-prob, to 1e-12.

For the kernels the rule is the project's (tests/helpers.py): with float64 truth from `fused_dpo.reference`,
|ours - truth| <= |TRL - truth| + tol, tol a few float32 ulps of the largest value (the fp32 rule
of tests/test_hidden.py); and ours within float32 precision of TRL directly.

CI installs trl (the `test` extra pins trl==1.16.*); the importorskip only guards a checkout
installed without it.
"""

import pytest
import torch
from helpers import assert_close_to_truth

pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")
trl_kernels = pytest.importorskip("trl.kernels")

from fused_dpo import (  # noqa: E402  (after the importorskip guard)
    get_logps_from_hidden,
    token_logps_and_entropy,
    token_logps_and_entropy_from_hidden,
)
from fused_dpo._common import STATS  # noqa: E402
from fused_dpo.reference import get_logps_from_hidden_reference, get_logps_reference  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _check(ours, trl, truth, what):
    """Ours is as close to float64 truth as TRL is, within a few fp32 ulps, and close to TRL."""
    truth = truth.detach().double()
    tol = 4 * EPS32 * truth.abs().max().item() + 1e-6
    assert_close_to_truth(ours, trl, truth, tol, what)
    torch.testing.assert_close(ours.detach().double(), trl.detach().double(), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{what}: ours vs TRL: {m}")


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


def _logits_case(shape, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    idx = torch.randint(0, V, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    return x, idx, mask


def _run_logits(fn, x64, idx, mask, temperature, a, b, entropy_requires_grad, dtype):
    """(logps, entropy, d logits) of (logps * a).sum() + (entropy * b).sum() (the entropy term
    only when it carries a gradient)."""
    x = x64.to(dtype).requires_grad_(True)
    lp, ent = fn(x, idx, entropy_requires_grad, temperature, mask)
    loss = (lp * a.to(lp.dtype)).sum()
    if entropy_requires_grad:
        loss = loss + (ent * b.to(ent.dtype)).sum()
    loss.backward()
    return lp.detach(), ent, x.grad


def _truth_logits(x, idx, entropy_requires_grad, temperature, row_mask):
    """float64 truth in TRL's signature, from the eager reference (any leading shape)."""
    lead = idx.shape
    x3, i2 = x.reshape(1, -1, x.shape[-1]), idx.reshape(1, -1)
    m2 = row_mask.reshape(1, -1) if row_mask is not None else None
    out = get_logps_reference(x3, i2, m2, shift=False, reduction="none", temperature=temperature,
                              stats=("entropy",), entropy_grad=entropy_requires_grad)
    return out.logps.reshape(lead), out.entropy.reshape(lead)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "rowmask"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("entropy_grad", [True, False], ids=["entgrad", "entdetached"])
@pytest.mark.parametrize("lead", [(3, 17), (29,)], ids=["B3-T17", "N29"])
def test_token_logps_and_entropy_matches_trl(lead, entropy_grad, temperature, masked):
    V = 123
    x, idx, mask = _logits_case(lead, V)
    mask = mask if masked else None
    a, b = _weights(lead, 1)
    trl_fn = trl_utils.selective_log_softmax_and_entropy
    ours = _run_logits(token_logps_and_entropy, x, idx, mask, temperature, a, b, entropy_grad,
                       torch.float32)
    trl = _run_logits(trl_fn, x, idx, mask, temperature, a, b, entropy_grad, torch.float32)
    truth = _run_logits(_truth_logits, x, idx, mask, temperature, a, b, entropy_grad, torch.float64)
    for name, o, t, tr in zip(("logps", "entropy", "d logits"), ours, trl, truth, strict=True):
        assert o.dtype == torch.float32 and o.shape == t.shape, (name, o.dtype, o.shape, t.shape)
        _check(o, t, tr, name)
    # entropy_requires_grad=False: detached in both, as TRL returns it
    assert ours[1].requires_grad == trl[1].requires_grad == entropy_grad
    if masked:
        off = ~mask
        for name, o in zip(("logps", "entropy"), ours[:2], strict=True):
            assert (o[off] == 0).all(), f"{name} nonzero off the row mask"
        assert (ours[2][off] == 0).all(), "gradient nonzero off the row mask"


def _hidden_case(N, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (3 / H**0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    idx = torch.randint(0, V, (N,), generator=g)
    # every third target is the row's argmax, so is_top1 has both values
    top = torch.nn.functional.linear(h, w, bias).argmax(-1)
    idx[::3] = top[::3]
    return h, w, bias, idx


# TRL's names for the optional outputs, in the order it returns them after the log-probs
TRL_OUTPUTS = trl_kernels.chunked_logprob.OPTIONAL_OUTPUTS
NAMES = ("logps", *TRL_OUTPUTS)
CHUNK = 32  # vocab columns per chunk in both: 4 chunks of V=123, the last one partial


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (0.8, 5.0)],
                         ids=["T1", "T0.7", "T0.8-softcap5"])
@pytest.mark.parametrize("masked", [False, True], ids=["allrows", "rowmask"])
def test_hidden_matches_trl_chunked(temperature, softcap, masked):
    B, T, H, V = 2, 19, 16, 123
    h64, w64, b64, idx = _hidden_case(B * T, H, V)
    h64 = h64.view(B, T, H)
    idx = idx.view(B, T)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(B, T, generator=g) > 0.3) if masked else torch.ones(B, T, dtype=torch.bool)
    a, b = _weights((B, T), 2)
    kw = dict(temperature=temperature, softcap=softcap)

    def leaves(dtype):
        return [t.to(dtype).requires_grad_(True) for t in (h64, w64, b64)]

    def backward(lp, ent, ls):
        ((lp * a.to(lp.dtype)).sum() + (ent * b.to(ent.dtype)).sum()).backward()
        return [t.grad for t in ls]

    # TRL: the scored rows compacted (as its fused_lm_head patch passes them), scattered back
    ls = leaves(torch.float32)
    outs = trl_kernels.ChunkedLogProbFunction.apply(ls[0][mask], ls[1], ls[2], idx[mask], temperature,
                                                    CHUNK, softcap, 1.0, TRL_OUTPUTS)
    trl = {n: torch.zeros((B, T), dtype=o.dtype).masked_scatter(mask, o)
           for n, o in zip(NAMES, outs, strict=True)}
    trl_grads = backward(trl["logps"], trl["entropy"], ls)

    ls = leaves(torch.float32)
    out = get_logps_from_hidden(ls[0], ls[1], idx, mask, bias=ls[2], shift=False, reduction="none",
                                stats=STATS, entropy_grad=True, chunk_size=CHUNK, **kw)
    ours = {n: getattr(out, n) for n in NAMES}
    ours_grads = backward(ours["logps"], ours["entropy"], ls)

    ls = leaves(torch.float32)
    tok = token_logps_and_entropy_from_hidden(ls[0], ls[1], idx, True, temperature, mask, bias=ls[2],
                                              softcap=softcap, chunk_size=CHUNK)
    tok = dict(zip(("logps", "entropy"), tok, strict=True))
    tok_grads = backward(tok["logps"], tok["entropy"], ls)

    ls = leaves(torch.float64)
    out = get_logps_from_hidden_reference(ls[0], ls[1], idx, mask, bias=ls[2], shift=False,
                                          reduction="none", stats=STATS, entropy_grad=True, **kw)
    truth = {n: getattr(out, n) for n in NAMES}
    truth_grads = backward(truth["logps"], truth["entropy"], ls)

    # TRL's is_top1 is bool, ours 0/1 in float32 (token-weighted like every statistic)
    top1 = ours.pop("is_top1")
    assert trl.pop("is_top1").float().equal(top1), "is_top1 differs from TRL's"
    assert truth.pop("is_top1").equal(top1.double()), "is_top1 differs from the float64 argmax"
    assert 0 < int(top1.sum()) < int(mask.sum()), "is_top1 should take both values here"
    for name, o in ours.items():
        _check(o, trl[name], truth[name], name)
    for name, o in tok.items():
        _check(o, trl[name], truth[name], f"token_logps_and_entropy_from_hidden {name}")
    for name, o, t, tok_g, tr in zip(("d hidden", "d weight", "d bias"), ours_grads, trl_grads, tok_grads,
                                     truth_grads, strict=True):
        _check(o, t, tr, name)
        _check(tok_g, t, tr, f"token_logps_and_entropy_from_hidden {name}")


# --- the DPO losses through TRL 1.16's own DPOTrainer._compute_loss ------------------------------

# TRL 1.16's loss types (its `_compute_loss` error message lists them); simpo and orpo are not
# DPOTrainer losses there, and bco_pair_running_mean is this package's option.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# The losses TRL 1.16 applies label_smoothing to; it ignores it elsewhere (its sigmoid has no cDPO
# smoothing), so the others run with 0 here.
TRL_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
LOSS_CASES = [*TRL_LOSS_TYPES, ("sigmoid", "sft"), ("sigmoid", "bco_pair", "sft")]
# Where TRL 1.16's WPO (use_weighting) cannot be compared: its `per_sequence_loss *= weights` is in
# place, which raises on sft's expanded scalar and breaks the backward through hinge's relu; and
# dpo_loss refuses to weight the sorted losses (their entries are quantiles, not pairs).
NO_WPO_PARITY = {"sft": "TRL raises: in-place *= on its expanded scalar",
                 "hinge": "TRL's in-place *= on relu's output breaks its backward",
                 "aot": "dpo_loss refuses WPO on a sorted loss",
                 "aot_unpaired": "dpo_loss refuses WPO on a sorted loss"}


def _trl_compute_loss(loss_types, loss_weights, token_logps, completion_mask, ref_logps, beta, eps,
                      log_sum_sq_probs=None):
    """TRL 1.16's `DPOTrainer._compute_loss`, unbound, on a stand-in trainer and model: the model
    returns `token_logps` (2B, T-1) as its `log_probs` (0 off the response, as TRL's fused head gives
    them for labels -100), the reference log-probs come precomputed, as with
    `precompute_ref_log_probs`. Everything after the forward is TRL's code."""
    import collections
    import types

    from trl.trainer.dpo_trainer import DPOTrainer

    n, T = completion_mask.shape
    zeros = torch.zeros(n, T - 1, dtype=token_logps.dtype)
    outputs = types.SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                                    is_top1=zeros.bool(), log_sum_sq_probs=log_sum_sq_probs)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=token_logps.device, gather=lambda x: x,
                                          gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, loss_types=list(loss_types),
        loss_weights=list(loss_weights), beta=beta, label_smoothing=eps,
        use_weighting=log_sum_sq_probs is not None, args=types.SimpleNamespace(discopop_tau=0.05),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    B = n // 2
    inputs = dict(input_ids=torch.zeros(n, T, dtype=torch.long),
                  attention_mask=torch.ones(n, T, dtype=torch.long), completion_mask=completion_mask,
                  ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:])
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


def _pairs_case(seed=0):
    """4 pairs, [chosen; rejected], prompts first, response lengths all different (ragged: the
    batch's NLL per token differs from the mean of per-response means), float64."""
    g = torch.Generator().manual_seed(seed)
    starts, lens = [1, 2, 1, 3, 1, 2, 3, 1], [5, 2, 7, 3, 3, 6, 1, 4]
    cmask = torch.zeros(8, 11, dtype=torch.long)
    for i, (s, k) in enumerate(zip(starts, lens, strict=True)):
        cmask[i, s:s + k] = 1
    m = cmask[:, 1:].double()
    tok = -torch.rand(8, 10, generator=g, dtype=torch.float64) * 3 * m
    ref = (tok.sum(-1) + torch.randn(8, generator=g, dtype=torch.float64) * 2).detach()
    lsq = -torch.rand(8, 10, generator=g, dtype=torch.float64) * m
    return tok, cmask, m, ref, lsq


@pytest.mark.parametrize("use_weighting", [False, True], ids=["plain", "wpo"])
@pytest.mark.parametrize("loss_type", LOSS_CASES, ids=lambda t: t if isinstance(t, str) else "+".join(t))
def test_dpo_losses_match_trl_compute_loss(loss_type, use_weighting):
    """dpo_loss on the per-sequence sums and counts gives TRL 1.16's loss and gradient w.r.t. every
    response token's log-prob (float64, to 1e-12)."""
    from fused_dpo.losses import LOSS_TYPES, dpo_loss

    types_ = (loss_type,) if isinstance(loss_type, str) else loss_type
    assert set(types_) <= set(LOSS_TYPES)
    if use_weighting and set(types_) & set(NO_WPO_PARITY):
        pytest.skip("; ".join(NO_WPO_PARITY[t] for t in types_ if t in NO_WPO_PARITY))
    weights = [1.0, 0.4, 0.7][: len(types_)]
    eps = 0.1 if types_[0] in TRL_SMOOTHED else 0.0
    beta = 0.3
    tok0, cmask, m, ref, lsq = _pairs_case()

    tok = tok0.clone().requires_grad_(True)
    want = _trl_compute_loss(types_, weights, tok, cmask, ref, beta, eps,
                             lsq if use_weighting else None)
    (want_grad,) = torch.autograd.grad(want, tok)

    tok = tok0.clone().requires_grad_(True)
    logps, counts = (tok * m).sum(-1), m.sum(-1)
    wpo = {}
    if use_weighting:
        s = (lsq * m).sum(-1)
        wpo = dict(use_weighting=True, chosen_log_sum_sq_probs=s[:4], rejected_log_sum_sq_probs=s[4:])
    got, _ = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], loss_type=list(types_), loss_weights=weights,
                      beta=beta, label_smoothing=eps, chosen_counts=counts[:4], rejected_counts=counts[4:],
                      **wpo)
    (got_grad,) = torch.autograd.grad(got, tok)
    # TRL's exo_pair takes log(1 - eps) and log(eps) of a float32 tensor: float32 precision there
    # (test_losses checks ours against the float64 formula at 1e-12).
    tol = 1e-7 if "exo_pair" in types_ else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    on = m.bool()  # off the response TRL's log-probs are constants (labels -100): no gradient there
    torch.testing.assert_close(got_grad[on], want_grad[on], rtol=tol, atol=tol)


def test_rpo_alpha_is_trls_sigmoid_plus_weighted_sft():
    """rpo_alpha=a is TRL 1.16's RPO, loss_type=["sigmoid", "sft"] with loss_weights=[1, a]."""
    from fused_dpo.losses import dpo_loss

    tok0, cmask, m, ref, _ = _pairs_case(1)
    tok = tok0.clone().requires_grad_(True)
    want = _trl_compute_loss(("sigmoid", "sft"), (1.0, 0.4), tok, cmask, ref, 0.3, 0.0)
    (want_grad,) = torch.autograd.grad(want, tok)
    tok = tok0.clone().requires_grad_(True)
    logps, counts = (tok * m).sum(-1), m.sum(-1)
    got, _ = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.3, rpo_alpha=0.4,
                      chosen_counts=counts[:4], rejected_counts=counts[4:])
    (got_grad,) = torch.autograd.grad(got, tok)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    on = m.bool()
    torch.testing.assert_close(got_grad[on], want_grad[on], rtol=1e-12, atol=1e-12)
