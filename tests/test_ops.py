"""The op as PyTorch sees it: torch.library registration (opcheck), fullgraph torch.compile,
dispatch and launch counts per call, mixed precision, shift=False, and the numbers issue 9 found
wrong (weighted mean, aliasing in-place backward, large-magnitude logits, the reference's NaN
prompt rows)."""

import pytest
import torch
from helpers import assert_close_to_truth, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from fused_dpo import get_logps, get_logps_from_hidden
from fused_dpo.hidden import logps_from_hidden_backward_op, logps_from_hidden_op
from fused_dpo.logps import logps_backward_op, logps_op
from fused_dpo.reference import get_logps_from_hidden_reference, get_logps_reference

IMPLS = ["triton", "torch"]


def _hidden_case(B=2, T=9, H=16, V=70, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, T // 3 :] = True
    return h, w, b, ids, mask


# ---- torch.library ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_opcheck_logits_ops(impl, reduction, device):
    logits, ids, mask = make_inputs(2, 7, 19, torch.float32, device)
    x = logits.requires_grad_(True)
    for with_stats in (False, True):
        args = (x, ids, mask, 1, None, 0.9, 5.0, reduction, impl, with_stats, with_stats)
        torch.library.opcheck(logps_op, args)
        out, counts, _bad, stats, _ext = logps_op(*args)
        g = torch.randn(out.shape, device=device)
        ge = torch.randn(out.shape, device=device) if with_stats else None
        torch.library.opcheck(logps_backward_op, (g, logits.detach(), ids, stats, counts, 1, 0.9,
                                                  5.0, reduction, impl, ge))


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_hidden_ops(impl, device):
    # V = 41 at chunk_size 32: two vocab chunks, the second partial (each chunk is a launch, and
    # opcheck runs each op several times)
    h, w, b, ids, mask = _hidden_case(T=6, V=41, device=device)
    for with_stats in (False, True):
        args = (h.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), ids, mask,
                1, None, 1.0, None, "mean", impl, torch.float32, 32, True, with_stats, with_stats)
        torch.library.opcheck(logps_from_hidden_op, args)
        out, counts, _bad, stats, _ext = logps_from_hidden_op(*args)
        ge = torch.randn(out.shape, device=device) if with_stats else None
        bwd = (torch.randn(out.shape, device=device), h.detach(), w.detach(), b.detach(), ids,
               mask, stats, counts, 1, None, 1.0, None, "mean", impl, torch.float32, 32, True, True,
               True, True, ge)
        torch.library.opcheck(logps_from_hidden_backward_op, bwd)


@pytest.mark.parametrize("need", ["frozen-weight", "weight-only"])
def test_opcheck_hidden_backward_with_unneeded_gradients(need, device):
    """Unneeded gradients come back as separate empty tensors (a custom op's outputs may not alias),
    and d_hidden is contiguous even for a transposed hidden, in the fake as in the real op."""
    h, w, _b, ids, mask = _hidden_case(device=device)
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1)  # dense, not contiguous (seq-first)
    out, counts, _bad, stats, _ext = logps_from_hidden_op(h_t, w, None, ids, mask, 1, None, 1.0,
                                                          None, "sum", "torch", torch.float32, 32,
                                                          True, False, False)
    need_h, need_w = (True, False) if need == "frozen-weight" else (False, True)
    bwd = (torch.randn(out.shape, device=device), h_t, w, None, ids, mask, stats, counts, 1, None,
           1.0, None, "sum", "torch", torch.float32, 32, True, need_h, need_w, False, None)
    torch.library.opcheck(logps_from_hidden_backward_op, bwd)


def test_compiled_backward_with_a_frozen_head_and_no_bias(device):
    torch._dynamo.reset()
    h, w, _b, ids, mask = _hidden_case(device=device)
    fn = lambda h_: get_logps_from_hidden(h_, w, ids, mask, impl="torch")
    hc, he = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    torch.compile(fn, backend="aot_eager", fullgraph=True)(hc).sum().backward()
    fn(he).sum().backward()
    torch.testing.assert_close(hc.grad, he.grad, rtol=0, atol=0)


# ---- torch.compile(fullgraph=True) ----------------------------------------------------------

def _graph_targets():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    return seen, backend


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "novalidate"])
def test_fullgraph_compile_logits_path(impl, validate, device):
    torch._dynamo.reset()
    logits, ids, mask = make_inputs(2, 9, 23, torch.float32, device)
    seen, backend = _graph_targets()

    def fn(x, i, m):
        return get_logps(x, i, m, impl=impl, reduction="mean", validate=validate) * 2.0

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    xc = logits.clone().requires_grad_(True)
    xe = logits.clone().requires_grad_(True)
    out_c, out_e = compiled(xc, ids, mask), fn(xe, ids, mask)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    out_c.sum().backward()
    out_e.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)
    assert "fused_dpo.logps.default" in seen, seen


@pytest.mark.parametrize("impl", IMPLS)
def test_fullgraph_compile_hidden_path(impl, device):
    torch._dynamo.reset()
    h, w, b, ids, mask = _hidden_case(device=device)
    seen, backend = _graph_targets()

    def fn(h, w, b):
        return get_logps_from_hidden(h, w, ids, mask, bias=b, impl=impl, chunk_size=32)

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    leaves_c = [t.clone().requires_grad_(True) for t in (h, w, b)]
    leaves_e = [t.clone().requires_grad_(True) for t in (h, w, b)]
    out_c, out_e = compiled(*leaves_c), fn(*leaves_e)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    out_c.sum().backward()
    out_e.sum().backward()
    for a, e in zip(leaves_c, leaves_e, strict=True):
        torch.testing.assert_close(a.grad, e.grad, rtol=0, atol=0)
    assert "fused_dpo.logps_from_hidden.default" in seen, seen


def test_compiled_validation_is_a_device_assert():
    # CPU tensors even on a GPU machine: a CUDA device assert would end the process's CUDA context.
    torch._dynamo.reset()
    logits, ids, mask = make_inputs(2, 6, 11, torch.float32, "cpu")
    ids[1, 4] = 11
    mask[1, 4] = True
    compiled = torch.compile(lambda x, i, m: get_logps(x, i, m, impl="torch"), backend="aot_eager",
                             fullgraph=True)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        compiled(logits, ids, mask)


# ---- one node, few ops, few launches --------------------------------------------------------

class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ != "fill_":  # the NaN-poisoning fixture, not the op
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stub_launches(monkeypatch):
    """Replace the three @triton.jit kernels with counters: what is left is the host-side work."""
    from fused_dpo.kernels import logps as K

    launches = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(self.name)

    for name in ("_row_stats_kernel", "_seq_reduce_kernel", "_row_grad_kernel"):
        monkeypatch.setattr(K, name, Stub(name))
    return launches


@pytest.mark.parametrize("mask_kind", ["bool", "labels"])
def test_dispatch_and_launch_counts_per_call(stub_launches, mask_kind, device):
    """Forward: one allocation for the statistics, three for the outputs, two launches; backward:
    one allocation (the gradient) and one launch; one autograd node. Structural, not timed."""
    logits, ids, mask = make_inputs(4, 33, 50, torch.bfloat16, device)
    x = logits.requires_grad_(True)
    kw = dict(labels=torch.where(mask, ids, -100)) if mask_kind == "labels" else dict(
        input_ids=ids, response_mask=mask)
    with _CountOps() as fwd:
        out = get_logps(x, impl="triton", validate=False, **kw)
    assert stub_launches == ["_row_stats_kernel", "_seq_reduce_kernel"]
    # bool mask seen as bytes: zero-copy (the mode reports a view with its alias detach)
    view = ["view", "detach"] if mask_kind == "bool" else []
    assert sorted(fwd.ops) == sorted(["empty", "unbind", *view, "empty", "empty", "empty"]), fwd.ops
    assert out.grad_fn is not None and out.grad_fn.next_functions[0][0] is not None
    assert type(out.grad_fn).__name__ == "_LogpsBackward"
    g = torch.ones_like(out)
    stub_launches.clear()
    with _CountOps() as bwd:
        out.backward(g)
    assert stub_launches == ["_row_grad_kernel"]
    # the gradient buffer, the statistics' views, and autograd accumulating into x.grad (detach)
    assert sorted(bwd.ops) == ["detach", "empty", "unbind"], bwd.ops


def test_statistics_add_no_launch(stub_launches, device):
    """stats= and the entropy's gradient ride in the same kernels: still two launches forward and
    one backward, and the forward allocates only the statistics bundle and the outputs."""
    logits, ids, mask = make_inputs(2, 9, 50, torch.bfloat16, device)
    x = logits.requires_grad_(True)
    with _CountOps() as fwd:
        out = get_logps(x, ids, mask, impl="triton", validate=False, reduction="mean",
                        stats=("entropy", "is_top1"), entropy_grad=True)
    assert stub_launches == ["_row_stats_kernel", "_seq_reduce_kernel"]
    assert fwd.ops.count("empty") == 5, fwd.ops  # stats, out, counts, bad, the (4, B) statistics
    stub_launches.clear()
    (out.logps.sum() + out.entropy.sum()).backward()
    assert stub_launches == ["_row_grad_kernel"]


# ---- mixed precision on the hidden path -----------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["plain", "autocast", "head_fp32", "autocast-head_fp32"])
def test_fp32_weight_with_bf16_hidden(impl, mode, device):
    h32, w, b, ids, mask = _hidden_case(H=32, V=300, device=device)
    h = h32.to(torch.bfloat16)
    head_fp32 = mode.endswith("head_fp32")
    kw = dict(head_dtype=torch.float32) if head_fp32 else {}

    def run(fn, hid, wt, bs, **extra):
        hid, wt, bs = (t.detach().clone().requires_grad_(True) for t in (hid, wt, bs))
        if mode.startswith("autocast"):
            with torch.autocast(device, dtype=torch.bfloat16):
                out = fn(hid, wt, ids, mask, bias=bs, reduction="none", **extra)
        else:
            out = fn(hid, wt, ids, mask, bias=bs, reduction="none", **extra)
        out.sum().backward()
        return out, hid.grad, wt.grad, bs.grad

    fused = run(lambda *a, **k: get_logps_from_hidden(*a, impl=impl, chunk_size=128, **k), h, w, b,
                **kw)
    # eager in the same precision: what an fp32-master-weight model computes without fused_dpo
    if head_fp32:
        eager = run(get_logps_from_hidden_reference, h, w, b, head_dtype=torch.float32)
    else:
        eager = run(get_logps_from_hidden_reference, h, w.to(torch.bfloat16), b.to(torch.bfloat16))
    # Truth: the exact (float64) value and gradients of the model the compute dtype defines,
    # i.e. with the head's operands rounded to it; the gradient w.r.t. that rounded weight is
    # the gradient w.r.t. the fp32 master weight.
    cd = torch.float32 if head_fp32 else torch.bfloat16
    truth = run(get_logps_from_hidden_reference, h.double(), w.to(cd).double(), b.to(cd).double())
    assert fused[2].dtype == torch.float32 and fused[3].dtype == torch.float32  # fp32 master grads
    assert fused[1].dtype == torch.bfloat16
    for i, what in enumerate(["out", "d_hidden", "d_weight", "d_bias"]):
        scale = max(truth[i].abs().max().item(), 1.0)
        tol = 2e-5 * scale
        if i > 0:
            # As in test_hidden: a logit rounded to the compute dtype in another order than eager
            # moves its softmax weight, so the gradients may differ from eager's by a few
            # roundings of that dtype elementwise; d_hidden lands in bf16 on top.
            tol += 4 * torch.finfo(cd).eps * scale
            tol += 2 * torch.finfo(torch.bfloat16).eps * scale if i == 1 else 0.0
        assert_close_to_truth(fused[i], eager[i], truth[i], tol, what)


def test_fp32_weight_is_cast_a_chunk_at_a_time(monkeypatch, device):
    """No bf16 copy of the whole weight: every cast the head makes is one vocab chunk."""
    h32, w, _b, ids, mask = _hidden_case(H=8, V=96, device=device)
    casts = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        if self.dim() == 2 and self.shape[1] == 8 and self.dtype == torch.float32:
            casts.append(self.shape[0])
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    get_logps_from_hidden(h32.bfloat16(), w, ids, mask, impl="torch", chunk_size=32)
    assert casts and max(casts) <= 32, casts


# ---- shift=False -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_shift_false_on_aligned_views_equals_shifted_call(impl, reduction, device):
    logits, ids, mask = make_inputs(3, 11, 29, torch.bfloat16, device)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    shifted = get_logps(a, ids, mask, impl=impl, reduction=reduction)
    aligned = get_logps(b[:, :-1], ids[:, 1:], mask[:, 1:], shift=False, impl=impl,
                        reduction=reduction)
    torch.testing.assert_close(aligned, shifted, rtol=0, atol=0)
    g = torch.randn(shifted.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (shifted * g).sum().backward()
    (aligned * g).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_false_hidden_path(impl, device):
    h, w, b, ids, mask = _hidden_case(device=device)
    shifted = get_logps_from_hidden(h, w, ids, mask, bias=b, impl=impl)
    aligned = get_logps_from_hidden(h[:, :-1], w, ids[:, 1:], mask[:, 1:], bias=b, shift=False,
                                    impl=impl)
    torch.testing.assert_close(aligned, shifted, rtol=0, atol=0)
    ref = get_logps_reference(h.double() @ w.double().T + b.double(), ids, mask)
    torch.testing.assert_close(aligned.double(), ref, rtol=1e-5, atol=1e-5)


# ---- numbers issue 9 found wrong -------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_mean_of_weights_summing_below_one(impl, device):
    """Weights [0, 0, .25, .25]: the mean is sum / 0.5, not sum / clamp_min(count, 1)."""
    logits, ids, _ = make_inputs(1, 5, 13, torch.float64, device)
    mask = torch.tensor([[0, 0, 0, 0.25, 0.25]], dtype=torch.float64, device=device)
    x = logits.clone().requires_grad_(True)
    mean, count = get_logps(x, ids, mask, impl=impl, reduction="mean", return_counts=True)
    lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    expected = (0.25 * lp[2] + 0.25 * lp[3]) / 0.5
    assert count.item() == 0.5
    torch.testing.assert_close(mean[0], expected, rtol=1e-12, atol=1e-12)
    mean.sum().backward()
    xr = logits.clone().requires_grad_(True)
    lpr = torch.log_softmax(xr[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    ((0.25 * lpr[2] + 0.25 * lpr[3]) / 0.5).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_of_weights_summing_below_one_hidden(impl, device):
    h, w, b, ids, _ = _hidden_case(dtype=torch.float64, device=device)
    mask = torch.zeros(ids.shape, dtype=torch.float64, device=device)
    mask[:, 4:6] = 0.25
    out = get_logps_from_hidden(h, w, ids, mask, bias=b, impl=impl, reduction="mean")
    ref = get_logps_reference(h @ w.T + b, ids, mask, reduction="mean")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_refuses_aliasing_views(impl, device):
    logits, ids, mask = make_inputs(1, 6, 17, torch.float32, device)
    expanded = logits.expand(3, 6, 17)
    with pytest.raises(ValueError, match="do not alias"):
        get_logps(expanded, ids.expand(3, 6), mask.expand(3, 6), impl=impl, inplace_backward=True)
    # a plain (non-overlapping) strided view is fine
    big = torch.randn(2, 8, 40, device=device)
    get_logps(big[:, :6, :17], ids.expand(2, 6), mask.expand(2, 6), impl=impl, inplace_backward=True)


def test_reference_refuses_inplace_backward(device):
    logits, ids, mask = make_inputs(1, 6, 17, torch.float32, device)
    with pytest.raises(ValueError, match="in-place"):
        get_logps(logits, ids, mask, impl="reference", inplace_backward=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1e2, 1e3, 3e4])
def test_large_magnitude_logits_against_float64(impl, scale, device):
    """log p = (z_y - m) - log s keeps the digits that z_y - (m + log s) rounds away."""
    logits, ids, mask = make_inputs(2, 13, 97, torch.float32, device, scale=scale)
    truth = get_logps_reference(logits.double(), ids, mask, reduction="none")
    eager = get_logps_reference(logits, ids, mask, reduction="none")
    out = get_logps(logits, ids, mask, impl=impl, reduction="none")
    # eager float32 is accurate here (its x - max is exact); hold the fused paths to it
    assert_close_to_truth(out, eager, truth, 1e-6, f"scale {scale:g}")


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_is_exact(impl, device):
    logits, ids, mask = make_inputs(3, 17, 300, torch.float64, device)
    x = logits.clone().requires_grad_(True)
    xr = logits.clone().requires_grad_(True)
    out = get_logps(x, ids, mask, impl=impl)
    ref = get_logps_reference(xr, ids, mask)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-13, atol=1e-13)


def test_reference_ignores_nan_prompt_rows(device):
    logits, ids, mask = make_inputs(2, 8, 31, torch.float64, device)
    mask[:, :4] = False
    mask[:, 4:] = True
    logits[0, 1, :] = float("nan")  # a prompt row: scores nothing
    x = logits.clone().requires_grad_(True)
    ref = get_logps_reference(x, ids, mask)
    fused = get_logps(logits, ids, mask, impl="torch")
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ref, fused, rtol=1e-12, atol=1e-12)
    ref.sum().backward()
    assert (x.grad[0, 1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_uncompacted_path_ignores_nan_in_unscored_hidden_rows(impl, device):
    """compact=False (CUDA graphs) computes every row: a NaN hidden state in a prompt row (left
    padding) must still not reach any gradient, dW included (0 * NaN)."""
    h, w, b, ids, mask = _hidden_case(device=device)
    h[0, 1] = float("nan")  # a prompt row
    grads = []
    for compact in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
        out = get_logps_from_hidden(*leaves[:2], ids, mask, bias=leaves[2], impl=impl, compact=compact)
        out.sum().backward()
        assert torch.isfinite(out).all()
        grads.append([t.grad for t in leaves])
    for a, e in zip(*grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_float64_bias_gradient_without_hidden_gradient(device):
    h, w, b, ids, mask = _hidden_case(dtype=torch.float64, device=device)
    bb = b.clone().requires_grad_(True)
    get_logps_from_hidden(h, w, ids, mask, bias=bb, impl="torch").sum().backward()
    br = b.clone().requires_grad_(True)
    get_logps_reference(h @ w.T + br, ids, mask).sum().backward()
    torch.testing.assert_close(bb.grad, br.grad, rtol=1e-13, atol=1e-13)
