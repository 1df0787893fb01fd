"""--optim (issue 22): every optimizer trains a tiny model on the CPU and matches what it should
(torch AdamW bit for bit, to fp32 rounding, or within a stated bound), survives a checkpoint
round trip bit for bit, and keeps the state bytes that optim.state_bytes predicts; what cannot
run here is refused in one line."""

import importlib.util
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import one_error_line

from fused_dpo.train import optim
from fused_dpo.train.cli import main as train
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.memory import model_state_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
CPU_NAMES = [n for n in optim.NAMES if n not in optim.CUDA_ONLY]
U = 2.0**-24  # fp32's unit roundoff
VOCAB = 200
TOKENS = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(1))


def params_for(name):
    marks = [pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")] if "8bit" in name else []
    return pytest.param(name, marks=marks, id=name)


CPU_CASES = [params_for(n) for n in CPU_NAMES]


def dtype_for(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "adamw_anyprecision" else torch.float32


def tiny(dtype=torch.float32) -> torch.nn.Module:
    """An embedding of 6400 elements (bnb quantises it), a LayerNorm of 32 (bnb keeps float32
    moments below 4096 elements) and a head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, VOCAB))
    return m.to(dtype)


def loss_of(m) -> torch.Tensor:
    """Next-token cross-entropy on fixed tokens."""
    logits = m(TOKENS[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), TOKENS[:, 1:].reshape(-1))


def make(name, params, lr=1e-2, wd=0.1):
    return optim.build(list(params), DPOConfig(optim=name, learning_rate=lr, weight_decay=wd))


def steps(m, o, n) -> list[float]:
    losses = []
    for _ in range(n):
        o.zero_grad(set_to_none=True)
        loss = loss_of(m)
        loss.backward()
        o.step()
        losses.append(loss.item())
    return losses


def assert_within_rounding(got, want, steps, lr=1e-2):
    """Two fp32 AdamWs that order their operations differently, on the same gradients: a step can
    round the new weight an ulp apart (after the decay multiply and the addcdiv, or once), and the
    update a few u of lr apart."""
    ulp = 2.0 ** torch.floor(torch.log2(want.abs().clamp_min(1e-30))) * 2 * U
    err = (got - want).abs()
    assert (err <= steps * (2 * ulp + 16 * U * lr)).all(), err.max()


def adamw_run(n=3):
    m = tiny()
    return m, steps(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False), n)


@pytest.mark.parametrize("name", CPU_CASES)
def test_every_optimizer_trains_a_tiny_model(name):
    m = tiny(dtype_for(name))
    losses = steps(m, make(name, m.parameters()), 3)
    assert all(math.isfinite(x) for x in losses) and losses[2] < losses[1] < losses[0], losses


def test_cpu_offload_is_adamw_bit_for_bit():
    ref, want = adamw_run()
    m = tiny()
    assert steps(m, make("adamw_cpu_offload", m.parameters()), 3) == want
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def fixed_gradient_run(opt, shapes=((64, 80), (4095,), (10,)), n=3):
    """The weights after each of n steps of `opt(params)` on fixed random gradients: the same
    updates whatever the weights (no feedback through a model)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(n)]
    o = opt(ps)
    out = []
    for gs in grads:
        for p, gi in zip(ps, gs, strict=True):
            p.grad = gi.clone()
        o.step()
        out.append([p.detach().clone() for p in ps])
    return out, o


def test_fused_is_adamw_to_fp32_rounding():
    want, _ = fixed_gradient_run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False))
    got, o = fixed_gradient_run(lambda ps: make("adamw_torch_fused", ps))
    assert o.param_groups[0]["fused"] is True
    for k in range(3):
        for p, q in zip(got[k], want[k], strict=True):
            assert_within_rounding(p, q, k + 1)


@pytest.mark.parametrize("name", CPU_CASES)
def test_a_zero_gradient_step_is_decoupled_weight_decay(name):
    """weight_decay maps to each optimizer's decoupled decay, weight *= 1 - lr * weight_decay: with
    zero gradients that is the whole update, exactly."""
    dt = dtype_for(name)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 80).to(dt)), torch.nn.Parameter(torch.randn(10).to(dt))]
    before = [p.detach().clone() for p in ps]
    o = make(name, ps, lr=1e-2, wd=0.1)
    for p in ps:
        p.grad = torch.zeros_like(p)
    o.step()
    for p, q in zip(ps, before, strict=True):
        assert torch.equal(p, q * (1 - 1e-2 * 0.1))
        if name == "adamw_anyprecision":  # and the compensation holds what bf16 rounded away
            exact = q.double() * (1 - 1e-2 * 0.1)
            kept = p.double() + o.state[p]["compensation"].double()
            assert ((kept - exact).abs() <= 2.0**-17 * exact.abs()).all()
            assert (kept - exact).abs().sum() < (p.double() - exact).abs().sum() / 100


def test_adafactor_steps_are_relative_to_the_weights_rms():
    """torch's Adafactor: an update's RMS is at most lr x max(1e-3, RMS(weight)), and update
    clipping (d = 1) makes the first one about that: a weight at zero moves 1000x less than lr."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 40) * 0.05)
    z = torch.nn.Parameter(torch.zeros(48, 40))
    before = w.detach().clone()
    o = make("adafactor", [w, z], lr=1e-2, wd=0.0)
    w.grad, z.grad = torch.randn(48, 40), torch.randn(48, 40)
    o.step()
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    for moved, cap in ((rms(w - before), 1e-2 * rms(before)), (rms(z), 1e-2 * 1e-3)):
        assert 0.5 * cap <= moved <= cap * (1 + 1e-5), (moved, cap)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_8bit_is_bnb_32bit_below_4096_elements_and_close_to_adamw_above():
    import bitsandbytes as bnb

    # (64, 80): 5120 elements, 8-bit moments; (4095,) and (10,): float32 moments
    b8, o8 = fixed_gradient_run(lambda ps: make("adamw_8bit", ps))
    b32, _ = fixed_gradient_run(lambda ps: bnb.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, optim_bits=32))
    t32, _ = fixed_gradient_run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False))
    held = [o8.state[p]["state1"].dtype for p in o8.param_groups[0]["params"]]
    assert held == [torch.uint8, torch.float32, torch.float32]
    for k in range(3):
        assert torch.equal(b8[k][1], b32[k][1]) and torch.equal(b8[k][2], b32[k][2])  # same kernel
        assert_within_rounding(b32[k][0], t32[k][0], k + 1)  # bnb's 32-bit AdamW is torch's
    # The first 8-bit update is computed from the fp32 moments before they are quantised: AdamW's.
    assert_within_rounding(b8[0][0], b32[0][0], 1)
    assert not torch.equal(b8[2][0], b32[2][0])  # later ones read the 8-bit moments back


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_8bit_trains_the_tiny_model_like_adamw():
    """Within 1% of AdamW's loss decrease after 3 steps (measured: 0.007%, 4e-5 of 0.586)."""
    _, want = adamw_run()
    m = tiny()
    got = steps(m, make("adamw_8bit", m.parameters()), 3)
    assert got[0] == want[0]
    assert abs(got[2] - want[2]) <= 0.01 * (want[0] - want[2]), (got, want)


def test_anyprecision_keeps_bf16_weights_within_half_an_ulp_of_fp64_adamw():
    """Fixed gradients, 100 steps of lr 1e-4 (each update a fraction of a bf16 ulp of the weight):
    Kahan-compensated bf16 weights stay within half a bf16 ulp of float64 AdamW, plus the
    compensation's own rounding (at most 2^-10 ulp a step); plain bf16 AdamW drifts far away."""
    n, lr = 100, 1e-4
    torch.manual_seed(0)
    w = torch.randn(64, 48).to(torch.bfloat16)
    grads = [(torch.randn(64, 48, generator=torch.Generator().manual_seed(i)) + 0.5).to(torch.bfloat16)
             for i in range(n)]

    def run(p, o):
        for g in grads:
            p.grad = g.to(p.dtype)
            o.step()
        return p.detach().double()

    p = torch.nn.Parameter(w.double())
    truth = run(p, torch.optim.AdamW([p], lr=lr, weight_decay=0.1, foreach=False))
    ulp = 2.0 ** (torch.floor(torch.log2(truth.abs())) - 7)  # bf16: 8 significant bits
    p = torch.nn.Parameter(w.clone())
    kahan = run(p, make("adamw_anyprecision", [p], lr=lr, wd=0.1))
    assert ((kahan - truth).abs() <= (0.5 + n * 2.0**-10 + 0.01) * ulp).all()
    p = torch.nn.Parameter(w.clone())
    plain = run(p, torch.optim.AdamW([p], lr=lr, weight_decay=0.1, foreach=False))
    assert ((plain - truth).abs() / ulp).max() > 10  # the bound above is a real constraint


@pytest.mark.parametrize("dtype,text", [
    (torch.float32, "the trainable weights are float32, where that is wasted: use --optim adamw_torch"),
    (torch.float16, "is a bf16-only optimizer"),
], ids=["fp32", "fp16"])
def test_anyprecision_refuses_weights_other_than_bf16(dtype, text):
    with pytest.raises(ValueError, match=text):
        make("adamw_anyprecision", [torch.nn.Parameter(torch.zeros(3, dtype=dtype))])


@pytest.mark.parametrize("name", [params_for(n) for n in CPU_NAMES + ["adamw_cpu_offload-bf16"]])
def test_checkpoint_round_trip_resumes_bit_for_bit(name):
    """4 steps straight, or 2, the state saved (torch.save, weights_only load, as checkpoint.pt),
    loaded into a fresh model and optimizer, and 2 more: the same weights and state, bit for bit
    (with bf16 weights, adamw_cpu_offload's fp32 master copy comes back too)."""
    name, _, bf16 = name.partition("-")
    dt = torch.bfloat16 if bf16 else dtype_for(name)
    m = tiny(dt)
    o = make(name, m.parameters())
    straight = steps(m, o, 4)
    a = tiny(dt)
    losses = steps(a, oa := make(name, a.parameters()), 2)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optimizer": oa.state_dict()}, buf)
    buf.seek(0)
    s = torch.load(buf, weights_only=True)
    b = tiny(dt)
    b.load_state_dict(s["model"])
    ob = make(name, b.parameters())
    ob.load_state_dict(s["optimizer"])
    assert losses + steps(b, ob, 2) == straight
    for p, q in zip(b.parameters(), m.parameters(), strict=True):
        assert torch.equal(p, q)
        for k, v in o.state[q].items():
            if torch.is_tensor(v):
                assert v.dtype == ob.state[p][k].dtype and torch.equal(v, ob.state[p][k]), k
    if bf16 or name == "adamw_anyprecision":
        want = {"adamw_cpu_offload": "master", "adamw_anyprecision": "compensation"}[name]
        assert all(want in ob.state[p] and ob.state[p]["exp_avg"].dtype == torch.float32
                   for p in b.parameters())


SHAPES = [(200, 32), (64, 64), (4095,), (32,), (3, 5, 7), (16 * 256 + 1,)]


@pytest.mark.parametrize("name", CPU_CASES + [params_for("adamw_torch-bf16"),
                                               params_for("adamw_cpu_offload-bf16")])
def test_state_bytes_is_what_the_optimizer_holds_after_a_step(name):
    """Exact on the CPU, through memory.model_state_bytes (each storage once: bnb's two code books
    are shared by its 8-bit parameters). 4096 elements is bnb's first 8-bit size, 16 x 256 + 1 a
    partial absmax block, (3, 5, 7) a 3-D tensor that Adafactor factors over its last two dims.
    With bf16 weights AdamW's moments are bf16, and adamw_cpu_offload keeps an fp32 master copy.
    The device/host split of a CUDA run is not checked here (no GPU)."""
    name, _, bf16 = name.partition("-")
    dt = torch.bfloat16 if bf16 else dtype_for(name)
    torch.manual_seed(0)
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s).to(dt)) for s in SHAPES])
    o = make(name, module.parameters())
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    o.step()
    held = model_state_bytes([module], o)
    predicted = optim.state_bytes(name, [(tuple(s), dt) for s in SHAPES], device="cpu")
    assert predicted == {"device": held["optimizer"], "host": 0} and "optimizer_host" not in held


def test_host_resident_state_is_counted_apart():
    """memory.model_state_bytes: state in host memory for a parameter elsewhere (a meta tensor
    stands for the GPU here) is "optimizer_host", not in "total"."""
    p = torch.nn.Parameter(torch.zeros(10, device="meta"))
    o = torch.optim.AdamW([p])
    o.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(10),
                  "exp_avg_sq": torch.zeros(10, device="meta")}
    assert model_state_bytes([], o) == {"parameters": 0, "gradients": 0, "optimizer": 40, "total": 40,
                                        "optimizer_host": 44}


def test_state_bytes_rules():
    f32, bf16 = torch.float32, torch.bfloat16
    big = [((1024, 1024), bf16)]
    n = 1024 * 1024
    assert optim.state_bytes("adamw_torch", big) == {"device": 4 * n, "host": 4}
    assert optim.state_bytes("adamw_torch_fused", big) == {"device": 4 * n + 4, "host": 0}
    assert optim.state_bytes("adafactor", big) == {"device": 2 * 2048, "host": 4}
    assert optim.state_bytes("adamw_8bit", big) == {"device": 2 * n + 8 * n // 256 + 2048, "host": 0}
    assert optim.state_bytes("adamw_cpu_offload", big) == {"device": 0, "host": 12 * n + 4}
    assert optim.state_bytes("adamw_anyprecision", big) == {"device": 10 * n, "host": 4}
    with pytest.raises(ValueError, match="bf16-only"):
        optim.state_bytes("adamw_anyprecision", [((4,), torch.float16)])
    with pytest.raises(ValueError, match="optim must be one of"):
        optim.state_bytes("adam", [((4,), f32)])


def test_fsdp2_refuses_the_optimizers_that_take_local_tensors():
    for name in optim.FSDP2_UNSUPPORTED:
        with pytest.raises(ValueError, match=f"--optim {name} is not supported with --parallel fsdp2"):
            DPOConfig(optim=name, parallel="fsdp2")
    for name in set(optim.NAMES) - set(optim.FSDP2_UNSUPPORTED):
        DPOConfig(optim=name, parallel="fsdp2")


@pytest.mark.parametrize("flags,text", [
    (["--optim", "nope"], "optim must be one of adamw_torch, adamw_torch_fused, adafactor, "
                          "adamw_8bit, paged_adamw_8bit, adamw_cpu_offload, adamw_anyprecision; "
                          "got 'nope'"),
    (["--optim", "paged_adamw_8bit"], "--optim paged_adamw_8bit pages its state through CUDA unified "
                                      "memory and needs a CUDA device; these parameters are on cpu"),
    (["--optim", "adamw_anyprecision"], "--optim adamw_anyprecision compensates the rounding of bf16"),
    (["--optim", "adamw_cpu_offload", "--parallel", "fsdp2"], "--optim adamw_cpu_offload is not "
                                                              "supported with --parallel fsdp2"),
], ids=["unknown", "paged-on-cpu", "anyprecision-fp32", "offload-fsdp2"])
def test_cli_refusals_are_one_line(tmp_path, capsys, flags, text):
    if torch.cuda.is_available() and "paged_adamw_8bit" in flags:
        pytest.skip("a CUDA machine runs paged_adamw_8bit")
    out = tmp_path / "run"
    assert train([*flags, "--max-steps", "1", "--no-progress", "--output-dir", str(out)]) == 2
    one_error_line(capsys, text)
    assert not out.exists()


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_cli_run_with_8bit_reports_its_state_and_refuses_a_resume_with_another_optimizer(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--no-progress", "--batch-size", "4", "--output-dir", str(out)]
    assert train(["--optim", "adamw_8bit", "--max-steps", "2", *common]) == 0
    assert json.loads((out / "config.json").read_text())["optim"] == "adamw_8bit"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["optimizer"]["state"]  # bnb's state, in the checkpoint
    shapes = [(tuple(t.shape), t.dtype) for t in ckpt["model"].values()]  # every weight trains
    want = optim.state_bytes("adamw_8bit", shapes, device="cpu")["device"]
    assert f"optimizer {want / 2**20:.2f} MiB" in (out / "health.md").read_text()
    capsys.readouterr()
    assert train(["--resume", "--optim", "adamw_torch", "--max-steps", "3", *common]) == 2
    one_error_line(capsys, "configuration differs from the checkpoint's in optim 'adamw_8bit' -> "
                           "'adamw_torch'")
