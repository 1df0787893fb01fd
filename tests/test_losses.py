"""Each loss against its formula written out independently here in float64 Python math."""

import math

import pytest
import torch

from fused_dpo.losses import LOSS_TYPES, BCOState, dpo_loss


def lsig(x):  # log sigmoid, stable, plain Python
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(lsig(x))


B, EPS, GAMMA, TAU = 0.3, 0.1, 0.5, 0.05


def by_formula(name, pc, pr, rc, rr, nc, nr):
    hc, hr = pc - rc, pr - rr
    u = hc - hr
    z = B * u
    mean = lambda lp, n: lp / n if n > 0 else 0.0
    if name == "sigmoid":
        return -(1 - EPS) * lsig(z) - EPS * lsig(-z)
    if name == "robust":
        return ((1 - EPS) * -lsig(z) + EPS * lsig(-z)) / (1 - 2 * EPS)
    if name == "hinge":
        return max(0.0, 1 - z)
    if name == "ipo":
        return (mean(hc, nc) - mean(hr, nr) - 1 / (2 * B)) ** 2
    if name == "exo_pair":
        return sig(z) * (lsig(z) - math.log(1 - EPS)) + sig(-z) * (lsig(-z) - math.log(EPS))
    if name == "nca_pair":
        return -lsig(B * hc) - 0.5 * lsig(-B * hc) - 0.5 * lsig(-B * hr)
    if name == "apo_zero":
        return 1 - sig(B * hc) + sig(B * hr)
    if name == "apo_down":
        return sig(B * hc) + 1 - sig(B * u)
    if name == "discopop":
        m = sig(z / TAU)
        return (1 - m) * -lsig(z) + m * math.exp(-z)
    if name == "simpo":
        d = B * (mean(pc, nc) - mean(pr, nr)) - GAMMA
        return -(1 - EPS) * lsig(d) - EPS * lsig(-d)
    if name == "orpo":
        ac, ar = min(mean(pc, nc), -1e-12), min(mean(pr, nr), -1e-12)
        odds = lambda a: a - math.log(1 - math.exp(a))
        return -ac - B * lsig(odds(ac) - odds(ar))
    if name == "sft":
        return -mean(pc, nc)
    raise KeyError(name)


def _batch():
    g = torch.Generator().manual_seed(0)
    pc = -torch.rand(6, generator=g, dtype=torch.float64) * 40 - 1
    pr = -torch.rand(6, generator=g, dtype=torch.float64) * 40 - 1
    rc = pc + torch.randn(6, generator=g, dtype=torch.float64) * 3
    rr = pr + torch.randn(6, generator=g, dtype=torch.float64) * 3
    nc = torch.randint(1, 30, (6,), generator=g).double()
    nr = torch.randint(1, 30, (6,), generator=g).double()
    pc[0], pr[0], rc[0], rr[0] = -5.0, -5.0, -5.0, -5.0  # equal chosen / rejected
    return pc, pr, rc, rr, nc, nr


def _kw(name):
    return dict(loss_type=name, beta=B, label_smoothing=EPS, simpo_gamma=GAMMA, discopop_tau=TAU,
                reduction="none")


@pytest.mark.parametrize("name", [n for n in LOSS_TYPES if n != "bco_pair"])
def test_loss_matches_formula(name):
    pc, pr, rc, rr, nc, nr = _batch()
    got, _ = dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, **_kw(name))
    want = [by_formula(name, *(float(t[i]) for t in (pc, pr, rc, rr, nc, nr))) for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_equal_chosen_rejected_dpo_is_log2():
    z = torch.full((3,), -7.0, dtype=torch.float64)
    loss, m = dpo_loss(z, z, z, z, beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-15
    assert m["rewards/margins"].item() == 0.0 and m["rewards/accuracies"].item() == 0.0


def test_bco_running_mean_state():
    pc, pr, rc, rr, nc, nr = _batch()
    state = BCOState()
    got, _ = dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", beta=B, bco_state=state, reduction="none")
    rewards = torch.cat([B * (pc - rc), B * (pr - rr)])
    delta = rewards.mean().item()
    assert state.count == 12 and abs(state.mean - delta) < 1e-12
    want = [-lsig(B * float(pc[i] - rc[i]) - delta) - lsig(-(B * float(pr[i] - rr[i]) - delta))
            for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    dpo_loss(pc[:2], pr[:2], rc[:2], rr[:2], loss_type="bco_pair", beta=B, bco_state=state)
    all_r = torch.cat([rewards, B * (pc[:2] - rc[:2]), B * (pr[:2] - rr[:2])])
    assert state.count == 16 and abs(state.mean - all_r.mean().item()) < 1e-12


def test_weighted_combination_and_rpo():
    pc, pr, rc, rr, nc, nr = _batch()
    kw = dict(chosen_counts=nc, rejected_counts=nr, beta=B, reduction="none")
    a, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", **kw)
    b, _ = dpo_loss(pc, pr, rc, rr, loss_type="sft", **kw)
    c, _ = dpo_loss(pc, pr, rc, rr, loss_type="hinge", **kw)
    mpo, _ = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft", "hinge"],
                      loss_weights=[0.8, 0.2, 1.5], **kw)
    torch.testing.assert_close(mpo, 0.8 * a + 0.2 * b + 1.5 * c)
    rpo, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", rpo_alpha=0.5, **kw)
    torch.testing.assert_close(rpo, a + 0.5 * b)


@pytest.mark.parametrize("name", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_margins_and_zero_length_stay_finite(name, dtype):
    big = torch.tensor([1e4, -1e4, 0.0], dtype=dtype)
    pc = (-1.0 - torch.relu(big)).requires_grad_(True)
    pr = (-1.0 - torch.relu(-big)).requires_grad_(True)
    ref = torch.full((3,), -1.0, dtype=dtype)
    counts = torch.tensor([5.0, 5.0, 0.0], dtype=dtype)  # the last pair has empty responses
    kw = _kw(name)
    kw["reduction"] = "mean"
    loss, metrics = dpo_loss(pc, pr, ref, ref, chosen_counts=counts, rejected_counts=counts,
                             bco_state=BCOState(), **kw)
    loss.backward()
    assert torch.isfinite(loss), loss
    for g in (pc.grad, pr.grad):
        assert g is None or torch.isfinite(g).all(), g  # sft / orpo-free terms may not use pr
    assert all(torch.isfinite(v) for v in metrics.values())


def test_metrics_names_and_values():
    pc, pr, rc, rr, *_ = _batch()
    _, m = dpo_loss(pc, pr, rc, rr, beta=B)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected"}
    torch.testing.assert_close(m["rewards/margins"], (B * ((pc - rc) - (pr - rr))).mean())
    torch.testing.assert_close(m["rewards/accuracies"], ((pc - rc) > (pr - rr)).double().mean().float())
    assert not any(v.requires_grad for v in m.values())


BAD = [
    (dict(loss_type="dpo2"), ValueError, "unknown loss_type"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(label_smoothing=0.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_type="ipo"), ValueError, "chosen_counts"),
    (dict(loss_type="bco_pair"), ValueError, "bco_state"),
    (dict(reduction="sum"), ValueError, "reduction"),
    (dict(beta=True), ValueError, "beta"),  # a bool is not a number (TOML `beta = true`)
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -0.5]), ValueError, "loss_weights"),
    (dict(loss_weights=[float("nan")]), ValueError, "loss_weights"),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
    (dict(loss_type="discopop", discopop_tau=-1.0), ValueError, "discopop_tau"),
    (dict(simpo_gamma=float("nan")), ValueError, "simpo_gamma"),
    (dict(rpo_alpha=float("nan"), chosen_counts=torch.ones(2), rejected_counts=torch.ones(2)),
     ValueError, "rpo_alpha must be a finite number"),
]


@pytest.mark.parametrize("kw,exc,text", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_options(kw, exc, text):
    z = torch.zeros(2)
    with pytest.raises(exc, match=text):
        dpo_loss(z, z, z, z, **kw)


def test_missing_reference_and_shape_mismatch():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        dpo_loss(z, z)
    with pytest.raises(ValueError, match="has shape"):
        dpo_loss(z, torch.zeros(3), z, z)
    dpo_loss(z - 1, z - 1, loss_type="simpo", chosen_counts=z + 1, rejected_counts=z + 1)  # ok


def test_empty_batch_is_an_error_not_nan():
    z = torch.zeros(0)
    with pytest.raises(ValueError, match="empty batch"):
        dpo_loss(z, z, z, z)


def test_fused_loss_module_rejects_unknown_and_bad_options_at_construction():
    from fused_dpo import FusedDPOLoss

    FusedDPOLoss(beta=0.2, loss_type="ipo", discopop_tau=0.1)  # ok
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['losstype'\]"):
        FusedDPOLoss(losstype="ipo")
    with pytest.raises(ValueError, match="discopop_tau"):
        FusedDPOLoss(discopop_tau=0.0)
    with pytest.raises(ValueError, match="simpo_gamma"):
        FusedDPOLoss(simpo_gamma=float("nan"))
