"""get_logps_from_hidden and the fused DPO loss against the float64 eager reference."""

import pytest
import torch
from helpers import assert_close_to_truth

from fused_dpo import FusedDPOLoss, dpo_loss, dpo_loss_from_hidden, get_logps, get_logps_from_hidden
from fused_dpo.reference import get_logps_from_hidden_reference

IMPLS = ["triton", "torch"]


def make(B, T, H, V, dtype, device, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, :2] = False
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    return cast(h), cast(w), cast(b), ids.to(device), mask.to(device)


def grads(fn, tensors, seed=1):
    ts = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*ts)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * gout.to(out)).sum().backward()
    return out, [None if t is None else t.grad for t in ts]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.8, "softcap": 6.0}], ids=["plain", "temp-cap"])
def test_matches_float64_truth(impl, dtype, reduction, bias, opts, device):
    h, w, b, ids, mask = make(2, 11, 16, 123, dtype, device, bias=bias)
    kw = dict(reduction=reduction, **opts)
    fused = lambda h_, w_, b_: get_logps_from_hidden(h_, w_, ids, mask, bias=b_, impl=impl,
                                                     chunk_size=50, **kw)
    eager = lambda h_, w_, b_: get_logps_from_hidden_reference(h_, w_, ids, mask, bias=b_, **kw)
    t_out, t_grads = grads(eager, [h.double(), w.double(), None if b is None else b.double()])
    e_out, e_grads = grads(eager, [h, w, b])
    out, gs = grads(fused, [h, w, b])
    assert out.dtype == torch.float32
    scale = max(1.0, t_out.abs().max().item())
    tol = 2e-5 * scale
    if dtype == torch.bfloat16:
        # The fused addmm rounds each logit to bf16 once, eager (h @ W.T) + b twice: elementwise
        # either may be nearer the truth. Allow one bf16 rounding of the label logit and of the
        # log-sum-exp per counted token.
        logits = h.double() @ w.double().T + (0 if b is None else b.double())
        per_token = 2 * torch.finfo(dtype).eps * logits.abs().max().item()
        tol += per_token * (1 if reduction != "sum" else mask[:, 1:].sum(-1).max().item())
    assert_close_to_truth(out, e_out, t_out, tol, "out")
    for name, g, e, t in zip("hwb", gs, e_grads, t_grads, strict=True):
        if t is None:
            continue
        assert g.dtype == dtype and g.shape == t.shape
        # Chunked accumulation of dh in float32 of products rounded to the input dtype.
        tol = 4 * torch.finfo(dtype).eps * t.abs().max().item() + 1e-6
        assert_close_to_truth(g, e, t, tol, f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl, device):
    h, w, b, ids, mask = make(2, 5, 4, 13, torch.float64, device, bias=True)
    fn = lambda h_, w_, b_: get_logps_from_hidden(h_, w_, ids, mask, bias=b_, impl=impl,
                                                  chunk_size=5, softcap=3.0, reduction="mean")
    args = tuple(t.clone().requires_grad_(True) for t in (h, w, b))
    # Triton in fast_mode (finite differences along random directions): the full Jacobian takes
    # over a minute in the interpreter; a wrong gradient still fails it.
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_get_logps_on_logits_and_labels_convention(impl, device):
    h, w, _, ids, mask = make(3, 9, 8, 70, torch.float32, device)
    logits = h @ w.T
    a = get_logps_from_hidden(h, w, ids, mask, impl=impl, reduction="mean", return_counts=True)
    b = get_logps(logits, ids, mask, impl=impl, reduction="mean", return_counts=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    labels = torch.where(mask, ids, -100)
    torch.testing.assert_close(get_logps_from_hidden(h, w, labels=labels, impl=impl), a[0] * a[1],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_response_tokens_and_T1(impl, device):
    h, w, _, ids, mask = make(2, 6, 8, 30, torch.float32, device)
    mask[:] = False
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = get_logps_from_hidden(hh, ww, ids, mask, impl=impl, reduction="mean")
    assert out.tolist() == [0.0, 0.0]
    out.sum().backward()
    assert (hh.grad == 0).all() and (ww.grad == 0).all()
    out = get_logps_from_hidden(h[:, :1], w, ids[:, :1], impl=impl)
    assert out.tolist() == [0.0, 0.0]


def test_frozen_weight_gets_no_gradient_work(device):
    h, w, _, ids, mask = make(2, 6, 8, 30, torch.float32, device)
    hh = h.clone().requires_grad_(True)
    get_logps_from_hidden(hh, w, ids, mask, impl="torch").sum().backward()
    assert hh.grad is not None and w.grad is None


def test_auto_chunk_is_bounded():
    from fused_dpo.hidden import auto_chunk_size

    assert auto_chunk_size(6144, 128256, 2) == 256 * 85  # 256 MiB / (6144 * 2 B), 256-aligned
    assert auto_chunk_size(10, 1000, 2) == 1000
    assert auto_chunk_size(10**7, 128256, 2) == 256  # never below one 256-column tile


BAD = [
    (lambda h, w, i, m: get_logps_from_hidden(h, w[:, :-1], i, m), ValueError, "weight has shape"),
    (lambda h, w, i, m: get_logps_from_hidden(h, w.double(), i, m), TypeError, "weight has dtype"),
    (lambda h, w, i, m: get_logps_from_hidden(h, w, i, m, bias=torch.zeros(3)), ValueError, "bias"),
    (lambda h, w, i, m: get_logps_from_hidden(h[0], w, i, m), ValueError, "3 dimensions"),
    (lambda h, w, i, m: get_logps_from_hidden(h, w, i, m, chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, i, m: get_logps_from_hidden(h, w, i + 100, m), ValueError, "outside"),
    (lambda h, w, i, m: get_logps_from_hidden(h, w, i[:, 1:], m), ValueError, "input_ids has shape"),
]


@pytest.mark.parametrize("case", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(case, device):
    h, w, _, ids, mask = make(2, 6, 8, 30, torch.float32, device)
    mask[:, 1:] = True
    fn, exc, text = case
    with pytest.raises(exc, match=text):
        fn(h, w, ids, mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", ["sigmoid", "sft"]], ids=str)
def test_fused_dpo_loss_equals_composition(impl, loss_type, device):
    h, w, _, ids, mask = make(4, 10, 8, 40, torch.float64, device)  # 2 pairs
    ref_h, ref_w = h + 0.1, w * 0.9
    ref = get_logps_from_hidden(ref_h, ref_w, ids, mask, impl="reference")
    kw = dict(loss_type=loss_type, beta=0.2)

    def composed(h_, w_):
        lp, n = get_logps(h_ @ w_.T, ids, mask, impl="reference", return_counts=True)
        return dpo_loss(lp[:2], lp[2:], ref[:2], ref[2:], chosen_counts=n[:2], rejected_counts=n[2:], **kw)

    (want, want_m), want_g = _loss_and_grads(composed, h, w)
    fused = lambda h_, w_: dpo_loss_from_hidden(h_, w_, ids, mask, ref_hidden=ref_h, ref_weight=ref_w,
                                                impl=impl, chunk_size=16, **kw)
    (got, got_m), got_g = _loss_and_grads(fused, h, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for k in want_m:
        torch.testing.assert_close(got_m[k].double(), want_m[k].double(), rtol=1e-6, atol=1e-6)
    for g, e in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    module = FusedDPOLoss(impl=impl, chunk_size=16, **kw)
    torch.testing.assert_close(module(h, w, ids, mask, ref_logps=ref)[0], want, rtol=1e-6, atol=1e-6)


def _loss_and_grads(fn, h, w):
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, m = fn(hh, ww)
    loss.backward()
    return (loss.detach(), m), (hh.grad, ww.grad)


def test_fused_loss_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="beta"):
        FusedDPOLoss(beta=0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        FusedDPOLoss(loss_type="nope")


def test_fp32_accumulation_in_row_blocks(monkeypatch, device):
    """acc (fp32) += a @ b for bf16 a, b: block by block where no in-place fp32-output GEMM
    exists (the CPU; CUDA before torch 2.10), in one GEMM where it does: the same sums."""
    from fused_dpo import hidden as hid

    monkeypatch.setattr(hid, "_ADD_BLOCK_BYTES", 3 * 8 * 4)  # 3 rows of 8 fp32 per block
    g = torch.Generator().manual_seed(8)
    a = torch.randn(10, 6, generator=g).bfloat16().to(device)
    b = torch.randn(6, 8, generator=g).bfloat16().to(device)
    acc = torch.randn(10, 8, generator=g).to(device)
    expected = acc.double() + a.double() @ b.double()
    hid._addmm_f32_(acc, a, b)
    torch.testing.assert_close(acc.double(), expected, rtol=1e-6, atol=1e-6)
    if device == "cpu":
        assert not hid._addmm_f32_inplace_ok(torch.device("cpu"), torch.bfloat16)
