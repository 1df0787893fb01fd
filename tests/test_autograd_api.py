"""How the fused ops meet autograd beyond a plain backward (issue 20, items 18 and 19).

- A response_mask that requires grad is refused: masks are constant weights, the fused backward
  has no gradient for them (the eager formula would have one).
- create_graph=True gives the usual first-order gradient; differentiating it again raises a
  clear error (the backward's kernels are not differentiable) instead of failing inside an
  in-place temporary. impl="reference" supports double backward.
- torch.func.grad and torch.func.vjp give autograd's gradients, on the torch and Triton paths.
- Meta-device inputs give meta outputs and gradients of the right shapes (the fake kernels).
"""

import pytest
import torch

from fused_dpo import get_logps, get_logps_from_hidden

IMPLS = ["torch", "triton"]
STATS = dict(stats=("entropy", "mean_logits"), entropy_grad=True)


def _logits_inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 13, generator=g, dtype=dtype) * 2
    ids = torch.randint(0, 13, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g, dtype=dtype)
    return x, ids, mask


def _hidden_inputs(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 6, 5, generator=g, dtype=dtype)
    w = torch.randn(13, 5, generator=g, dtype=dtype)
    b = torch.randn(13, generator=g, dtype=dtype)
    ids = torch.randint(0, 13, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g, dtype=dtype)
    return h, w, b, ids, mask


def _scalar(res):
    """A scalar that uses every differentiable output (log-probs and the entropy)."""
    if isinstance(res, torch.Tensor):
        w = torch.linspace(0.5, 1.5, res.numel(), dtype=res.dtype, device=res.device)
        return (res * w.view(res.shape)).sum()
    return _scalar(res.logps) + 0.3 * res.entropy.sum()


# ---- item 18: masks are constants ----------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_mask_that_requires_grad_is_refused(impl):
    x, ids, mask = _logits_inputs()
    with pytest.raises(ValueError, match="response_mask requires grad.*detach"):
        get_logps(x.requires_grad_(), ids, mask.requires_grad_(), impl=impl)
    h, w, b, ids, mask = _hidden_inputs()
    with pytest.raises(ValueError, match="response_mask requires grad"):
        get_logps_from_hidden(h, w, ids, mask.requires_grad_(), impl=impl)
    # detached, the same float weights are fine
    out = get_logps(x, ids, mask.detach(), impl=impl)
    assert out.requires_grad and out.shape == (2,)


# ---- item 19: double backward -----------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_create_graph_then_second_backward_raises_clearly(impl):
    x, ids, mask = _logits_inputs()
    x.requires_grad_(True)
    g_plain, = torch.autograd.grad(_scalar(get_logps(x, ids, mask, impl=impl, **STATS)), x)
    g, = torch.autograd.grad(_scalar(get_logps(x, ids, mask, impl=impl, **STATS)), x,
                             create_graph=True)
    torch.testing.assert_close(g, g_plain, rtol=0, atol=0)  # first order as usual
    with pytest.raises(RuntimeError, match=r"get_logps has no double backward.*impl='reference'"):
        (g**2).sum().backward()

    h, w, b, ids, mask = _hidden_inputs()
    leaves = [t.requires_grad_(True) for t in (h, w, b)]
    plain = torch.autograd.grad(_scalar(get_logps_from_hidden(h, w, ids, mask, bias=b, impl=impl,
                                                              chunk_size=4)), leaves)
    grads = torch.autograd.grad(_scalar(get_logps_from_hidden(h, w, ids, mask, bias=b, impl=impl,
                                                              chunk_size=4)), leaves,
                                create_graph=True)
    for a, e in zip(grads, plain, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="get_logps_from_hidden has no double backward"):
        sum((t**2).sum() for t in grads).backward()


def test_reference_has_double_backward():
    x, ids, mask = _logits_inputs()
    x.requires_grad_(True)
    torch.autograd.gradgradcheck(lambda t: get_logps(t, ids, mask, impl="reference"), (x,))


# ---- item 19: torch.func ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_torch_func_grad_and_vjp(impl):
    x, ids, mask = _logits_inputs()
    f = lambda t: _scalar(get_logps(t, ids, mask, impl=impl, reduction="mean", **STATS))  # noqa: E731
    xr = x.clone().requires_grad_(True)
    f(xr).backward()
    torch.testing.assert_close(torch.func.grad(f)(x), xr.grad, rtol=0, atol=0)
    out, vjp = torch.func.vjp(lambda t: get_logps(t, ids, mask, impl=impl), x)
    cot = torch.linspace(-1, 1, 2, dtype=x.dtype)
    xr.grad = None
    get_logps(xr, ids, mask, impl=impl).backward(cot)
    torch.testing.assert_close(vjp(cot)[0], xr.grad, rtol=0, atol=0)

    h, w, b, ids, mask = _hidden_inputs()
    fh = lambda hh, ww, bb: _scalar(get_logps_from_hidden(  # noqa: E731
        hh, ww, ids, mask, bias=bb, impl=impl, chunk_size=4, **STATS))
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    fh(*leaves).backward()
    for got, leaf in zip(torch.func.grad(fh, argnums=(0, 1, 2))(h, w, b), leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad, rtol=0, atol=0)


def test_torch_func_second_order_raises_clearly():
    x, ids, mask = _logits_inputs()
    f = lambda t: get_logps(t, ids, mask, impl="torch").sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="get_logps has no double backward"):
        torch.func.grad(lambda t: torch.func.grad(f)(t).sum())(x)


# ---- item 19: meta tensors -------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_meta_inputs(reduction):
    x = torch.empty(2, 6, 13, device="meta", dtype=torch.bfloat16).requires_grad_(True)
    ids = torch.empty(2, 6, device="meta", dtype=torch.long)
    mask = torch.empty(2, 6, device="meta", dtype=torch.bool)
    res = get_logps(x, ids, mask, reduction=reduction, **STATS)
    shape = (2,) if reduction == "sum" else (2, 5)
    assert res.logps.device.type == "meta" and res.logps.shape == shape
    assert res.logps.dtype == torch.float32 and res.entropy.shape == shape
    _scalar(res).backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape and x.grad.dtype == x.dtype
    # packed, and the labels convention
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    out = get_logps(x[:1], labels=ids[:1], cu_seqlens=cu, reduction=reduction)
    assert out.device.type == "meta"

    h = torch.empty(2, 6, 5, device="meta", dtype=torch.bfloat16).requires_grad_(True)
    w = torch.empty(13, 5, device="meta").requires_grad_(True)  # fp32 master weight
    res = get_logps_from_hidden(h, w, ids, mask, reduction=reduction, **STATS)
    assert res.logps.device.type == "meta" and res.logps.shape == shape
    _scalar(res).backward()
    assert h.grad.shape == h.shape and h.grad.dtype == h.dtype
    assert w.grad.shape == w.shape and w.grad.dtype == w.dtype
