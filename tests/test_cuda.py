"""Compiled kernels on a real GPU (skipped without CUDA; bench/gpu_check.sh runs them)."""

import pytest
import torch
from helpers import assert_close_to_truth

from fused_dpo import get_logps, get_logps_from_hidden
from fused_dpo.reference import get_logps_from_hidden_reference, get_logps_reference

pytestmark = pytest.mark.cuda


def _case(B, T, V, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(B, T, V, device="cuda", generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    mask[:, T // 4 :] = True
    return logits, ids, mask


@pytest.mark.parametrize("V", [123, 32000, 128256, 151936])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_compiled_matches_float64(V, softcap):
    logits, ids, mask = _case(3, 97, V)
    x = logits.clone().requires_grad_(True)
    out = get_logps(x, ids, mask, impl="triton", softcap=softcap)
    out.sum().backward()
    xd = logits.double().requires_grad_(True)
    ref = get_logps_reference(xd, ids, mask, softcap=softcap)
    ref.sum().backward()
    rel = ((out.double() - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-6, rel
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-2, atol=2e-3)


def test_more_than_2_31_elements():
    B, T, V = 4, 4096, 151936  # B*T*V = 2.49e9 > 2**31
    logits, ids, mask = _case(B, T, V)
    x = logits.requires_grad_(True)
    out = get_logps(x, ids, mask, impl="triton")
    out.sum().backward()
    last = B - 1  # the last sequence sits past 2**31 elements
    ref = get_logps_reference(logits[last:].detach().double(), ids[last:], mask[last:])
    assert abs(out[last].item() - ref.item()) / abs(ref.item()) <= 1e-6
    xd = logits[last:, -50:].detach().double().requires_grad_(True)
    get_logps_reference(xd, ids[last:, -50:], mask[last:, -50:]).sum().backward()
    torch.testing.assert_close(x.grad[last:, -50:-1].double(), xd.grad[:, :-1], rtol=1e-2, atol=2e-3)


def test_hidden_path_compiled():
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, V = 2, 64, 256, 32000
    h = torch.randn(B, T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).bfloat16().requires_grad_(True)
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    fused = lambda r: get_logps_from_hidden(h, w, ids, impl="triton", chunk_size=4096, reduction=r)
    out, out_tok = fused("sum"), fused("none")
    with torch.no_grad():
        eager = {r: get_logps_from_hidden_reference(h, w, ids, reduction=r) for r in ("sum", "none")}
        truth = {r: get_logps_from_hidden_reference(h.double(), w.double(), ids, reduction=r)
                 for r in ("sum", "none")}
        max_logit = (h.double() @ w.double().T).abs().max().item()
    # Eager bf16 is itself 1.3e-5 off float64 here, so no fixed 1e-5 can hold. Both sides round each
    # logit to bf16 once, after float32 GEMMs that may sum in another order, so a logit may land one
    # bf16 ulp (<= eps * |logit|) apart: the label logit and the log-sum-exp move by at most
    # eps * max|logit| each per token. Per token that is ~0.08 on values near -10, so a wrong
    # label, shift or missed vocab chunk fails; the sum allows it for each of its T - 1 tokens.
    flip = 2 * torch.finfo(torch.bfloat16).eps * max_logit
    for r, got, n_tok in (("none", out_tok, 1), ("sum", out, T - 1)):
        tol = 2e-5 * truth[r].abs().max().item() + flip * n_tok
        assert_close_to_truth(got, eager[r], truth[r], tol, f"reduction={r}")
    out.sum().backward()
    hd, wd = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    get_logps_from_hidden(hd, wd, ids, impl="torch").sum().backward()
    for a, b in ((h.grad, hd.grad), (w.grad, wd.grad)):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-2, err


def test_fullgraph_inductor_compile_both_paths():
    torch._dynamo.reset()
    logits, ids, mask = _case(2, 129, 32000)
    fn = lambda x: get_logps(x, ids, mask, reduction="mean")
    compiled = torch.compile(fn, fullgraph=True)
    xc, xe = (logits.clone().requires_grad_(True) for _ in range(2))
    out_c, out_e = compiled(xc), fn(xe)
    torch.testing.assert_close(out_c, out_e)
    out_c.sum().backward()
    out_e.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)

    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(2, 129, 256, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(32000, 256, device="cuda", generator=g) / 16).requires_grad_(True)  # fp32
    hidden_fn = lambda h_, w_: get_logps_from_hidden(h_, w_, ids, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_c = torch.compile(hidden_fn, fullgraph=True)(h, w)
        out_e = hidden_fn(h, w)
    torch.testing.assert_close(out_c, out_e)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_cuda_graph_replay_of_forward_and_backward(path):
    """Capture forward + backward once, replay on new data: same values and gradients as eager.
    Validation inside capture is a device assert, and the hidden path computes every row."""
    B, T, V, H = 2, 257, 32000, 256
    logits, ids, mask = _case(B, T, V)
    g = torch.Generator(device="cuda").manual_seed(2)
    if path == "logits":
        static = logits.clone().requires_grad_(True)
        params = [static]
        fn = lambda: get_logps(static, ids, mask)
    else:
        static = torch.randn(B, T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
        w = (torch.randn(V, H, device="cuda", generator=g) / 16).bfloat16().requires_grad_(True)
        params = [static, w]
        # compact=False: the warm-up then runs the kernel variants the capture replays
        fn = lambda: get_logps_from_hidden(static, w, ids, mask, compact=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compile the kernels outside the capture
            for p in params:
                p.grad = None
            fn().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph):
        static_out = fn()
        static_out.sum().backward()
    new = torch.randn(static.shape, device="cuda", generator=g).to(static.dtype)
    with torch.no_grad():
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager_params = [new.clone().requires_grad_(True)] + [p.detach().clone().requires_grad_(True)
                                                          for p in params[1:]]
    if path == "logits":
        eager_out = get_logps(eager_params[0], ids, mask)
    else:
        eager_out = get_logps_from_hidden(eager_params[0], eager_params[1], ids, mask, compact=False)
    eager_out.sum().backward()
    torch.testing.assert_close(static_out, eager_out, rtol=1e-5, atol=1e-3)
    for p, e in zip(params, eager_params, strict=True):
        torch.testing.assert_close(p.grad.float(), e.grad.float(), rtol=1e-2, atol=2e-3)


def test_fp32_master_weight_and_shift_false():
    g = torch.Generator(device="cuda").manual_seed(3)
    B, T, H, V = 2, 96, 256, 128256
    h = torch.randn(B, T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(V, H, device="cuda", generator=g) / 16).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = get_logps_from_hidden(h, w, ids, reduction="none")
    out.sum().backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    hd, wd = h.detach().double().requires_grad_(True), w.detach().bfloat16().double().requires_grad_(True)
    ref = get_logps_from_hidden(hd, wd, ids, impl="torch", reduction="none")
    ref.sum().backward()
    # bf16 logits: one rounding of the label logit and of the log-sum-exp per token
    tol = 4 * torch.finfo(torch.bfloat16).eps * (hd @ wd.T).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol
    for a, b in ((h.grad, hd.grad), (w.grad, wd.grad)):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-2
    logits, ids2, mask = _case(2, 65, 32000)
    aligned = get_logps(logits[:, :-1], ids2[:, 1:], mask[:, 1:], shift=False)
    torch.testing.assert_close(aligned, get_logps(logits, ids2, mask), rtol=0, atol=0)
