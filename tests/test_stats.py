"""The statistics computed beside the log-probs (entropy, log sum p^2, mean logit, top-1), and the
entropy's gradient, on both paths and every impl, against the float64 eager reference."""

import pytest
import torch
from helpers import assert_close_to_truth, make_inputs

from fused_dpo import (
    LogpsStats,
    get_logps,
    get_logps_from_hidden,
    token_logps_and_entropy,
    token_logps_and_entropy_from_hidden,
)
from fused_dpo.reference import get_logps_from_hidden_reference, get_logps_reference

IMPLS = ["triton", "torch"]
ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-6}


def _weights(out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(out.logps.shape, generator=g, dtype=torch.float64) for _ in range(2)]


def _run_logits(logits, ids, mask, impl, **kw):
    """(LogpsStats, d loss / d logits) for loss = g1 . logps + g2 . entropy."""
    x = logits.detach().clone().requires_grad_(True)
    fn = get_logps if impl != "reference" else get_logps_reference
    extra = {} if impl == "reference" else dict(impl=impl)
    out = fn(x, ids, mask, stats=ALL, entropy_grad=True, **extra, **kw)
    g1, g2 = _weights(out)
    dev, dt = out.logps.device, out.logps.dtype
    ((out.logps * g1.to(dev, dt)).sum() + (out.entropy * g2.to(dev, dt)).sum()).backward()
    return out, x.grad


def _check_all(out, eager, truth, tol, what):
    for name in ("logps", "counts") + ALL:
        t = getattr(truth, name)
        assert_close_to_truth(getattr(out, name), getattr(eager, name), t,
                              tol * max(1.0, t.abs().max().item()), f"{what}: {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("temp_cap", [(1.0, None), (0.7, 4.0)], ids=lambda p: f"t{p[0]}-c{p[1]}")
def test_logits_path_matches_float64_truth(impl, dtype, reduction, temp_cap, device):
    temperature, softcap = temp_cap
    logits, ids, mask = make_inputs(3, 21, 123, dtype, device, prompt=4)
    logits[:, :3] = float("nan")  # prompt rows: never read, 0 in every output
    kw = dict(reduction=reduction, temperature=temperature, softcap=softcap)
    truth, t_grad = _run_logits(logits.double(), ids, mask, "reference", **kw)
    eager, e_grad = _run_logits(logits, ids, mask, "reference", **kw)
    out, grad = _run_logits(logits, ids, mask, impl, **kw)
    assert isinstance(out, LogpsStats)
    _check_all(out, eager, truth, TOL[dtype], impl)
    round_tol = 2 * torch.finfo(dtype).eps * t_grad.abs().max().item()
    assert_close_to_truth(grad, e_grad, t_grad, TOL[dtype] + round_tol, "grad")
    assert not grad[:, :3].any(), "prompt rows must get an exact zero gradient"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("compact, temp_cap", [(True, (1.0, None)), (True, (0.8, 3.0)),
                                               (False, (0.8, 3.0))],
                         ids=["compact", "compact-t0.8-c3", "all-rows-t0.8-c3"])
def test_hidden_path_matches_float64_truth(impl, reduction, compact, temp_cap, device):
    """Several vocab chunks: the statistics are merged across chunks (the label's chunk, the
    columns before the label for top-1, each chunk's share of the mass for the entropy)."""
    temperature, softcap = temp_cap
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 13, 16, 150
    hidden = torch.randn(B, T, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(device)
    bias = torch.randn(V, generator=g).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(device)
    mask[:, :3] = False
    kw = dict(reduction=reduction, temperature=temperature, softcap=softcap)

    def run(h, w, b, impl_):
        h, w, b = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
        if impl_ == "reference":
            out = get_logps_from_hidden_reference(h, w, ids, mask, bias=b, stats=ALL,
                                                  entropy_grad=True, **kw)
        else:
            out = get_logps_from_hidden(h, w, ids, mask, bias=b, stats=ALL, entropy_grad=True,
                                        impl=impl_, chunk_size=32, compact=compact, **kw)
        g1, g2 = _weights(out)
        dev, dt = out.logps.device, out.logps.dtype
        ((out.logps * g1.to(dev, dt)).sum() + (out.entropy * g2.to(dev, dt)).sum()).backward()
        return out, (h.grad, w.grad, b.grad)

    truth, t_grads = run(hidden.double(), weight.double(), bias.double(), "reference")
    eager, e_grads = run(hidden, weight, bias, "reference")
    out, grads = run(hidden, weight, bias, impl)
    _check_all(out, eager, truth, 5e-5, impl)
    for name, a, e, t in zip(("hidden", "weight", "bias"), grads, e_grads, t_grads, strict=True):
        assert_close_to_truth(a, e, t, 5e-5 * max(1.0, t.abs().max().item()), f"d {name}")


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_entropy_gradcheck_float64(path, impl, reduction, device):
    """The entropy's gradient alone (the log-probs unused) and with the log-probs', softcap and
    temperature on, checked by finite differences in float64."""
    logits, ids, mask = make_inputs(2, 6, 13, torch.float64, device)
    kw = dict(impl=impl, softcap=4.0, temperature=0.8, reduction=reduction, stats=("entropy",),
              entropy_grad=True)
    if path == "logits":
        fns = [lambda x: get_logps(x, ids, mask, **kw).entropy,
               lambda x: (lambda o: o.logps - 0.5 * o.entropy)(get_logps(x, ids, mask, **kw))]
        args = (logits.clone().requires_grad_(True),)
    else:
        g = torch.Generator().manual_seed(5)
        h = torch.randn(2, 6, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
        w = torch.randn(13, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
        hk = dict(kw, chunk_size=8)  # two chunks: the statistics are merged
        fns = [lambda h_, w_: get_logps_from_hidden(h_, w_, ids, mask, **hk).entropy,
               lambda h_, w_: (lambda o: o.logps + 2.0 * o.entropy)(
                   get_logps_from_hidden(h_, w_, ids, mask, **hk))]
        args = (h, w)
    # fast_mode: finite differences along random directions (a full Jacobian per case would
    # take minutes in Triton's interpreter); a wrong gradient still fails it.
    for fn in fns:
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_is_exact_at_large_logits(impl, device):
    """|z| ~ 3e4 in float32: the entropy is formed from sum p (z - max), not lse - sum p z, whose
    two terms of size 3e4 cancel (float32 ulp(3e4) = 2e-3, larger than the answer's precision)."""
    logits, ids, mask = make_inputs(2, 17, 300, torch.float32, device)
    logits = logits + 3e4
    out = get_logps(logits, ids, mask, impl=impl, reduction="none", stats=ALL)
    truth = get_logps_reference(logits.double(), ids, mask, reduction="none", stats=ALL)
    assert (out.entropy.double() - truth.entropy).abs().max() < 2e-5
    assert (out.log_sum_sq_probs.double() - truth.log_sum_sq_probs).abs().max() < 2e-5
    # What the naive formula gives in float32 on the same row, for scale:
    z = logits[0, 0].double()
    p = torch.softmax(z, -1).float()
    naive = torch.logsumexp(logits[0, 0], -1) - (p * logits[0, 0]).sum()
    exact = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum()
    assert (naive.double() - exact).abs() > 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_top1_is_the_first_maximum_like_argmax(impl, device):
    V = 9
    logits = torch.zeros(1, 6, V, device=device)
    ids = torch.zeros(1, 6, dtype=torch.long, device=device)
    # row r scores ids[r + 1]
    logits[0, 0, [2, 5]] = 3.0
    ids[0, 1] = 2  # label is the first of two maxima: top-1
    logits[0, 1, [2, 5]] = 3.0
    ids[0, 2] = 5  # label ties with an earlier maximum: not top-1 (argmax returns 2)
    ids[0, 3] = 0  # all equal, label 0: top-1
    ids[0, 4] = 4  # all equal, label 4: not top-1
    logits[0, 4, 7] = 1.0
    ids[0, 5] = 3  # a clear maximum elsewhere: not top-1
    out = get_logps(logits, ids, None, impl=impl, reduction="none", stats=("is_top1",))
    truth = get_logps_reference(logits, ids, None, reduction="none", stats=("is_top1",))
    assert out.is_top1.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]
    assert torch.equal(out.is_top1, truth.is_top1)


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_entries(path, impl, device):
    """-inf logits (a vocabulary padded and masked): p = 0 there contributes 0 to the entropy and
    its gradient, not 0 * -inf = NaN. The mean logit is honestly -inf."""
    logits, ids, mask = make_inputs(2, 9, 40, torch.float64, device)
    ids = ids % 30
    logits[..., 30:] = float("-inf")
    x = logits.clone().requires_grad_(True)
    kw = dict(reduction="sum", stats=ALL, entropy_grad=True)
    if path == "logits":
        out = get_logps(x, ids, mask, impl=impl, **kw)
    else:  # the -inf columns come from the bias; chunks of 16 put 32..39 in a chunk of -inf only
        g = torch.Generator().manual_seed(6)
        h = torch.randn(2, 9, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
        w = torch.randn(40, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
        bias = torch.zeros(40, dtype=torch.float64, device=device)
        bias[30:] = float("-inf")
        out = get_logps_from_hidden(h, w, ids, mask, bias=bias, impl=impl, chunk_size=16, **kw)
        truth = get_logps_from_hidden_reference(h, w, ids, mask, bias=bias, **kw)
        for name in ("logps", "entropy", "log_sum_sq_probs", "is_top1"):
            assert torch.allclose(getattr(out, name), getattr(truth, name), atol=1e-12), name
        assert torch.isinf(out.mean_logits).all()
        (out.logps.sum() + out.entropy.sum()).backward()
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        assert not w.grad[30:].any()
        return
    truth = get_logps_reference(logits.clone().requires_grad_(True), ids, mask, **kw)
    for name in ("logps", "entropy", "log_sum_sq_probs", "is_top1"):
        assert torch.allclose(getattr(out, name), getattr(truth, name), atol=1e-12), name
    assert torch.isinf(out.mean_logits).all()
    (out.logps.sum() + out.entropy.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert not x.grad[..., 30:].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_responses_and_prompt_rows_read_zero(impl, device):
    logits, ids, mask = make_inputs(3, 8, 20, torch.float32, device)
    mask[1] = False  # no response at all
    logits[~torch.cat([mask[:, 1:], torch.ones_like(mask[:, :1])], 1)] = float("nan")
    for reduction in ("sum", "mean", "none"):
        out = get_logps(logits, ids, mask, impl=impl, reduction=reduction, stats=ALL)
        for name in ALL:
            v = getattr(out, name)
            assert torch.isfinite(v).all(), (reduction, name)
            assert not v[1].any(), (reduction, name)
            if reduction == "none":
                assert not v[~mask[:, 1:]].any(), (reduction, name)


def test_which_outputs_carry_gradients(device):
    logits, ids, mask = make_inputs(2, 6, 11, torch.float32, device)
    x = logits.requires_grad_(True)
    out = get_logps(x, ids, mask, stats=ALL)
    assert out.logps.requires_grad
    assert not any(getattr(out, n).requires_grad for n in ALL)
    out = get_logps(x, ids, mask, stats=ALL, entropy_grad=True)
    assert out.entropy.requires_grad
    assert not any(getattr(out, n).requires_grad for n in ALL[1:])
    only = get_logps(x, ids, mask, stats="entropy")
    assert only.log_sum_sq_probs is None and only.mean_logits is None and only.is_top1 is None
    assert torch.equal(only.counts, mask[:, 1:].float().sum(-1))


@pytest.mark.parametrize("bad, match", [
    (dict(stats=("entropy", "perplexity")), "unknown statistic 'perplexity'"),
    (dict(stats=("is_top1",), entropy_grad=True), "entropy_grad=True needs 'entropy'"),
    (dict(entropy_grad=True), "entropy_grad=True needs 'entropy'"),
])
def test_bad_stats_arguments(bad, match, device):
    logits, ids, mask = make_inputs(1, 4, 7, torch.float32, device)
    with pytest.raises(ValueError, match=match):
        get_logps(logits, ids, mask, **bad)
    h, w = torch.randn(1, 4, 3, device=device), torch.randn(7, 3, device=device)
    with pytest.raises(ValueError, match=match):
        get_logps_from_hidden(h, w, ids, mask, **bad)


# ---- the per-token RL contract -----------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead", [(3, 7), (21,), (3, 7, 1)], ids=["BT", "N", "BT1"])
@pytest.mark.parametrize("ent_grad", [True, False])
def test_token_logps_and_entropy(impl, lead, ent_grad, device):
    """TRL's selective_log_softmax_and_entropy: aligned inputs, any leading shape, 0 off the row
    mask, the entropy detached unless asked for."""
    g = torch.Generator().manual_seed(2)
    V = 50
    logits = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2).to(device)
    index = torch.randint(0, V, lead, generator=g).to(device)
    row_mask = (torch.rand(lead, generator=g) > 0.4).to(device)
    x = logits.clone().requires_grad_(True)
    lp, ent = token_logps_and_entropy(x, index, ent_grad, 0.9, row_mask, impl=impl)
    assert lp.shape == lead and ent.shape == lead
    assert ent.requires_grad == ent_grad
    ls = torch.log_softmax(logits / 0.9, -1)
    want_lp = torch.where(row_mask, ls.gather(-1, index[..., None]).squeeze(-1), 0.0)
    want_ent = torch.where(row_mask, -(ls.exp() * ls).sum(-1), 0.0)
    assert torch.allclose(lp, want_lp, atol=1e-12) and torch.allclose(ent, want_ent, atol=1e-12)
    if ent_grad:
        (lp.sum() + ent.sum()).backward()
        y = logits.clone().requires_grad_(True)
        ly = torch.log_softmax(y / 0.9, -1)
        ref = torch.where(row_mask, ly.gather(-1, index[..., None]).squeeze(-1)
                          - (ly.exp() * ly).sum(-1), 0.0)
        ref.sum().backward()
        assert torch.allclose(x.grad, y.grad, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logps_and_entropy_from_hidden(impl, device):
    g = torch.Generator().manual_seed(4)
    N, H, V = 19, 8, 70
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(device)
    index = torch.randint(0, V, (N,), generator=g).to(device)
    row_mask = (torch.rand(N, generator=g) > 0.3).to(device)
    lp, ent = token_logps_and_entropy_from_hidden(h, w, index, True, 1.0, row_mask, impl=impl,
                                                  chunk_size=16)
    want_lp, want_ent = token_logps_and_entropy(h @ w.T, index, True, 1.0, row_mask,
                                                impl="reference")
    assert torch.allclose(lp, want_lp, atol=1e-12) and torch.allclose(ent, want_ent, atol=1e-12)


def test_token_contract_bad_input(device):
    x = torch.randn(3, 5, 10, device=device)
    with pytest.raises(ValueError, match=r"index has shape \(3, 4\)"):
        token_logps_and_entropy(x, torch.zeros(3, 4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"row_mask has shape \(15,\)"):
        token_logps_and_entropy(x, torch.zeros(3, 5, dtype=torch.long, device=device),
                                row_mask=torch.ones(15, device=device))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        token_logps_and_entropy(torch.randn(10, device=device), torch.zeros((), dtype=torch.long))


# ---- inside torch.compile ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_fullgraph_compile_with_stats(path, device):
    """The op with statistics and the entropy's gradient traces as one node; values and gradients
    equal eager's bitwise."""
    torch._dynamo.reset()
    logits, ids, mask = make_inputs(2, 9, 30, torch.float32, device)
    h = torch.randn(2, 9, 6, device=device)
    w = torch.randn(30, 6, device=device)

    def loss(t):
        if path == "logits":
            o = get_logps(t, ids, mask, impl="torch", reduction="mean", stats=ALL,
                          entropy_grad=True)
        else:
            o = get_logps_from_hidden(t, w, ids, mask, impl="torch", reduction="mean", stats=ALL,
                                      entropy_grad=True)
        return o.logps.sum() + 0.1 * o.entropy.sum(), o

    src = logits if path == "logits" else h
    a, b = src.clone().requires_grad_(True), src.clone().requires_grad_(True)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    la, oa = loss(a)
    lb, ob = compiled(b)
    la.backward()
    lb.backward()
    for name in ("logps", "counts") + ALL:
        assert torch.equal(getattr(oa, name), getattr(ob, name)), name
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_hidden_backward_is_reentrant(impl, device):
    """A second backward through the same graph (retain_graph, as gradcheck does) reuses the
    forward's scored rows: bitwise the same gradients. It used to recompute every row instead."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 8, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(21, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    ids = torch.randint(0, 21, (2, 8), generator=g).to(device)
    mask = (torch.rand(2, 8, generator=g) > 0.4).to(device)
    out = get_logps_from_hidden(h, w, ids, mask, impl=impl, chunk_size=8, stats=("entropy",),
                                entropy_grad=True)
    loss = out.logps.sum() + out.entropy.sum()
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("shift", [True, False])
def test_zero_length_sequences(impl, shift, device):
    """T = 0 (an all-masked micro-batch after compaction): empty or zero outputs, gradients of the
    right shape, on both paths."""
    ids = torch.zeros(2, 0, dtype=torch.long, device=device)
    for reduction in ("sum", "mean", "none"):
        x = torch.randn(2, 0, 7, device=device, requires_grad=True)
        out = get_logps(x, ids, None, shift=shift, reduction=reduction, impl=impl)
        assert out.shape == ((2, 0) if reduction == "none" else (2,)) and not out.any()
        out.sum().backward()
        assert x.grad.shape == x.shape
        h = torch.randn(2, 0, 3, device=device, requires_grad=True)
        w = torch.randn(7, 3, device=device, requires_grad=True)
        out = get_logps_from_hidden(h, w, ids, None, shift=shift, reduction=reduction, impl=impl,
                                    stats=("entropy",), entropy_grad=True)
        (out.logps.sum() + out.entropy.sum()).backward()
        assert h.grad.shape == h.shape and not w.grad.any()


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_a_nan_row_has_nan_statistics(impl, path, device):
    """NaN in a scored row: every output of that sequence is NaN (top-1 included: it must not
    count towards an accuracy), on every impl; the hidden path merges a NaN chunk as NaN."""
    logits, ids, mask = make_inputs(2, 5, 12, torch.float64, device)
    mask[:] = True
    if path == "logits":
        logits[0, 1, 3] = float("nan")
        fn = get_logps if impl != "reference" else get_logps_reference
        kw = {} if impl == "reference" else dict(impl=impl)
        out = fn(logits, ids, mask, reduction="none", stats=ALL, **kw)
    else:
        h = torch.randn(2, 5, 4, dtype=torch.float64, device=device)
        w = torch.randn(12, 4, dtype=torch.float64, device=device)
        w[9] = float("nan")  # every row's logit 9 is NaN: a NaN in the third chunk of 4
        if impl == "reference":
            out = get_logps_from_hidden_reference(h, w, ids, mask, reduction="none", stats=ALL)
        else:
            out = get_logps_from_hidden(h, w, ids, mask, reduction="none", stats=ALL, impl=impl,
                                        chunk_size=4)
    rows = (0, 1) if path == "logits" else (slice(None), slice(None))
    for name in ("logps",) + ALL:
        assert getattr(out, name)[rows].isnan().all(), name


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_gradient_with_zero_count_and_inf_upstream(impl, device):
    """reduction='mean' with float weights that cancel (count 0): both coefficients are 0, even
    for an infinite upstream gradient (inf * 0 must not write NaN)."""
    logits = torch.randn(1, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.randint(0, 6, (1, 4), device=device)
    w = torch.tensor([[0.0, 1.0, -1.0, 0.0]], dtype=torch.float64, device=device)
    out = get_logps(logits, ids, w, impl=impl, reduction="mean", stats=("entropy",),
                    entropy_grad=True)
    (out.entropy * float("inf")).sum().backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_outputs_may_be_modified_in_place(device):
    logits, ids, mask = make_inputs(2, 5, 9, torch.float64, device)
    x = logits.requires_grad_(True)
    lp, ent = token_logps_and_entropy(x, ids, True, 1.0, mask, impl="torch")
    ent.mul_(0.5)  # an unbind view would refuse this
    ent.sum().backward()
    y = logits.detach().clone().requires_grad_(True)
    (0.5 * token_logps_and_entropy(y, ids, True, 1.0, mask, impl="reference")[1]).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-12)


def test_reference_entropy_gradient_is_finite_at_minus_inf(device):
    logits, ids, mask = make_inputs(1, 4, 8, torch.float64, device)
    logits[..., 5:] = float("-inf")
    x = logits.requires_grad_(True)
    out = get_logps_reference(x, ids % 5, mask, stats=("entropy",), entropy_grad=True)
    out.entropy.sum().backward()
    assert torch.isfinite(x.grad).all()
