"""Parity with TRL 1.16's RL kernels on the same inputs (float32, CPU).

- `token_logps_and_entropy` against `trl.trainer.utils.selective_log_softmax_and_entropy`
  (the torch fallback TRL takes on the CPU): log-probs, entropy and the logits gradient of
  (logps * a).sum() + (entropy * b).sum(), with and without a row mask, temperature != 1.
- `token_logps_and_entropy_from_hidden` and `get_logps_from_hidden(shift=False,
  reduction="none", stats=<all four>)` against `trl.kernels.ChunkedLogProbFunction` (its torch
  tiles on the CPU): log-probs, entropy, log sum p^2, mean logit, top-1, and the gradients w.r.t.
  hidden, weight and bias; with a row mask, TRL gets the compacted rows, as its fused_lm_head patch
  passes them.

The rule is the project's (tests/helpers.py): with float64 truth from `fused_dpo.reference`,
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
