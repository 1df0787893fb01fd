"""Each loss against its formula written out independently here in float64 Python math."""

import math

import pytest
import torch

from fused_dpo.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    SORTED_LOSS_TYPES,
    BCOState,
    dpo_loss,
    f_divergence_scores,
    ld_prefix_logps,
)


def lsig(x):  # log sigmoid, stable, plain Python
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(lsig(x))


B, EPS, GAMMA, TAU = 0.3, 0.1, 0.5, 0.05


def by_formula(name, pc, pr, rc, rr, nc, nr, score=lambda h: h):
    """score: the f-DPO score of a log-ratio (identity for DPO's reverse KL)."""
    hc, hr = pc - rc, pr - rr
    sc, sr = score(hc), score(hr)
    u = sc - sr
    z = B * u
    mean = lambda lp, n: lp / n if n > 0 else 0.0
    if name == "sigmoid":
        return -(1 - EPS) * lsig(z) - EPS * lsig(-z)
    if name == "robust":
        return ((1 - EPS) * -lsig(z) + EPS * lsig(-z)) / (1 - 2 * EPS)
    if name == "hinge":
        return max(0.0, 1 - z)
    if name == "ipo":
        return (mean(sc, nc) - mean(sr, nr) - 1 / (2 * B)) ** 2
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
        odds = lambda a: a - math.log(-math.expm1(a))  # log(1 - e^a), accurate near a = 0
        return -ac - B * lsig(odds(ac) - odds(ar))
    if name == "bco_pair":  # TRL 1.16's: no reward shift
        return -lsig(B * hc) - lsig(-B * hr)
    if name == "sppo_hard":
        return (hc - 0.5 / B) ** 2 + (hr + 0.5 / B) ** 2
    if name == "sigmoid_norm":
        d = B * (mean(sc, nc) - mean(sr, nr))
        return -(1 - EPS) * lsig(d) - EPS * lsig(-d)
    raise KeyError(name)


def expected(name, pc, pr, rc, rr, nc, nr, score=lambda h: h):
    """The (B,) losses in plain Python: per pair by_formula, or sft's one batch value in every entry:
    the NLL per chosen token of the batch, sum_i -pc_i / sum_i nc_i (TRL 1.16's
    -per_token_logps[chosen_mask].mean())."""
    cols = [[float(x) for x in t] for t in (pc, pr, rc, rr, nc, nr)]
    if name == "sft":
        return [-sum(cols[0]) / max(sum(cols[4]), 1.0)] * len(cols[0])
    return [by_formula(name, *row, score=score) for row in zip(*cols, strict=True)]


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


# Every loss but the stateful one (its own test below) and the sorted ones (theirs further down).
BY_FORMULA = [n for n in LOSS_TYPES if n != "bco_pair_running_mean" and n not in SORTED_LOSS_TYPES]


@pytest.mark.parametrize("name", BY_FORMULA)
def test_loss_matches_formula(name):
    pc, pr, rc, rr, nc, nr = _batch()  # ragged lengths: nc from 1 to 29
    got, _ = dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, **_kw(name))
    want = expected(name, pc, pr, rc, rr, nc, nr)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_sft_is_the_batch_token_mean_not_the_mean_of_means():
    """TRL 1.16's sft is -per_token_logps[chosen_mask].mean(): a response of 29 tokens weighs 29
    times one of 1 token. From per-token log-probs of ragged responses, with its gradient."""
    pol, _, mask = _token_batch()  # chosen lengths 5, 2, 3, 4
    pol.requires_grad_(True)
    logps, n = (pol * mask).sum(-1), mask.sum(-1)
    loss, _ = dpo_loss(logps[:4], logps[4:], loss_type="sft", chosen_counts=n[:4], rejected_counts=n[4:])
    on = mask[:4] != 0
    want = -pol[:4][on].mean()
    mean_of_means = -((pol[:4] * mask[:4]).sum(-1) / n[:4]).mean()
    assert abs(float(want.detach() - mean_of_means.detach())) > 1e-2  # the readings differ here
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=0)
    (g,) = torch.autograd.grad(loss, pol)
    torch.testing.assert_close(g[:4][on], torch.full((14,), -1 / 14, dtype=torch.float64))
    assert (g[:4][~on] == 0).all() and (g[4:] == 0).all()
    # reduction="none": the batch value in every entry; with rpo_alpha, alpha times it
    z = torch.zeros(4, dtype=torch.float64)
    per, _ = dpo_loss(logps[:4], logps[4:], loss_type="sft", chosen_counts=n[:4], rejected_counts=n[4:],
                      reduction="none")
    torch.testing.assert_close(per, want.expand(4))
    rpo, _ = dpo_loss(logps[:4], logps[4:], z, z, loss_type="hinge", beta=B, rpo_alpha=0.5,
                      chosen_counts=n[:4], rejected_counts=n[4:])
    hinge, _ = dpo_loss(logps[:4], logps[4:], z, z, loss_type="hinge", beta=B)
    torch.testing.assert_close(rpo, hinge + 0.5 * want)


HALF = [(torch.bfloat16, 128.0, 256), (torch.float16, 1024.0, 2048)]


@pytest.mark.parametrize("dtype,a,n", HALF, ids=["bf16", "fp16"])
def test_sft_sums_the_batch_in_float32(dtype, a, n):
    """n + 1 tokens is not a number of the dtype (it rounds to n, and 3a / n = 1.5 is a whole ulp
    off): the batch's sums run in float32, then the result rounds once."""
    pc = torch.tensor([-a, -2 * a], dtype=dtype)
    counts = torch.tensor([1, n])
    got, _ = dpo_loss(pc, pc, loss_type="sft", chosen_counts=counts, rejected_counts=counts)
    assert got.dtype == dtype
    want = torch.tensor(3 * a / (n + 1), dtype=torch.float64).to(dtype)
    assert got.item() == want.item() != 1.5


def test_equal_chosen_rejected_dpo_is_log2():
    z = torch.full((3,), -7.0, dtype=torch.float64)
    loss, m = dpo_loss(z, z, z, z, beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-15
    assert m["rewards/margins"].item() == 0.0 and m["rewards/accuracies"].item() == 0.0


def test_bco_pair_is_trls_and_reads_no_state():
    """bco_pair is TRL 1.16's -log sigmoid(beta h_c) - log sigmoid(-beta h_r): no reward shift, so a
    state passed along (the trainer always passes one) is neither read nor advanced."""
    pc, pr, rc, rr, nc, nr = _batch()
    state = BCOState(mean=3.0, count=10)
    got, _ = dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", beta=B, bco_state=state, reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected("bco_pair", pc, pr, rc, rr, nc, nr),
                                                 dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (state.mean, state.count) == (3.0, 10)
    no_state, _ = dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", beta=B, reduction="none")
    torch.testing.assert_close(no_state, got, rtol=0, atol=0)


def test_bco_running_mean_state():
    pc, pr, rc, rr, nc, nr = _batch()
    state = BCOState()
    got, _ = dpo_loss(pc, pr, rc, rr, loss_type="bco_pair_running_mean", beta=B, bco_state=state,
                      reduction="none")
    rewards = torch.cat([B * (pc - rc), B * (pr - rr)])
    delta = rewards.mean().item()
    assert state.count == 12 and abs(state.mean - delta) < 1e-12
    want = [-lsig(B * float(pc[i] - rc[i]) - delta) - lsig(-(B * float(pr[i] - rr[i]) - delta))
            for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    dpo_loss(pc[:2], pr[:2], rc[:2], rr[:2], loss_type="bco_pair_running_mean", beta=B, bco_state=state)
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
    (dict(loss_type="bco_pair_running_mean"), ValueError, "bco_state"),
    (dict(reduction="sum"), ValueError, "reduction"),
    (dict(beta=True), ValueError, "beta"),  # a bool is not a number (TOML `beta = true`)
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -0.5]), ValueError, "loss_weights"),
    (dict(loss_weights=[float("nan")]), ValueError, "loss_weights"),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
    (dict(loss_type="discopop", discopop_tau=-1.0), ValueError, "discopop_tau"),
    (dict(simpo_gamma=float("nan")), ValueError, "simpo_gamma"),
    (dict(rpo_alpha=float("nan"), chosen_counts=torch.ones(2), rejected_counts=torch.ones(2)),
     ValueError, "rpo_alpha must be a finite number"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type must be one of"),
    (dict(f_divergence_type="forward_kl", loss_type=["sigmoid", "nca_pair"]), ValueError,
     r"does not apply to loss_type \['nca_pair'\]"),
    (dict(f_divergence_type="js_divergence", loss_type="aot"), ValueError, "does not apply"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("inf")), ValueError,
     "f_alpha_divergence_coef"),
    (dict(ld_alpha=1.5), ValueError, r"ld_alpha must be a number in \[0, 1\]"),
    (dict(ld_alpha=-0.1), ValueError, "ld_alpha must be"),
    (dict(ld_alpha=True), ValueError, "ld_alpha must be"),
    (dict(ld_alpha=0.5), ValueError, r"needs \['policy_chosen_logps_prefix'"),
    (dict(ld_alpha=0.5, policy_chosen_logps_prefix=torch.zeros(2),
          policy_rejected_logps_prefix=torch.zeros(2)), ValueError, r"needs \['ref_chosen_logps_prefix'"),
    (dict(ld_alpha=0.5, policy_chosen_logps_prefix=torch.zeros(3),
          policy_rejected_logps_prefix=torch.zeros(2), ref_chosen_logps_prefix=torch.zeros(2),
          ref_rejected_logps_prefix=torch.zeros(2)), ValueError,
     r"policy_chosen_logps_prefix has shape \(3,\)"),
    (dict(ref_chosen_logps_prefix=torch.zeros(2)), ValueError, "given but ld_alpha is off"),
    (dict(use_weighting=1), ValueError, "use_weighting must be True or False, got 1"),
    (dict(use_weighting=True, loss_type=["sigmoid", "aot_unpaired"]), ValueError,
     r"cannot weight loss_type \['aot_unpaired'\]"),
    (dict(use_weighting=True), ValueError, "chosen_counts"),
    (dict(use_weighting=True, chosen_counts=torch.ones(2), rejected_counts=torch.ones(2)), ValueError,
     "needs chosen_log_sum_sq_probs"),
    (dict(chosen_log_sum_sq_probs=torch.zeros(2), rejected_log_sum_sq_probs=torch.zeros(2)), ValueError,
     "given but use_weighting is off"),
    (dict(loss_type="sigmoid_norm"), ValueError, "chosen_counts"),
]


@pytest.mark.parametrize("kw,exc,text", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_options(kw, exc, text):
    z = torch.zeros(2)
    with pytest.raises(exc, match=text):
        dpo_loss(z, z, z, z, **kw)


LOGPS_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


@pytest.mark.parametrize("arg", LOGPS_ARGS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_logps_are_type_errors(arg, dtype):
    """Integer log-probs used to reach torch's `mean(): could not infer output dtype` (or pass
    silently when not the first argument)."""
    args = {a: torch.full((2,), -3.0) for a in LOGPS_ARGS}
    args[arg] = args[arg].to(dtype)
    with pytest.raises(TypeError, match=rf"{arg} has dtype {dtype}; expected a floating dtype"):
        dpo_loss(*args.values())


def test_counts_take_integers_not_bool():
    z = torch.full((2,), -3.0)
    kw = dict(loss_type="ipo", beta=B)
    ints, _ = dpo_loss(z, z - 1, z, z, chosen_counts=torch.tensor([3, 4]),
                       rejected_counts=torch.tensor([5, 6], dtype=torch.int32), **kw)
    floats, _ = dpo_loss(z, z - 1, z, z, chosen_counts=torch.tensor([3.0, 4.0]),
                         rejected_counts=torch.tensor([5.0, 6.0]), **kw)
    torch.testing.assert_close(ints, floats)
    with pytest.raises(TypeError, match="rejected_counts has dtype torch.bool; expected an integer"):
        dpo_loss(z, z, z, z, chosen_counts=torch.tensor([3, 4]),
                 rejected_counts=torch.tensor([True, True]), **kw)


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



# --- sorted losses (AOT), f-DPO, LD-DPO, WPO ------------------------------------------------------


@pytest.mark.parametrize("name", SORTED_LOSS_TYPES)
def test_aot_matches_sorted_formula(name):
    pc, pr, rc, rr, nc, nr = _batch()
    got, _ = dpo_loss(pc, pr, rc, rr, **_kw(name))
    P = [[float(t[i]) for t in (pc, pr, rc, rr)] for i in range(6)]
    if name == "aot":  # policy margins' quantiles against the reference margins' quantiles
        a, b = sorted(p[0] - p[1] for p in P), sorted(p[2] - p[3] for p in P)
    else:  # chosen log-ratios' quantiles against the rejected log-ratios'
        a, b = sorted(p[0] - p[2] for p in P), sorted(p[1] - p[3] for p in P)
    want = [-(1 - EPS) * lsig(B * (x - y)) - EPS * lsig(-B * (x - y)) for x, y in zip(a, b, strict=True)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def score_by_formula(kind, a):
    if kind == "reverse_kl":
        return lambda h: h
    if kind == "forward_kl":
        return lambda h: 1 - math.exp(-h)
    if kind == "js_divergence":
        return lambda h: math.log(2) + lsig(h)
    if abs(a - 1) < 1e-6:
        return lambda h: h
    return lambda h: (math.exp(min((a - 1) * h, 80.0)) - 1) / (a - 1)


FDIV = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.2),
        ("alpha_divergence", 1.7)]


@pytest.mark.parametrize("kind,a", FDIV, ids=[f"{k}-{a}" for k, a in FDIV])
@pytest.mark.parametrize("name", F_DIVERGENCE_LOSS_TYPES)
def test_f_divergence_matches_formula(name, kind, a):
    pc, pr, rc, rr, nc, nr = _batch()
    got, _ = dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, f_divergence_type=kind,
                      f_alpha_divergence_coef=a, **_kw(name))
    want = expected(name, pc, pr, rc, rr, nc, nr, score=score_by_formula(kind, a))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_f_divergence_limits_clamp_and_gradient():
    h = torch.tensor([-300.0, -3.0, -0.2, 0.0, 0.7, 4.0], dtype=torch.float64, requires_grad=True)
    same = lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0)
    same(f_divergence_scores(h, "alpha_divergence", 1.0), h)  # a -> 1: reverse KL (DPO)
    same(f_divergence_scores(h, "alpha_divergence", 1.0 + 1e-7), h)
    torch.testing.assert_close(f_divergence_scores(h[1:], "alpha_divergence", 0.0),  # a = 0, unclamped
                               f_divergence_scores(h[1:], "forward_kl"), rtol=1e-15, atol=0)
    s = f_divergence_scores(h, "alpha_divergence", 0.5)  # (a - 1) h = 150 at h = -300: clamped at 80
    want = [score_by_formula("alpha_divergence", 0.5)(float(x)) for x in h.detach()]
    torch.testing.assert_close(s, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    (g,) = torch.autograd.grad(s.sum(), h)
    assert g[0] == 0  # past the clamp: constant score, no gradient
    torch.testing.assert_close(g[1:], torch.exp(-0.5 * h[1:].detach()), rtol=1e-14, atol=0)


NEW_GRAD = [("sppo_hard", "reverse_kl"), ("aot", "reverse_kl"), ("aot_unpaired", "reverse_kl"),
            ("sigmoid_norm", "reverse_kl"), ("sigmoid", "forward_kl"), ("sigmoid", "js_divergence"),
            ("ipo", "alpha_divergence"), ("sigmoid_norm", "alpha_divergence")]


@pytest.mark.parametrize("name,kind", NEW_GRAD, ids=[f"{n}-{k}" for n, k in NEW_GRAD])
def test_new_losses_gradcheck(name, kind):
    pc, pr, rc, rr, nc, nr = (t[1:5] for t in _batch())  # distinct values: no ties for the sorts
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    kw = dict(_kw(name), reduction="mean", f_divergence_type=kind, chosen_counts=nc, rejected_counts=nr)
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, **kw)[0], (pc, pr))


def test_new_losses_in_weighted_combination():
    pc, pr, rc, rr, nc, nr = _batch()
    kw = dict(chosen_counts=nc, rejected_counts=nr, beta=B, label_smoothing=EPS, reduction="none")
    names, ws = ["sppo_hard", "aot", "sigmoid_norm", "aot_unpaired", "sigmoid"], [0.3, 1.0, 2.0, 0.5, 0.7]
    parts = [dpo_loss(pc, pr, rc, rr, loss_type=n, **kw)[0] for n in names]
    mix, metrics = dpo_loss(pc, pr, rc, rr, loss_type=names, loss_weights=ws, **kw)
    torch.testing.assert_close(mix, sum(w * p for w, p in zip(ws, parts, strict=True)))
    _, plain = dpo_loss(pc, pr, rc, rr, beta=B)
    assert metrics.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(metrics[k], plain[k])


def _token_batch():
    """Per-token log-probs of 4 pairs (rows 0-3 chosen, 4-7 rejected), a prompt of zeros first, response
    lengths that differ both ways, a pair with an empty rejected response, and padding after."""
    g = torch.Generator().manual_seed(1)
    lens_c, lens_r, start = [5, 2, 3, 4], [3, 6, 0, 4], [1, 2, 0, 3]
    mask = torch.zeros(8, 9)
    for i, (lc, lr, s0) in enumerate(zip(lens_c, lens_r, start, strict=True)):
        mask[i, s0:s0 + lc] = 1
        mask[4 + i, s0:s0 + lr] = 1
    pol = -torch.rand(8, 9, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(8, 9, generator=g, dtype=torch.float64) * 3
    return pol * mask, ref * mask, mask


def _prefix_by_loops(tok, mask):
    out = []
    for i in range(4):
        rows = [[float(tok[r, t]) for t in range(tok.shape[1]) if mask[r, t] != 0] for r in (i, 4 + i)]
        m = min(len(rows[0]), len(rows[1]))
        out.append((sum(rows[0][:m]), sum(rows[1][:m])))
    return out


def test_ld_prefix_logps_matches_loops():
    pol, _, mask = _token_batch()
    pol[mask == 0] = float("nan")  # off-response entries are not read
    got_c, got_r = ld_prefix_logps(pol[:4], mask[:4], pol[4:], mask[4:].bool())
    want = _prefix_by_loops(pol, mask)
    torch.testing.assert_close(got_c, torch.tensor([w[0] for w in want], dtype=torch.float64))
    torch.testing.assert_close(got_r, torch.tensor([w[1] for w in want], dtype=torch.float64))
    # Different widths for chosen and rejected (separately padded batches).
    c2, r2 = ld_prefix_logps(pol[:4], mask[:4], pol[4:, :7], mask[4:, :7])
    torch.testing.assert_close((c2, r2), (got_c, got_r))


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_ld_dpo_matches_formula_and_gradient(alpha):
    pol, ref, mask = _token_batch()
    pol.requires_grad_(True)
    pre = ld_prefix_logps(pol[:4], mask[:4], pol[4:], mask[4:])
    rpre = ld_prefix_logps(ref[:4], mask[:4], ref[4:], mask[4:])
    full, rfull, n = (pol * mask).sum(-1), ref.sum(-1), mask.sum(-1).double()
    loss, m = dpo_loss(full[:4], full[4:], rfull[:4], rfull[4:], loss_type=["sigmoid", "sft"], beta=B,
                       ld_alpha=alpha, policy_chosen_logps_prefix=pre[0], policy_rejected_logps_prefix=pre[1],
                       ref_chosen_logps_prefix=rpre[0], ref_rejected_logps_prefix=rpre[1],
                       chosen_counts=n[:4], rejected_counts=n[4:], reduction="none")
    P, R = _prefix_by_loops(pol.detach(), mask), _prefix_by_loops(ref, mask)
    full = full.detach()
    want, ld_c, zs = [], [], []
    ld = lambda f, p: p + alpha * (f - p)
    for i in range(4):
        lc, lr = ld(float(full[i]), P[i][0]), ld(float(full[4 + i]), P[i][1])
        rcc, rrr = ld(float(rfull[i]), R[i][0]), ld(float(rfull[4 + i]), R[i][1])
        z = B * ((lc - rcc) - (lr - rrr))
        # the NLL reads the plain sums, as in TRL: the batch's NLL per chosen token
        want.append(-lsig(z) - float(full[:4].sum()) / float(n[:4].sum()))
        ld_c.append(lc)
        zs.append(z)
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m["logps/chosen"], torch.tensor(ld_c, dtype=torch.float64).mean())
    # Gradient: a token past the shared length counts alpha times one inside it; the NLL counts both
    # alike: each of the 4 entries holds the batch NLL, -1/N per chosen token, N the batch's tokens.
    loss.sum().backward()
    nll_grad = -4 / float(n[:4].sum())
    for i in range(4):
        dz = B * sig(-zs[i])  # -d(-log sigmoid z)/d(LD chosen sum) = d(...)/d(LD rejected sum)
        shared = min(int(mask[i].sum()), int(mask[4 + i].sum()))
        for row, sign, nll in ((i, -1.0, nll_grad), (4 + i, 1.0, 0.0)):
            toks = [t for t in range(9) if mask[row, t] != 0]
            for k, t in enumerate(toks):
                want_g = sign * dz * (1.0 if k < shared else alpha) + nll
                assert abs(float(pol.grad[row, t]) - want_g) < 1e-12, (row, t)
            assert (pol.grad[row][mask[row] == 0] == 0).all()


def test_ld_dpo_from_get_logps_recipe():
    """The documented recipe: token log-probs from get_logps(reduction="none"), the mask shifted by one."""
    from fused_dpo import get_logps

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 7, 13, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 13, (4, 7), generator=g)
    rmask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0],
                          [0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    tok = get_logps(logits, ids, rmask, reduction="none")
    pre_c, pre_r = ld_prefix_logps(tok[:2], rmask[:2, 1:], tok[2:], rmask[2:, 1:])
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = []
    for i in range(2):
        c = [float(lp[i, t]) for t in range(6) if rmask[i, t + 1]]
        r = [float(lp[2 + i, t]) for t in range(6) if rmask[2 + i, t + 1]]
        want.append((sum(c[: min(len(c), len(r))]), sum(r[: min(len(c), len(r))])))
    torch.testing.assert_close(pre_c, torch.tensor([w[0] for w in want], dtype=torch.float64))
    torch.testing.assert_close(pre_r, torch.tensor([w[1] for w in want], dtype=torch.float64))


def test_ld_reference_free_needs_policy_prefixes_only():
    pc, pr, _, _, nc, nr = _batch()
    kw = dict(loss_type="simpo", chosen_counts=nc, rejected_counts=nr, beta=B, simpo_gamma=GAMMA,
              reduction="none")
    got, _ = dpo_loss(pc, pr, ld_alpha=0.0, policy_chosen_logps_prefix=pc / 2,
                      policy_rejected_logps_prefix=pr / 4, **kw)
    want, _ = dpo_loss(pc / 2, pr / 4, **kw)
    torch.testing.assert_close(got, want)


def test_ld_prefix_logps_bad_shapes():
    a, m = torch.zeros(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"chosen_token_logps must be \(B, R\)"):
        ld_prefix_logps(a[0], m[0], a, m)
    with pytest.raises(ValueError, match=r"rejected_mask has shape \(2, 4\)"):
        ld_prefix_logps(a, m, a, m[:, :4])
    with pytest.raises(ValueError, match="has 2 rows but rejected_token_logps has 3"):
        ld_prefix_logps(a, m, torch.zeros(3, 5), torch.ones(3, 5))
    with pytest.raises(TypeError, match="chosen_mask must be a torch.Tensor"):
        ld_prefix_logps(a, [[1] * 5] * 2, a, m)


def _wpo_inputs():
    pc, pr, rc, rr, nc, nr = _batch()
    g = torch.Generator().manual_seed(3)
    # log sum_v p_v^2 per token lies in [log max_v p_v, 0)... any values serve the formula
    lc = -torch.rand(6, generator=g, dtype=torch.float64) * nc
    lr = -torch.rand(6, generator=g, dtype=torch.float64) * nr
    nr = nr.clone()
    nr[1], pr[1], rr[1], lr[1] = 0.0, 0.0, 0.0, 0.0  # an empty rejected response: weight 1 (n clamped to 1)
    return pc, pr, rc, rr, nc, nr, lc, lr


@pytest.mark.parametrize("name", BY_FORMULA)
def test_wpo_weighting_matches_formula(name):
    pc, pr, rc, rr, nc, nr, lc, lr = _wpo_inputs()
    got, _ = dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, use_weighting=True,
                      chosen_log_sum_sq_probs=lc, rejected_log_sum_sq_probs=lr, **_kw(name))
    want = []
    for i, loss in enumerate(expected(name, pc, pr, rc, rr, nc, nr)):
        v = [float(t[i]) for t in (pc, pr, rc, rr, nc, nr, lc, lr)]
        w = math.exp((v[0] - v[6]) / max(v[4], 1.0)) * math.exp((v[1] - v[7]) / max(v[5], 1.0))
        want.append(w * loss)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_wpo_weight_is_detached_and_scales_rpo():
    pc, pr, rc, rr, nc, nr, lc, lr = _wpo_inputs()
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    kw = dict(chosen_counts=nc, rejected_counts=nr, beta=B, rpo_alpha=0.4, reduction="none")
    plain, _ = dpo_loss(pc, pr, rc, rr, **kw)
    weighted, _ = dpo_loss(pc, pr, rc, rr, use_weighting=True, chosen_log_sum_sq_probs=lc,
                           rejected_log_sum_sq_probs=lr, **kw)
    w = (torch.exp((pc - lc) / nc.clamp_min(1)) * torch.exp((pr - lr) / nr.clamp_min(1))).detach()
    torch.testing.assert_close(weighted, w * plain)
    # No gradient through the weight: that of sum_i w_i * plain_i with w held constant (the rpo
    # term is the batch's NLL per token, so each pair's gradient has every pair's weight in it).
    g_want = torch.autograd.grad((w * plain).sum(), (pc, pr))
    g_w = torch.autograd.grad(weighted.sum(), (pc, pr))
    for a, b in zip(g_want, g_w, strict=True):
        torch.testing.assert_close(b, a)


def test_wpo_from_get_logps_stats_matches_trl_per_token_formula():
    """get_logps(..., stats=("log_sum_sq_probs",)) sums give TRL's per-token WPO weight."""
    from fused_dpo import get_logps

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, 11, (4, 6), generator=g)
    rmask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    st = get_logps(logits, ids, rmask, stats=("log_sum_sq_probs",))
    ref = torch.zeros(4, dtype=torch.float64)
    got, _ = dpo_loss(st.logps[:2], st.logps[2:], ref[:2], ref[2:], beta=B, reduction="none",
                      chosen_counts=st.counts[:2], rejected_counts=st.counts[2:], use_weighting=True,
                      chosen_log_sum_sq_probs=st.log_sum_sq_probs[:2],
                      rejected_log_sum_sq_probs=st.log_sum_sq_probs[2:])
    w = []
    for r in range(4):  # per token: log p(y_t) - log sum_v p_v^2, averaged over the response
        terms = []
        for t in range(5):
            if rmask[r, t + 1]:
                p = [math.exp(x) for x in torch.log_softmax(logits[r, t], -1).tolist()]
                terms.append(math.log(p[int(ids[r, t + 1])]) - math.log(sum(q * q for q in p)))
        w.append(math.exp(sum(terms) / max(len(terms), 1)))
    want = [w[i] * w[2 + i] * -lsig(B * float(st.logps[i] - st.logps[2 + i])) for i in range(2)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
