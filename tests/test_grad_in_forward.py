"""dpo_loss_from_hidden(grad_in_forward=True), the 3-matmul loss: against the 4-matmul autograd
path, in groups of one pair, several and an uneven last group; its host syncs per batch."""

import warnings

import pytest
import torch
from helpers import assert_close_to_truth

from fused_dpo import FusedDPOLoss, dpo_loss_from_hidden
from fused_dpo import hidden as hid

IMPLS = ["triton", "torch"]


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
    for coupled in ("bco_pair_running_mean", "aot", "aot_unpaired"):  # aot: wrong gradients before the check
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


def _pairs_case(n_pairs, T, H, V, dtype, device, seed=11):
    """hidden, weight, bias, ids, mask and ref for n_pairs pairs; response lengths differ, so the
    pairs have different row counts and a byte budget packs them unevenly."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_pairs
    h = torch.randn(n, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) / 4
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i in range(n):
        mask[i, 1 + i % (T - 2):] = True
    ref = torch.randn(n, generator=g, dtype=torch.float64) - 3 * T
    cast = lambda t: t.to(dtype).to(device)
    return cast(h), cast(w), cast(b), ids.to(device), mask.to(device), ref.to(device)


def _loss_and_grads(h, w, b, ids, mask, ref, **kw):
    """(loss, d hidden, d weight, d bias) of 1.7 * loss on fresh leaves."""
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    ref = ref.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    loss, _ = dpo_loss_from_hidden(*leaves[:2], ids, mask, bias=leaves[2], ref_logps=ref,
                                   loss_type="sigmoid", beta=0.3, chunk_size=32, **kw)
    (loss * 1.7).backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.fixture
def plans(monkeypatch):
    """The groups each pass used, as [(first pair, end pair)] per call."""
    seen = []
    real = hid._plan_groups

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(hid, "_plan_groups", spy)
    return seen


# 5 pairs: groups of 1; of 2 (2, 2, 1: an uneven last group); of 3 (3, 2); the rule with room for
# about two pairs' logits (rows differ per pair, so the groups do too).
GROUPINGS = {
    "1": (1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    "2": (2, [(0, 2), (2, 4), (4, 5)]),
    "3": (3, [(0, 3), (3, 5)]),
    "rule": (None, None),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_groups_equal_four_matmul_path_float64(impl, grouping, plans, monkeypatch, device):
    """Every grouping gives the 4-matmul path's loss and gradients, in float64 to rounding."""
    T, H, V = 9, 8, 40
    case = _pairs_case(5, T, H, V, torch.float64, device)
    ppg, want = GROUPINGS[grouping]
    if ppg is None:  # a budget of 22 rows of V float64 logits; the pairs hold 9 to 14 rows
        monkeypatch.setattr(hid, "_GROUP_LOGITS_BYTES", 22 * V * 8)
        rows = case[4][:, 1:].sum(1)
        unit_rows = (rows[:5] + rows[5:]).tolist()
        want, u0, held = [], 0, 0  # the rule, spelled out: greedy under the budget
        for u, r in enumerate(unit_rows):
            if u > u0 and held + r > 22:
                want.append((u0, u))
                u0, held = u, 0
            held += r
        want.append((u0, 5))
        assert len(want) >= 3 and len({b - a for a, b in want}) > 1, (unit_rows, want)
    four = _loss_and_grads(*case, impl=impl)
    three = _loss_and_grads(*case, impl=impl, grad_in_forward=True, pairs_per_group=ppg)
    assert plans == [want]
    for name, a, e in zip(("loss", "d hidden", "d weight", "d bias"), three, four, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_groups_bf16_within_tolerance_of_float64(impl, plans, device):
    """bf16 hidden, weight and bias: groups of 1, 2 and 3 (an uneven last group) against float64
    of the same bf16 operands, no farther than the 4-matmul path in bf16 is, plus 4 eps."""
    T, H, V = 10, 16, 72
    case = _pairs_case(5, T, H, V, torch.bfloat16, device, seed=12)
    four = _loss_and_grads(*case, impl=impl)
    truth = _loss_and_grads(*(t.double() for t in case[:3]), *case[3:], impl=impl)
    for ppg in (1, 2, 3):
        three = _loss_and_grads(*case, impl=impl, grad_in_forward=True, pairs_per_group=ppg)
        assert plans[-1] == GROUPINGS[str(ppg)][1]
        assert [t.dtype for t in three[1:]] == [torch.bfloat16] * 3
        for i, name in enumerate(("loss", "d hidden", "d weight", "d bias")):
            tol = 4 * torch.finfo(torch.bfloat16).eps * max(truth[i].abs().max().item(), 1e-3)
            assert_close_to_truth(three[i], four[i], truth[i], tol, f"{name}, {ppg} pairs a group")


def test_plan_groups_rule(monkeypatch):
    """Explicit sizes: consecutive units, the last group the rest. The rule: greedy under the
    byte budget, at least one unit a group (a unit over budget alone), at most 8."""
    plan = hid._plan_groups
    assert plan([5] * 5, 100, 2, 2) == [(0, 2), (2, 4), (4, 5)]
    assert plan([5] * 3, 100, 2, 7) == [(0, 3)]
    assert plan([], 100, 2) == []
    monkeypatch.setattr(hid, "_GROUP_LOGITS_BYTES", 1000)  # 5 rows of V=100 bf16 logits
    assert plan([2, 3, 1, 9, 4, 0, 1], 100, 2) == [(0, 2), (2, 3), (3, 4), (4, 7)]
    assert plan([1] * 20, 1, 2) == [(0, 8), (8, 16), (16, 20)]  # the cap
    assert plan([0] * 3, 100, 2) == [(0, 3)]  # nothing scored: nothing held


_SYNCS = [(torch.Tensor, name) for name in ("item", "tolist", "nonzero", "cpu", "numpy",
                                            "__bool__", "__int__", "__float__")] + \
         [(torch, name) for name in ("nonzero", "as_tensor", "tensor")]


def _count_syncs(fn):
    """fn() with every Python-level call that reads a device value on the host (or uploads a host
    list) counted; (result, count). Calls made inside the row launchers are not counted: the
    chunked-PyTorch launchers stand in for the Triton kernels, and their CPU-only branches (an
    index_fill_ by nonzero() rows, no sync on a CPU) are not the pass's host work."""
    import sys

    count = [0]
    with pytest.MonkeyPatch.context() as mp:
        for owner, name in _SYNCS:
            real = getattr(owner, name)

            def counted(*a, _real=real, **k):
                if not sys._getframe(1).f_code.co_filename.endswith("_torch_rows.py"):
                    count[0] += 1
                return _real(*a, **k)

            mp.setattr(owner, name, counted)
        out = fn()
    return out, count[0]


@pytest.mark.parametrize("pairs_per_group", [None, 1], ids=["rule", "1"])
def test_index_building_once_per_batch(pairs_per_group, device):
    """The host syncs of a grad_in_forward call (validate=False) do not grow with the pairs, even
    at one pair a group: the row indices are built once per batch (one .tolist())."""
    counts = {}
    for n_pairs in (2, 6):
        case = _pairs_case(n_pairs, 7, 8, 24, torch.float64, device)
        kw = {} if pairs_per_group is None else {"pairs_per_group": pairs_per_group}
        _, counts[n_pairs] = _count_syncs(lambda case=case, kw=kw: _loss_and_grads(
            *case, impl="torch", grad_in_forward=True, validate=False, **kw))
    assert counts[2] == counts[6] <= 1, counts


@pytest.mark.cuda
def test_cuda_syncs_once_per_batch():
    """On CUDA, torch's sync debug mode counts the synchronizing calls: one per batch, for 2 or
    6 pairs at one pair a group."""
    counts = {}
    for n_pairs in (2, 6):
        h, w, b, ids, mask, ref = _pairs_case(n_pairs, 7, 16, 300, torch.bfloat16, "cuda")
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        for debug in (0, 1):  # a warm-up (compiles, the addmm probe), then the counted call
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode(debug)
                try:
                    loss, _ = dpo_loss_from_hidden(hh, ww, ids, mask, bias=b, ref_logps=ref.float(),
                                                   grad_in_forward=True, pairs_per_group=1,
                                                   validate=False)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            loss.backward()
        counts[n_pairs] = sum("synchroniz" in str(c.message) for c in caught)
    assert counts[2] == counts[6] <= 1, counts


def test_pairs_per_group_is_checked():
    h = torch.randn(2, 5, 4)
    w = torch.randn(9, 4)
    ids = torch.randint(0, 9, (2, 5))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="pairs_per_group must be a positive int"):
            dpo_loss_from_hidden(h, w, ids, None, ref_logps=torch.zeros(2), grad_in_forward=True,
                                 pairs_per_group=bad)
    with pytest.raises(ValueError, match="grad_in_forward=True only"):
        dpo_loss_from_hidden(h, w, ids, None, ref_logps=torch.zeros(2), pairs_per_group=2)
    with pytest.raises(ValueError, match="grad_in_forward=True only"):  # at construction
        FusedDPOLoss(pairs_per_group=2)
    loss_fn = FusedDPOLoss(grad_in_forward=True, pairs_per_group=1, impl="torch")
    want, _ = dpo_loss_from_hidden(h, w, ids, None, ref_logps=torch.zeros(2), impl="torch")
    torch.testing.assert_close(loss_fn(h, w, ids, None, ref_logps=torch.zeros(2))[0], want)
