"""get_logps against the float64 eager reference: values, gradients, options, bad input."""

import pytest
import torch
from helpers import assert_close_to_truth, make_inputs

from fused_dpo import get_logps
from fused_dpo.reference import get_logps_reference

IMPLS = ["triton", "torch"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-6}


def _run(logits, ids, mask, impl, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = get_logps(x, ids, mask, impl=impl, **kw)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * g.to(out.device, out.dtype)).sum().backward()
    return out, x.grad


def _truth_and_eager(logits, ids, mask, **kw):
    truth = _run(logits.double(), ids, mask, "reference", **kw)
    eager = _run(logits, ids, mask, "reference", **kw)
    return truth, eager


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize(
    "temp_cap", [(1.0, None), (0.7, None), (1.0, 5.0), (1.3, 3.0)], ids=lambda p: f"t{p[0]}-c{p[1]}"
)
# T = 17: every row takes the same code path, and the interpreter's time grows with the rows
# (T = 47 took three times as long)
@pytest.mark.parametrize("shape", [(3, 17, 123), (2, 9, 257)], ids=lambda s: "B{}-T{}-V{}".format(*s))
def test_matches_float64_truth(impl, dtype, reduction, temp_cap, shape, device):
    temperature, softcap = temp_cap
    logits, ids, mask = make_inputs(*shape, dtype, device)
    kw = dict(reduction=reduction, temperature=temperature, softcap=softcap)
    (t_out, t_grad), (e_out, e_grad) = _truth_and_eager(logits, ids, mask, **kw)
    out, grad = _run(logits, ids, mask, impl, **kw)
    assert out.dtype == torch.float32
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close_to_truth(out, e_out, t_out, TOL[dtype] * max(1.0, t_out.abs().max().item()), "out")
    # The gradient lands in the logits dtype: one rounding to that dtype is allowed on top.
    round_tol = 2 * torch.finfo(dtype).eps * t_grad.abs().max().item()
    assert_close_to_truth(grad, e_grad, t_grad, TOL[dtype] + round_tol, "grad")


@pytest.mark.parametrize("impl, block_v", [("triton", None), ("triton", 8), ("torch", None)],
                         ids=["triton", "triton-blocks8", "torch"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "cap"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck_float64(impl, block_v, softcap, reduction, set_blocks, device):
    if block_v:
        set_blocks(block_v)  # V = 11 in two vocabulary blocks, the second partial
    logits, ids, mask = make_inputs(2, 5, 11, torch.float64, device)
    x = logits.clone().requires_grad_(True)
    fn = lambda t: get_logps(t, ids, mask, impl=impl, softcap=softcap, temperature=0.8,
                             reduction=reduction)
    # The kernels take temperature/softcap as float32 scalars: consistent, so 1e-6 is plenty.
    # Triton in fast_mode (finite differences along random directions): the full Jacobian takes
    # 10-60 s a case in the interpreter, and one gradient element off by 1e-5 fails either mode.
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_labels_convention_equals_mask_convention(impl, device):
    logits, ids, mask = make_inputs(3, 13, 50, torch.float32, device)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    a = _run(logits, ids, mask, impl)
    b_x = logits.clone().requires_grad_(True)
    b = get_logps(b_x, labels=labels, impl=impl)
    g = torch.randn(b.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (b * g.to(b.device, b.dtype)).sum().backward()
    torch.testing.assert_close(a[0], b, rtol=0, atol=0)
    torch.testing.assert_close(a[1], b_x.grad, rtol=0, atol=0)
    # a different ignore_index is honoured
    labels7 = torch.where(mask, ids, torch.full_like(ids, 7))
    labels7[mask & (ids == 7)] = 8  # keep 7 only as the marker
    ids8 = torch.where(mask & (ids == 7), torch.full_like(ids, 8), ids)
    torch.testing.assert_close(
        get_logps(logits, labels=labels7, ignore_index=7, impl=impl),
        get_logps(logits, ids8, mask, impl=impl),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_views_are_read_in_place(impl, device):
    B, T, V, pad = 2, 10, 37, 11
    big, ids, mask = make_inputs(B, T + 3, V + pad, torch.float32, device)
    views = {
        "time-slice": big[:, :T, :V],  # like logits[:, :-1] of a longer tensor
        "vocab-padded": big[:, 2 : 2 + T, :V],
        "transposed-batch": big[:, :T, :V].transpose(0, 1).contiguous().transpose(0, 1),
    }
    ids, mask = ids[:, :T] % V, mask[:, :T]
    for name, view in views.items():
        (t_out, t_grad), (e_out, e_grad) = _truth_and_eager(view, ids, mask)
        out, grad = _run(view, ids, mask, impl)
        assert_close_to_truth(out, e_out, t_out, 1e-4, name)
        assert_close_to_truth(grad, e_grad, t_grad, 1e-6, name + " grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_masks_and_label_extremes(impl, device):
    B, T, V = 4, 6, 29
    logits, ids, _ = make_inputs(B, T, V, torch.float32, device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[1, -1] = True  # only the last token
    mask[2, 1:] = True
    mask[3, 1:] = True
    ids[2, 1:] = 0
    ids[3, 1:] = V - 1
    out, counts = get_logps(logits, ids, mask, impl=impl, reduction="mean", return_counts=True)
    ref, ref_counts = get_logps_reference(logits.double(), ids, mask, reduction="mean",
                                          return_counts=True)
    assert out[0].item() == 0.0 and counts[0].item() == 0.0  # all-masked row: 0, never NaN
    torch.testing.assert_close(counts, ref_counts.float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad_x = logits.clone().requires_grad_(True)
    get_logps(grad_x, ids, mask, impl=impl).sum().backward()
    assert (grad_x.grad[0] == 0).all() and (grad_x.grad[:, -1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_T1_gives_zero(impl, device):
    logits, ids, mask = make_inputs(2, 1, 17, torch.float32, device)
    x = logits.clone().requires_grad_(True)
    out, counts = get_logps(x, ids, mask, impl=impl, return_counts=True)
    assert out.tolist() == [0.0, 0.0] and counts.tolist() == [0.0, 0.0]
    out.sum().backward()
    assert (x.grad == 0).all()
    assert get_logps(logits, ids, mask, impl=impl, reduction="none").shape == (2, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_or_inf_in_response_row_gives_nan_prompt_rows_unread(impl, device):
    logits, ids, mask = make_inputs(3, 8, 31, torch.float32, device)
    mask[:, :3] = False
    mask[:, 3:] = True
    logits[0, 4, 5] = float("nan")  # response row of sequence 0
    logits[1, 5, 2] = float("inf")  # response row of sequence 1
    logits[2, 0, :] = float("nan")  # prompt row of sequence 2: never read
    out = get_logps(logits, ids, mask, impl=impl)
    assert torch.isnan(out[0]) and torch.isnan(out[1])
    clean = logits[2:].clone()
    clean[0, 0] = 0.0
    torch.testing.assert_close(out[2:], get_logps_reference(clean, ids[2:], mask[2:]))


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label_without_validation_is_nan(impl, device):
    logits, ids, mask = make_inputs(2, 5, 13, torch.float32, device)
    mask[:] = True
    ids[1, 3] = 13
    out = get_logps(logits, ids, mask, impl=impl, validate=False)
    assert not torch.isnan(out[0]) and torch.isnan(out[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_overwrites_logits_with_the_gradient(impl, device):
    logits, ids, mask = make_inputs(2, 9, 40, torch.bfloat16, device)
    expected = _run(logits, ids, mask, impl)[1]
    leaf = logits.float().requires_grad_(True)
    x = leaf.to(torch.bfloat16)  # a non-leaf, like an lm_head output
    out = get_logps(x, ids, mask, impl=impl, inplace_backward=True)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(out)).sum().backward()
    torch.testing.assert_close(leaf.grad, expected.float(), rtol=0, atol=0)
    torch.testing.assert_close(x.detach(), expected, rtol=0, atol=0)  # storage now holds grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_mask_and_id_dtypes(impl, mask_dtype, device):
    logits, ids, mask = make_inputs(2, 7, 19, torch.float32, device)
    ref = get_logps_reference(logits.double(), ids, mask)
    out = get_logps(logits, ids.int(), mask.to(mask_dtype), impl=impl)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_float_mask_weights_tokens(device):
    logits, ids, mask = make_inputs(2, 7, 19, torch.float32, device)
    w = mask.float() * torch.linspace(0.5, 2, 7, device=device)
    for impl in IMPLS:
        out, counts = get_logps(logits, ids, w, impl=impl, return_counts=True)
        ref, ref_counts = get_logps_reference(logits.double(), ids, w, return_counts=True)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(counts.double(), ref_counts.double())


def test_auto_picks_torch_on_cpu():
    from fused_dpo import _common, _torch_rows

    assert _common.backend("auto", torch.device("cpu")) is _torch_rows


BAD = [
    ("logits rank", lambda L, ids, M: get_logps(L[0], ids, M), ValueError, "3 dimensions"),
    ("ids shape", lambda L, ids, M: get_logps(L, ids[:, :-1], M), ValueError, "input_ids has shape"),
    ("mask shape", lambda L, ids, M: get_logps(L, ids, M[:1]), ValueError, "response_mask has shape"),
    ("logits dtype", lambda L, ids, M: get_logps(L.int(), ids, M), TypeError, "torch.int32"),
    ("ids dtype", lambda L, ids, M: get_logps(L, ids.float(), M), TypeError, "input_ids has dtype"),
    ("mask dtype", lambda L, ids, M: get_logps(L, ids, M.to(torch.complex64)), TypeError, "complex"),
    ("label high", lambda L, ids, M: get_logps(L, ids.clamp(max=0) + 19, M), ValueError, "outside"),
    ("label neg", lambda L, ids, M: get_logps(L, ids - 100, M), ValueError, "outside the vocab"),
    ("reduction", lambda L, ids, M: get_logps(L, ids, M, reduction="avg"), ValueError, "'avg'"),
    ("impl", lambda L, ids, M: get_logps(L, ids, M, impl="cuda"), ValueError, "'cuda'"),
    ("temperature", lambda L, ids, M: get_logps(L, ids, M, temperature=0), ValueError, "temperature"),
    ("softcap", lambda L, ids, M: get_logps(L, ids, M, softcap=-1.0), ValueError, "softcap"),
    ("temperature-tensor", lambda L, ids, M: get_logps(L, ids, M, temperature=torch.tensor(0.7)),
     TypeError, r"temperature must be a Python int or float, got Tensor tensor\(0.7"),
    ("softcap-bool", lambda L, ids, M: get_logps(L, ids, M, softcap=True), TypeError,
     "softcap must be None or a Python int or float, got bool"),
    ("both", lambda L, ids, M: get_logps(L, ids, M, labels=ids), ValueError, "not both"),
    ("neither", lambda L, ids, M: get_logps(L), ValueError, "input_ids"),
    ("not tensor", lambda L, ids, M: get_logps(L.tolist(), ids, M), TypeError, "torch.Tensor"),
    ("device", lambda L, ids, M: get_logps(L, ids.to("meta"), M), ValueError, "is on meta"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_errors(case, device):
    logits, ids, mask = make_inputs(2, 6, 19, torch.float32, device)
    mask[:, 1:] = True
    _, fn, exc, text = case
    with pytest.raises(exc, match=text):
        fn(logits, ids, mask)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from fused_dpo import _common

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        _common.backend("triton", torch.device("cpu"))


@pytest.fixture
def set_blocks(monkeypatch):
    """set_blocks(block_v, rows=1): for one test, the vocabulary block and rows per program that
    FUSED_DPO_BLOCK_V / FUSED_DPO_ROWS set at import."""
    from fused_dpo.kernels import logps as K

    def set_(block_v, rows=1):
        monkeypatch.setattr(K, "_BLOCK_V", block_v)
        monkeypatch.setattr(K, "_ROWS", rows)
        K.launch_config.cache_clear()

    yield set_
    K.launch_config.cache_clear()


@pytest.fixture(params=[1, 2, 4], ids=lambda r: f"rows{r}")
def small_blocks(set_blocks, request):
    """Several vocabulary blocks per row (BLOCK_V 128), as realistic vocabularies have on a GPU;
    one row per program, or several (FUSED_DPO_ROWS: the [rows, block] tile kernel)."""
    set_blocks(128, request.param)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "cap"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_online_lse_across_blocks(small_blocks, softcap, dtype, device):
    """The online max / sum across vocabulary blocks, including rows whose leading blocks are all
    -inf and rows that are -inf everywhere; with a prompt (unread rows) and an odd row count, so a
    multi-row program holds live, dead and out-of-range rows at once."""
    logits, ids, mask = make_inputs(3, 10, 300, dtype, device)
    mask[:] = True
    mask[2, :4] = False
    logits[0, 2, :200] = float("-inf")  # first block(s) all -inf
    logits[1, 3, :] = float("-inf")  # a whole row of -inf
    ids[0, 3] = 250
    out = get_logps(logits, ids, mask, impl="triton", softcap=softcap, reduction="none")
    ref = get_logps_reference(logits.double(), ids, mask, softcap=softcap, reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isfinite(out[0, 2])
    # an all -inf row is NaN, like eager; with a cap it becomes -c everywhere, hence finite
    assert torch.isnan(out[1, 3]) == (softcap is None)
    assert (out[2, :3] == 0).all()  # prompt rows: 0, unread
    labels = torch.where(mask, ids, -100)
    by_labels = get_logps(logits, labels=labels, impl="triton", softcap=softcap, reduction="none")
    torch.testing.assert_close(by_labels, out, rtol=0, atol=0, equal_nan=True)
