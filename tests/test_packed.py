"""Packed (padding-free) inputs, `cu_seqlens=`: equal to the padded batch and to the float64 packed
reference (Cut-CE's rule), gradients included, on both paths; bad offsets refused by name."""

import pytest
import torch
from helpers import assert_close_to_truth

from fused_dpo import get_logps, get_logps_from_hidden
from fused_dpo.logps import logps_backward_op, logps_op
from fused_dpo.reference import get_logps_from_hidden_reference

IMPLS = ["triton", "torch"]
# lengths 1 and 2, and the fourth sequence's response is empty (all masked)
LENGTHS = (5, 1, 2, 6, 4, 7)
EMPTY = 3


def packed_case(V=37, H=None, dtype=torch.float32, device="cpu", seed=0, lengths=LENGTHS):
    """(rows, ids, mask, cu): logits (1, N, V), or with H (hidden (1, N, H), weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, V, (1, N), generator=g)
    mask = torch.rand(1, N, generator=g) > 0.25
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        mask[0, a] = False  # the prompt's first token
        if s == EMPTY:
            mask[0, a:b] = False
    if H is None:
        rows = ((torch.randn(1, N, V, generator=g, dtype=torch.float64) * 2).to(dtype).to(device),)
    else:
        rows = tuple(t.to(dtype).to(device) for t in (
            torch.randn(1, N, H, generator=g, dtype=torch.float64),
            torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3,
            torch.randn(V, generator=g, dtype=torch.float64) * 0.3))
    return rows, ids.to(device), mask.to(device), cu.to(device)


def padded(t, cu, fill=0):
    """(1, N, ...) packed -> (S, Lmax, ...) right-padded batch."""
    cu = cu.tolist()
    Lmax = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    out = t.new_full((len(cu) - 1, Lmax, *t.shape[2:]), fill)
    for s, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        out[s, : b - a] = t[0, a:b]
    return out


def unpad_tokens(tok, cu):
    """(S, Lmax - 1) per-token values of a padded batch -> the packed row (1, N - 1)."""
    cu = cu.tolist()
    out = tok.new_zeros((1, cu[-1] - 1))
    for s, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        out[0, a : b - 1] = tok[s, : max(b - a - 1, 0)]
    return out


def run(fn, tensors, seed=1):
    """out (or the stats tuple), and the gradients of a random linear function of all its
    differentiable outputs."""
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    res = fn(*ts)
    outs = [res] if isinstance(res, torch.Tensor) else [r for r in res if r is not None]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device))
               .sum() for o in outs if o.requires_grad)
    loss.backward()
    return res, [t.grad for t in ts]


def fields(res):
    return [res] if isinstance(res, torch.Tensor) else [r for r in res if r is not None]


CASES = [  # (reduction, options)
    ("sum", {}),
    ("mean", {"temperature": 0.7, "softcap": 4.0}),
    ("none", {}),
    ("mean", {"stats": ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
              "entropy_grad": True}),
    ("none", {"stats": ("entropy", "is_top1"), "entropy_grad": True, "temperature": 1.3}),
]
IDS = ["sum", "mean-temp-cap", "none", "mean-stats-entgrad", "none-stats-entgrad"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_path_matches_truth_and_padded_batch(impl, case, device):
    reduction, opts = case
    (logits,), ids, mask, cu = packed_case(device=device)
    kw = dict(reduction=reduction, return_counts=True, **opts)
    call = lambda impl_: lambda x: get_logps(x, ids, mask, cu_seqlens=cu, impl=impl_, **kw)  # noqa: E731
    truth, t_grad = run(call("reference"), [logits.double()])
    eager, e_grad = run(call("reference"), [logits])
    out, grad = run(call(impl), [logits])
    S = len(LENGTHS)
    assert fields(out)[1].shape == (S,)  # counts per sequence
    assert fields(out)[0].shape == ((1, logits.shape[1] - 1) if reduction == "none" else (S,))
    for i, (o, e, t) in enumerate(zip(fields(out), fields(eager), fields(truth), strict=True)):
        assert_close_to_truth(o, e, t, 2e-5 * max(1.0, t.abs().max().item()), f"output {i}")
    assert_close_to_truth(grad[0], e_grad[0], t_grad[0], 2e-5, "grad")
    # the padded batch through the same impl: the same numbers, the same gradient
    pad_out, pad_grad = run(lambda x: get_logps(x, padded(ids, cu), padded(mask, cu, False),
                                                impl=impl, **kw), [padded(logits, cu)])
    for o, p in zip(fields(out), fields(pad_out), strict=True):
        if o.dim() == 2:  # "none": per token in the packed row
            p = unpad_tokens(p, cu)
        torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-5)
    if reduction != "none":  # (per token, the random upstream gradients differ in layout)
        torch.testing.assert_close(grad[0], padded_to_packed(pad_grad[0], cu), rtol=1e-5,
                                   atol=1e-6)
        assert fields(out)[0][EMPTY] == 0  # the empty response


def padded_to_packed(t, cu):
    cu = cu.tolist()
    return torch.cat([t[s, : b - a] for s, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True))])[None]


def test_no_prediction_across_a_boundary(device):
    """Changing a sequence's last logits row changes nothing: it would only predict the next
    sequence's first token."""
    (logits,), ids, _mask, cu = packed_case(device=device)
    a = get_logps(logits, ids, cu_seqlens=cu, impl="torch")
    x = logits.clone()
    x[0, cu[1:-1].long() - 1] = 1e4
    torch.testing.assert_close(get_logps(x, ids, cu_seqlens=cu, impl="torch"), a, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_cu_seqlens(impl, device):
    """A cu_seqlens that is a strided view is read by value, not by its storage's layout."""
    (logits,), ids, _mask, cu = packed_case(device=device)
    spread = torch.full((2 * cu.numel() - 1,), -1, dtype=torch.int32, device=cu.device)
    spread[::2] = cu
    view = spread[::2]
    assert not view.is_contiguous()
    torch.testing.assert_close(get_logps(logits, ids, cu_seqlens=view, impl=impl),
                               get_logps(logits, ids, cu_seqlens=cu, impl=impl), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_labels_convention_and_float64_gradcheck(impl, device):
    (logits,), ids, mask, cu = packed_case(V=5, dtype=torch.float64, device=device,
                                           lengths=(3, 1, 2), seed=2)
    assert mask[0, 1:].any()
    labels = torch.where(mask, ids, -100)
    a = get_logps(logits, ids, mask, cu_seqlens=cu, impl=impl, reduction="mean")
    b = get_logps(logits, labels=labels, cu_seqlens=cu, impl=impl, reduction="mean")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = logits.clone().requires_grad_(True)
    fn = lambda t: get_logps(t, labels=labels, cu_seqlens=cu, impl=impl, reduction="mean",  # noqa: E731
                             softcap=3.0)
    # Triton in fast_mode (finite differences along random directions): the full Jacobian takes
    # 20 s in the interpreter; a wrong gradient still fails it.
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [("sum", {}, True), ("none", {"softcap": 5.0}, False),
                                  ("mean", {"stats": ("entropy", "is_top1"),
                                            "entropy_grad": True}, True)],
                         ids=["sum-compact", "none-cap-nocompact", "mean-stats-compact"])
def test_hidden_path_matches_truth_and_padded_batch(impl, case, device):
    reduction, opts, compact = case
    (h, w, b), ids, mask, cu = packed_case(V=45, H=8, device=device)
    kw = dict(reduction=reduction, **opts)
    eager = lambda h_, w_, b_: get_logps_from_hidden_reference(  # noqa: E731
        h_, w_, ids, mask, bias=b_, cu_seqlens=cu, **kw)
    truth, t_grads = run(eager, [h.double(), w.double(), b.double()])
    e_out, e_grads = run(eager, [h, w, b])
    out, gs = run(lambda h_, w_, b_: get_logps_from_hidden(
        h_, w_, ids, mask, bias=b_, cu_seqlens=cu, impl=impl, chunk_size=16, compact=compact, **kw),
        [h, w, b])
    for o, e, t in zip(fields(out), fields(e_out), fields(truth), strict=True):
        assert_close_to_truth(o, e, t, 2e-5 * max(1.0, t.abs().max().item()), "out")
    for name, g, e, t in zip("hwb", gs, e_grads, t_grads, strict=True):
        assert_close_to_truth(g, e, t, 2e-5 * max(1.0, t.abs().max().item()), f"d{name}")
    pad, pad_gs = run(lambda h_, w_, b_: get_logps_from_hidden(
        h_, w_, padded(ids, cu), padded(mask, cu, False), bias=b_, impl=impl, chunk_size=16, **kw),
        [padded(h, cu), w, b])
    for o, p in zip(fields(out), fields(pad), strict=True):
        p = unpad_tokens(p, cu) if o.dim() == 2 else p
        torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-5)
    if reduction != "none":  # (per token, the random upstream gradients differ in layout)
        torch.testing.assert_close(gs[0], padded_to_packed(pad_gs[0], cu), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs[1], pad_gs[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs[2], pad_gs[2], rtol=1e-5, atol=1e-6)


def test_ops_with_cu_seqlens_opcheck_and_compile(device):
    (logits,), ids, mask, cu = packed_case(V=13, device=device, lengths=(3, 1, 4))
    x = logits.requires_grad_(True)
    for reduction in ("mean", "none"):
        args = (x, ids, mask, 1, None, 1.0, None, reduction, "torch", True, True, cu)
        torch.library.opcheck(logps_op, args)
        out, counts, _bad, stats, _ext = logps_op(*args)
        assert counts.shape == (3,)
        g = torch.randn(out.shape, device=device)
        torch.library.opcheck(logps_backward_op, (g, logits.detach(), ids, stats, counts, 1, 1.0,
                                                  None, reduction, "torch", g, cu))
    torch._dynamo.reset()
    fn = lambda t: get_logps(t, ids, mask, cu_seqlens=cu, impl="torch", reduction="mean")  # noqa: E731
    xc, xe = (logits.detach().clone().requires_grad_(True) for _ in range(2))
    oc = torch.compile(fn, backend="aot_eager", fullgraph=True)(xc)
    oe = fn(xe)
    torch.testing.assert_close(oc, oe, rtol=0, atol=0)
    oc.sum().backward()
    oe.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)


def _bad_cu(device):
    return [
        (torch.tensor([0, 5, 3, 25], dtype=torch.int32), ValueError, "non-decreasing"),
        (torch.tensor([0, 5, 24], dtype=torch.int32), ValueError, "ends at 24"),
        (torch.tensor([1, 5, 25], dtype=torch.int32), ValueError, r"cu_seqlens\[0\] = 1"),
        (torch.tensor([0, 5, 25], dtype=torch.int64), TypeError, "torch.int64"),
        (torch.tensor([[0, 5, 25]], dtype=torch.int32), ValueError, r"shape \(1, 3\)"),
        ([0, 5, 25], TypeError, "list"),
    ] + ([(torch.tensor([0, 5, 25], dtype=torch.int32, device="meta"), ValueError, "meta")])


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_bad_cu_seqlens_are_named(path, device):
    (logits,), ids, mask, _cu = packed_case(device=device, lengths=(5, 20))
    (h, w, _b), *_ = packed_case(V=37, H=4, device=device, lengths=(5, 20))
    call = (lambda cu, **k: get_logps(logits, ids, mask, cu_seqlens=cu, **k)) if path == "logits" \
        else (lambda cu, **k: get_logps_from_hidden(h, w, ids, mask, cu_seqlens=cu, **k))
    for cu, err, msg in _bad_cu(device):
        cu = cu.to(device) if isinstance(cu, torch.Tensor) and cu.device.type != "meta" else cu
        with pytest.raises(err, match=msg):
            call(cu, impl="torch")
    good = torch.tensor([0, 5, 25], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="batch 1.*B = 2"):
        x2 = logits.expand(2, -1, -1) if path == "logits" else None
        if path == "logits":
            get_logps(x2, ids.expand(2, -1), mask.expand(2, -1), cu_seqlens=good)
        else:
            get_logps_from_hidden(h.expand(2, -1, -1), w, ids.expand(2, -1), mask.expand(2, -1),
                                  cu_seqlens=good)
