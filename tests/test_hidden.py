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
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo", ("sigmoid", "sft")], ids=str)
def test_grad_in_forward_equals_four_matmul_path(impl, loss_type, device):
    """Three matmuls (gradient formed pair by pair during the forward) = the autograd path."""
    g = torch.Generator().manual_seed(5)
    n, T, H, V = 6, 10, 16, 70
    h, w, b = (torch.randn(*s, generator=g, dtype=torch.float64).to(device)
               for s in ((n, T, H), (V, H), (V,)))
    ids = torch.randint(0, V, (n, T), generator=g).to(device)
    mask = torch.zeros(n, T, dtype=torch.bool, device=device)
    mask[:, 4:] = True
    mask[1, 7:] = False
    ref = None if loss_type == "orpo" else (torch.randn(n, generator=g, dtype=torch.float64) - 30).to(device)
    lt = list(loss_type) if isinstance(loss_type, tuple) else loss_type
    results = []
    for grad_in_forward in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (h, w / 4, b / 10)]
        loss, metrics = dpo_loss_from_hidden(*leaves[:2], ids, mask, bias=leaves[2], ref_logps=ref,
                                             impl=impl, chunk_size=32, loss_type=lt, beta=0.3,
                                             grad_in_forward=grad_in_forward)
        (loss * 1.7).backward()
        results.append((loss.detach(), [t.grad for t in leaves], metrics))
    (l4, g4, m4), (l3, g3, m3) = results
    torch.testing.assert_close(l3, l4, rtol=1e-12, atol=1e-12)
    for a, e in zip(g3, g4, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    for k in m4:
        torch.testing.assert_close(m3[k], m4[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_in_forward_fp32_master_weight(impl, device):
    """bf16 hidden, fp32 weight: gradients accumulated in fp32 pair by pair, against float64."""
    g = torch.Generator().manual_seed(6)
    n, T, H, V = 4, 12, 32, 300
    h = torch.randn(n, T, H, generator=g).bfloat16().to(device)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device)
    ids = torch.randint(0, V, (n, T), generator=g).to(device)
    mask = torch.zeros(n, T, dtype=torch.bool, device=device)
    mask[:, 3:] = True
    ref = (torch.randn(n, generator=g, dtype=torch.float64) - 40).to(device)

    def run(hid, wt, **kw):
        hid, wt = hid.clone().requires_grad_(True), wt.clone().requires_grad_(True)
        loss, _ = dpo_loss_from_hidden(hid, wt, ids, mask, ref_logps=ref.to(hid.dtype if hid.dtype
                                       == torch.float64 else torch.float32), impl=impl, **kw)
        loss.backward()
        return loss, hid.grad, wt.grad

    fused = run(h, w, grad_in_forward=True, chunk_size=128)
    four = run(h, w, chunk_size=128)
    # truth: the bf16 compute the head defines, exactly (operands rounded to bf16, then float64)
    truth = run(h.double(), w.bfloat16().double())
    assert fused[2].dtype == torch.float32 and fused[1].dtype == torch.bfloat16
    for i in range(3):
        scale = max(truth[i].abs().max().item(), 1e-3)
        tol = 4 * torch.finfo(torch.bfloat16).eps * scale
        assert_close_to_truth(fused[i], four[i], truth[i], tol, f"grad_in_forward output {i}")


def test_grad_in_forward_refuses_coupled_losses():
    h = torch.randn(2, 5, 4)
    w = torch.randn(9, 4)
    ids = torch.randint(0, 9, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    for coupled in ("bco_pair", "aot", "aot_unpaired"):  # aot: wrong gradients before the check
        with pytest.raises(ValueError, match=coupled):
            dpo_loss_from_hidden(h, w, ids, mask, ref_logps=torch.zeros(2), loss_type=coupled,
                                 grad_in_forward=True)
    with pytest.raises(ValueError, match="ld_alpha"):
        dpo_loss_from_hidden(h, w, ids, mask, ref_logps=torch.zeros(2), ld_alpha=0.5,
                             grad_in_forward=True)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        dpo_loss_from_hidden(h, w, ids, mask, ref_logps=torch.zeros(2), reduction="none",
                             grad_in_forward=True)
    # the head and options are checked as on the autograd path
    with pytest.raises(ValueError, match="temperature"):
        dpo_loss_from_hidden(h, w, ids, mask, ref_logps=torch.zeros(2), temperature=0,
                             grad_in_forward=True)
    with pytest.raises(ValueError, match="H = 4"):
        dpo_loss_from_hidden(h, w[:, :3], ids, mask, ref_logps=torch.zeros(2), grad_in_forward=True)
    with pytest.raises(ValueError, match="no eager reference"):
        dpo_loss_from_hidden(h, w, ids, mask, ref_logps=torch.zeros(2), impl="reference",
                             grad_in_forward=True)


def test_grad_in_forward_scaling_frozen_head_and_single_backward(device):
    """A scaled loss (gradient accumulation) scales the gradients without rounding the scale to
    the parameter dtype; a frozen head gets no gradient work; a second backward is refused."""
    g = torch.Generator().manual_seed(7)
    n, T, H, V = 4, 9, 16, 50
    h = torch.randn(n, T, H, generator=g, dtype=torch.float64).to(device)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / 4).to(device)
    ids = torch.randint(0, V, (n, T), generator=g).to(device)
    mask = torch.zeros(n, T, dtype=torch.bool, device=device)
    mask[:, 3:] = True
    ref = (torch.randn(n, generator=g, dtype=torch.float64) - 20).to(device)
    grads = []
    for gif in (False, True):
        hh = h.clone().requires_grad_(True)
        ww = w.clone()  # frozen head
        loss, _ = dpo_loss_from_hidden(hh, ww, ids, mask, ref_logps=ref, grad_in_forward=gif)
        (loss / 3).backward()
        assert ww.grad is None
        grads.append(hh.grad)
        if gif:
            with pytest.raises(RuntimeError, match="one backward"):
                loss.backward()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


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
