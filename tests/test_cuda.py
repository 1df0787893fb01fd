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
