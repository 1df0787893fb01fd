"""fused_dpo.integrations.trl: TRL 1.16's trainers with their log-probs computed by fused_dpo.

- The guard: every name the patch replaces exists in the installed TRL with 1.16's signature, and
  TRL's fused LM head and trainers still reach it; check_trl() refuses a renamed or re-signed one.
- patch / unpatch / patched(): the names are replaced where TRL looks them up (and in any trl
  module that bound them, even one imported while patched) and restored afterwards.
- The stand-ins against TRL's own functions and an independent float64 formula: the logits path
  (selective_log_softmax, selective_log_softmax_and_entropy) and the hidden-state path
  (_ChunkedLogProbFunction with temperature, softcap, logit_scale, bias, every output, entropy
  gradient); the fallbacks; a simulated ZeRO-3 head (partitioned outside the gather context) and
  an FSDP2 DTensor head on a one-process gloo group.
- Stock DPOTrainer vs patched, 3 SGD steps from the same weights and seed, on the tiny Llama:
  every logged number (loss, grad_norm, entropy, logits/*, mean_token_accuracy, rewards/*,
  logps/*) step by step, with the project's rule (tests/helpers.py): float64 truth is the same
  run in float64 with TRL's head function replaced by the plain formula below (log_softmax of
  softcap(x * scale) / T: neither TRL's kernel nor fused_dpo, nor the patch's folding), and
  |patched - truth| <= |stock - truth| + tol, tol = 4 float32 ulps of (|truth| + the run's largest
  |logps/*|, the magnitude every logged number is computed from). Variants: plain sigmoid DPO,
  WPO weighting (log_sum_sq_probs), precomputed reference log-probs, and a head with a bias,
  logit_scale and final_logit_softcapping. TRL 1.16's DPOTrainer has no logits path: the fused
  LM head is its only way to log-probs (see the module docstring of fused_dpo.integrations.trl).
- GRPOTrainer goes through the same head: stock vs patched, 2 steps with generation, within
  float32 rounding, and the patch is called.
"""

import contextlib
import copy
import math
import tempfile

import pytest
import torch
from helpers import assert_close_to_truth

pytest.importorskip("trl")

import trl  # noqa: E402  (after the importorskip guard)
import trl.trainer.utils as trl_utils  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

import fused_dpo.integrations.trl as fused_trl  # noqa: E402
from fused_dpo._common import STATS  # noqa: E402
from fused_dpo.train.models import tiny_llama, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
OUTPUTS = ("log_probs", *STATS)

ROWS = [
    dict(prompt=f"sort {a} {b} {c}", chosen=" ".join(sorted((a, b, c))), rejected=f"{c} {a} {b}")
    for a, b, c in [("cat", "dog", "ant"), ("pear", "fig", "kiwi"), ("red", "blue", "tan"),
                    ("one", "two", "six"), ("sun", "moon", "star"), ("oak", "elm", "ash"),
                    ("cow", "pig", "hen"), ("gin", "rum", "ale")]
]
TOK = train_tokenizer([r[k] for r in ROWS for k in ("prompt", "chosen", "rejected")], vocab_size=128)


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with TRL's own functions."""
    fused_trl.unpatch()
    yield
    fused_trl.unpatch()


# ---- the guard ------------------------------------------------------------------------------------

def _kwarg_names(code) -> set[str]:
    """Keyword names passed at call sites in `code` (they are tuple constants of the code)."""
    return {s for c in code.co_consts if isinstance(c, tuple) for s in c if isinstance(s, str)}


def test_trl_has_what_we_patch():
    assert trl.__version__.startswith("1.16."), trl.__version__
    fused_trl.check_trl()
    import inspect

    from trl.trainer import dpo_trainer, grpo_trainer

    # the logits path: the names and TRL 1.16's parameters, in order
    sig = lambda f: tuple(inspect.signature(f).parameters)
    assert sig(trl_utils.selective_log_softmax) == ("logits", "index", "temperature", "row_mask")
    assert sig(trl_utils.selective_log_softmax_and_entropy) == (
        "logits", "index", "entropy_requires_grad", "temperature", "row_mask")
    # the hidden path: the global the fused forward calls is TRL's ChunkedLogProbFunction ...
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert sig(ChunkedLogProbFunction.forward) == (
        "ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
        "final_logit_softcapping", "logit_scale", "outputs")
    assert trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS == STATS
    # ... read by name inside add_fused_lm_head's forward, with the ZeRO-3 gather beside it
    fwd = next(c for c in trl_utils.add_fused_lm_head.__code__.co_consts
               if inspect.iscode(c) and c.co_name == "_fused_forward")
    assert {"_ChunkedLogProbFunction", "maybe_gather_lm_head_ctx", "full_tensor"} <= set(fwd.co_names)
    # the trainers add that head and call it with fused_lm_head=True for every log-prob
    for module, trainer, methods in (
        (dpo_trainer, dpo_trainer.DPOTrainer, ("_compute_loss", "compute_ref_log_probs")),
        (grpo_trainer, grpo_trainer.GRPOTrainer, ("_get_per_token_logps_and_entropies",)),
    ):
        assert module.add_fused_lm_head is trl_utils.add_fused_lm_head
        assert "add_fused_lm_head" in trainer.__init__.__code__.co_names
        for m in methods:
            assert "fused_lm_head" in _kwarg_names(inspect.unwrap(getattr(trainer, m)).__code__), m
    # DPO precomputes the reference through compute_ref_log_probs
    assert "compute_ref_log_probs" in dpo_trainer.DPOTrainer._precompute_ref_logps.__code__.co_names


def test_check_trl_refuses_a_changed_trl(monkeypatch):
    monkeypatch.delattr(trl_utils, "selective_log_softmax")
    with pytest.raises(RuntimeError, match="selective_log_softmax is missing"):
        fused_trl.patch()
    monkeypatch.undo()

    class Renamed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap=None):
            raise AssertionError

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Renamed)
    with pytest.raises(RuntimeError, match="_ChunkedLogProbFunction.forward has parameters"):
        fused_trl.patch()
    assert not fused_trl.is_patched()
    monkeypatch.undo()
    monkeypatch.setattr(trl_utils, "selective_log_softmax_and_entropy",
                        lambda logits, index, temperature=1.0, row_mask=None: None)
    with pytest.raises(RuntimeError, match="selective_log_softmax_and_entropy has parameters"):
        fused_trl.patch()


def test_patch_unpatch_restores_every_binding(monkeypatch):
    import sys
    import types

    names = ("selective_log_softmax", "selective_log_softmax_and_entropy", "_ChunkedLogProbFunction")
    originals = {n: getattr(trl_utils, n) for n in names}
    # a trl module that imported a name by value before the patch (as trl.experimental.cpo does)
    before = types.ModuleType("trl._probe_before")
    before.selective_log_softmax = originals["selective_log_softmax"]
    monkeypatch.setitem(sys.modules, before.__name__, before)

    with fused_trl.patched():
        assert fused_trl.is_patched()
        assert trl_utils.selective_log_softmax is fused_trl.selective_log_softmax
        assert trl_utils.selective_log_softmax_and_entropy is fused_trl.selective_log_softmax_and_entropy
        assert trl_utils._ChunkedLogProbFunction is fused_trl.FusedChunkedLogProb
        assert before.selective_log_softmax is fused_trl.selective_log_softmax
        # TRL's kernel namespace is left alone (it is not where the trainers look)
        assert trl.kernels.ChunkedLogProbFunction is ChunkedLogProbFunction
        # a module imported while patched binds ours; unpatch restores it too
        during = types.ModuleType("trl._probe_during")
        during.selective_log_softmax = trl_utils.selective_log_softmax
        monkeypatch.setitem(sys.modules, during.__name__, during)
        with pytest.raises(RuntimeError, match="already patched"):
            fused_trl.patch()
    assert not fused_trl.is_patched()
    for n in names:
        assert getattr(trl_utils, n) is originals[n], n
    assert before.selective_log_softmax is originals["selective_log_softmax"]
    assert during.selective_log_softmax is originals["selective_log_softmax"]
    # restored on an exception too; bad options are refused before anything changes
    with pytest.raises(KeyError), fused_trl.patched():
        raise KeyError
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_trl.patch(impl="cuda")
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


# ---- the stand-ins against TRL's functions and float64 truth --------------------------------------

def _check(ours, stock, truth, what):
    """Ours is as close to float64 truth as TRL is, within 4 float32 ulps of the largest value."""
    truth = truth.detach().double()
    tol = 4 * EPS32 * truth.abs().max().item() + 1e-7
    assert_close_to_truth(ours, stock, truth, tol, what)


def _transform64(x, temperature, softcap, scale):
    z = x * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _truth_rows(z, idx, outputs):
    """TRL's 5-tuple from float64 logits z (N, V), plainly."""
    logp = z.log_softmax(-1)
    p = logp.exp()
    vals = {
        "entropy": -(p * logp).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == idx,
    }
    lp = logp.gather(-1, idx[:, None])[:, 0]
    return (lp, *(vals[n] if n in outputs else None for n in STATS))


class EagerChunkedLogProb:
    """TRL's `_ChunkedLogProbFunction.apply` contract in plain autograd (the trainers' truth in
    float64): log-probs and entropy differentiable, the other outputs detached."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, scale=1.0,
              outputs=OUTPUTS):
        x = hidden @ weight.T + (0 if bias is None else bias)
        out = _truth_rows(_transform64(x, temperature, softcap, scale), targets, outputs)
        return (*out[:2], *(None if t is None else t.detach() for t in out[2:]))


@pytest.mark.parametrize("entropy_grad", [True, False], ids=["entgrad", "entdetached"])
@pytest.mark.parametrize("temperature,row_mask", [(1.0, None), (0.7, "float")], ids=["T1", "T0.7-floatmask"])
def test_logits_path_matches_trl(temperature, row_mask, entropy_grad):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 11, 123
    x64 = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    idx = torch.randint(0, V, (B, T), generator=g)
    # TRL skips rows where the mask is 0 and does not weight the others: values 0, 0.5 and 2
    pick = torch.randint(0, 3, (B, T), generator=g)
    mask = None if row_mask is None else torch.tensor([0.0, 0.5, 2.0])[pick]
    a, b = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(2))

    def run(dtype, truth=False):
        x = x64.to(dtype).detach().requires_grad_(True)
        if truth:
            logp = (x / temperature).log_softmax(-1)
            lp = logp.gather(-1, idx[..., None])[..., 0]
            ent = -(logp.exp() * logp).sum(-1)
            if mask is not None:
                lp, ent = lp.masked_fill(mask == 0, 0), ent.masked_fill(mask == 0, 0)
        else:
            lp, ent = trl_utils.selective_log_softmax_and_entropy(x, idx, entropy_grad, temperature, mask)
            assert ent.requires_grad == entropy_grad
        only = (lp if truth else trl_utils.selective_log_softmax(x, idx, temperature, mask)).detach()
        loss = (lp * a).sum() + ((ent * b).sum() if entropy_grad else 0)
        loss.backward()
        return lp.detach(), ent.detach(), x.grad, only

    stock = run(torch.float32)
    truth = run(torch.float64, truth=True)
    fused_trl.patch()
    ours = run(torch.float32)
    counts = fused_trl.call_counts()
    assert counts == {"selective_log_softmax": 1, "selective_log_softmax_and_entropy": 1}, counts
    names = ("logps", "entropy", "d logits", "selective_log_softmax")
    for name, o, s, t in zip(names, ours, stock, truth, strict=True):
        assert o.dtype == torch.float32 and o.shape == s.shape, name
        _check(o, s, t, name)
    if mask is not None:
        assert (ours[0][mask == 0] == 0).all() and (ours[2][mask == 0] == 0).all()


def test_logits_path_falls_back_for_top_k():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 17, generator=g)
    topk = torch.randint(0, 17, (2, 5, 3), generator=g)
    expected = trl_utils.selective_log_softmax(x, topk)
    fused_trl.patch()
    got = trl_utils.selective_log_softmax(x, topk)
    assert torch.equal(got, expected)
    assert fused_trl.call_counts() == {"fallback:selective_log_softmax": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_logits_path_returns_float32_for_half_logits(dtype):
    """The chosen dtype contract (see the integration's docstring): patched, the logits path
    returns float32 for fp16/bf16 logits, as TRL's kernels do, where TRL's CPU fallback returns
    the input dtype (so TRL's own test_selective_log_softmax[float16/bfloat16], which asserts
    the input dtype, fails patched for this reason alone). The float32 result is the more
    exact one: it is never further from float64 truth than TRL's half-precision one."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 9, 37, generator=g) * 3).to(dtype)
    idx = torch.randint(0, 37, (3, 9), generator=g)
    logp = x.double().log_softmax(-1)
    truth_lp = logp.gather(-1, idx[..., None])[..., 0]
    truth_ent = -(logp.exp() * logp).sum(-1)
    stock = (trl_utils.selective_log_softmax(x, idx),
             *trl_utils.selective_log_softmax_and_entropy(x, idx))
    fused_trl.patch()
    ours = (trl_utils.selective_log_softmax(x, idx),
            *trl_utils.selective_log_softmax_and_entropy(x, idx))
    assert fused_trl.call_counts() == {"selective_log_softmax": 1,
                                       "selective_log_softmax_and_entropy": 1}
    for name, o, s, t in zip(("selective_log_softmax", "logps", "entropy"), ours, stock,
                             (truth_lp, truth_lp, truth_ent), strict=True):
        assert s.dtype == dtype, (name, s.dtype)  # TRL's CPU path: the input dtype
        assert o.dtype == torch.float32, (name, o.dtype)  # ours: float32, as TRL's kernels
        _check(o, s, t, name)


@pytest.mark.parametrize("outputs", [OUTPUTS, ("log_probs",), ("log_probs", "entropy", "is_top1")],
                         ids=["all", "logps", "ent-top1"])
@pytest.mark.parametrize("temperature,softcap,scale", [
    (1.0, None, 1.0), (0.7, None, 2.5), (0.8, 5.0, 3.0), (1.0, None, -1.5), (0.9, 2.0, -0.5),
], ids=["plain", "T0.7-scale2.5", "T0.8-cap5-scale3", "scale-1.5", "cap2-scale-0.5"])
def test_hidden_path_matches_trl(temperature, softcap, scale, outputs):
    g = torch.Generator().manual_seed(2)
    N, H, V = 41, 16, 123
    h64 = torch.randn(N, H, generator=g, dtype=torch.float64)
    w64 = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    b64 = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    idx = torch.randint(0, V, (N,), generator=g)
    idx[::4] = torch.nn.functional.linear(h64, w64, b64).argmax(-1)[::4]  # both is_top1 values
    a, b = (torch.randn(N, generator=g, dtype=torch.float64) for _ in range(2))

    def run(dtype, fn):
        leaves = [t.to(dtype).detach().requires_grad_(True) for t in (h64, w64, b64)]
        outs = fn(*leaves)
        loss = (outs[0] * a.to(outs[0].dtype)).sum()
        if outs[1] is not None:
            loss = loss + (outs[1] * b.to(outs[1].dtype)).sum()
        loss.backward()
        return outs, [t.grad for t in leaves]

    trl_fn = lambda h, w, bias: trl_utils._ChunkedLogProbFunction.apply(
        h, w, bias, idx, temperature, 32, softcap, scale, outputs)
    truth_fn = lambda h, w, bias: EagerChunkedLogProb.apply(
        h, w, bias, idx, temperature, 32, softcap, scale, outputs)
    stock = run(torch.float32, trl_fn)
    truth = run(torch.float64, truth_fn)
    fused_trl.patch()
    ours = run(torch.float32, trl_fn)
    assert fused_trl.call_counts() == {"chunked_logprob": 1}
    for name, o, s, t in zip(("log_probs", *STATS), ours[0], stock[0], truth[0], strict=True):
        assert (o is None) == (s is None) == (name not in outputs), name
        if o is None:
            continue
        assert o.dtype == s.dtype and o.shape == s.shape, (name, o.dtype, s.dtype)
        assert o.requires_grad == s.requires_grad, name  # logps and entropy carry gradients
        if name == "is_top1":
            assert torch.equal(o, t) and torch.equal(s, t)
        else:
            _check(o, s, t, name)
    for name, o, s, t in zip(("d hidden", "d weight", "d bias"), ours[1], stock[1], truth[1], strict=True):
        _check(o, s, t, name)


def test_hidden_path_empty_batch_falls_back():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    fused_trl.patch()
    out = trl_utils._ChunkedLogProbFunction.apply(h, w, None, torch.zeros(0, dtype=torch.long), 1.0,
                                                  32, None, 1.0, OUTPUTS)
    assert out[0].shape == (0,) and out[0].requires_grad
    assert fused_trl.call_counts() == {"fallback:chunked_logprob": 1}


# ---- ZeRO-3 and FSDP2 heads through TRL's fused forward -----------------------------------------

def _fused_model(vocab=101, seed=0):
    model = tiny_llama(vocab, seed=seed, hidden=32)
    trl_utils.add_fused_lm_head(model, outputs=OUTPUTS)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 13), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return model, ids, labels


def _forward_backward(model, ids, labels):
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    (out.loss + 0.1 * out.entropy.sum()).backward()  # the entropy's gradient too
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [getattr(out, n).detach() for n in ("log_probs", *STATS)], grads


class FakeZeRO3:
    """The ZeRO-3 contract maybe_gather_lm_head_ctx serves: outside the gather, the head's weight
    is partitioned (an empty tensor); inside, the full one. Its gradient is accumulated with the
    weight materialised and then moved here (ZeRO-3 reduces it into its own partition)."""

    def __init__(self, param):
        self.param, self.full, self.entered, self.grads = param, param.data, 0, []
        self._partition()
        param.register_hook(self._materialise)
        param.register_post_accumulate_grad_hook(self._take_grad)

    def _partition(self):
        self.param.data = torch.empty(0, dtype=self.full.dtype)

    def _materialise(self, grad):
        self.param.data = self.full
        return grad

    def _take_grad(self, param):
        self.grads.append(param.grad)
        param.grad = None
        self._partition()

    @contextlib.contextmanager
    def gather(self, *params):
        if not any(p is self.param for p in params):
            yield
            return
        self.entered += 1
        self.param.data = self.full
        try:
            yield
        finally:
            self._partition()


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
def test_head_backward_twice_with_retain_graph(patched):
    """backward(retain_graph=True) and a second backward through the fused head: twice the
    gradients of one, as stock TRL gives; a third backward without a retained graph fails as
    any freed autograd graph does."""
    model, ids, labels = _fused_model()
    once = copy.deepcopy(model)
    if patched:
        fused_trl.patch()
    for m, n in ((once, 1), (model, 2)):
        out = m(input_ids=ids, labels=labels, fused_lm_head=True)
        loss = out.loss + 0.1 * out.entropy.sum()  # the entropy's gradient too
        for i in range(n):
            loss.backward(retain_graph=i < n - 1)
    if patched:
        assert fused_trl.call_counts() == {"chunked_logprob": 2}
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    for (name, p), q in zip(model.named_parameters(), once.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, n=name: f"grad {n}: {m}")


def test_head_double_backward_raises_clearly():
    """create_graph=True through the patched head gives the first-order gradient; differentiating
    it again raises fused_dpo's error, not a silent gradient that treats it as a constant
    (stock TRL's head refuses create_graph=True itself, in its mm(..., out=))."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(7, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    idx = torch.randint(0, 11, (7,), generator=g)
    fused_trl.patch()
    head = lambda: trl_utils._ChunkedLogProbFunction.apply(  # noqa: E731
        h, w, None, idx, 1.0, 32, None, 1.0, ("log_probs", "entropy"))
    out = head()
    plain, = torch.autograd.grad(out[0].sum() + out[1].sum(), h)
    out = head()
    gh, = torch.autograd.grad(out[0].sum() + out[1].sum(), h, create_graph=True)
    torch.testing.assert_close(gh, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="get_logps_from_hidden has no double backward"):
        (gh**2).sum().backward()


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
def test_zero3_head_is_gathered_in_forward_and_backward(monkeypatch, patched):
    model, ids, labels = _fused_model()
    reference = _forward_backward(copy.deepcopy(model), ids, labels)
    fake = FakeZeRO3(model.lm_head.weight)
    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", fake.gather)
    if patched:
        fused_trl.patch()
    outs, grads = _forward_backward(model, ids, labels)
    assert fake.entered == 2  # the forward, then the backward's own gather
    assert model.lm_head.weight.numel() == 0  # partitioned again
    assert len(fake.grads) == 1
    grads["lm_head.weight"] = fake.grads[0]
    if patched:
        assert fused_trl.call_counts() == {"chunked_logprob": 1}
    for name, o, r in zip(("log_probs", *STATS), outs, reference[0], strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert grads.keys() == reference[1].keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[1][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_fsdp2_dtensor_head_is_gathered_once_by_trl(monkeypatch, tmp_path):
    """TRL's forward turns a DTensor head into a full tensor once per call, before our op; the
    head's gradient flows back as a DTensor. One process, gloo, CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, ids, labels = _fused_model()
        stock = _forward_backward(copy.deepcopy(model), ids, labels)
        mesh = init_device_mesh("cpu", (1,))
        full = model.lm_head.weight.detach().clone()
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        seen, score = [], fused_trl._score_rows

        def spy(hidden, weight, *args, **kwargs):
            seen.append(type(weight))
            return score(hidden, weight, *args, **kwargs)

        monkeypatch.setattr(fused_trl, "_score_rows", spy)
        fused_trl.patch()
        outs, grads = _forward_backward(model, ids, labels)
        assert seen == [torch.Tensor]  # one call, a plain (gathered) tensor
        assert isinstance(model.lm_head.weight.grad, DTensor)
        torch.testing.assert_close(outs[0], stock[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads["lm_head.weight"].full_tensor(), stock[1]["lm_head.weight"],
                                   rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ---- DPOTrainer: stock vs patched, step by step --------------------------------------------------

VARIANTS = {
    "sigmoid": {},
    "wpo": {"use_weighting": True},
    "precompute": {"precompute_ref_log_probs": True},
    "bias-softcap-scale": {"head": dict(bias=True, final_logit_softcapping=0.1, logit_scale=3.0)},
}
NOT_COMPARED = {"epoch", "step", "learning_rate"}


def _dpo_model(dtype, head):
    model = tiny_llama(len(TOK), seed=0, hidden=32)
    if head:
        # TRL reads both from the config (text_config), whatever the architecture
        model.config.final_logit_softcapping = head["final_logit_softcapping"]
        model.config.logit_scale = head["logit_scale"]
        g = torch.Generator().manual_seed(1)
        lm = torch.nn.Linear(model.config.hidden_size, len(TOK), bias=True)
        with torch.no_grad():
            lm.weight.copy_(model.lm_head.weight)
            lm.bias.copy_(torch.randn(len(TOK), generator=g) * 0.1)
        model.lm_head = lm
    return model.to(dtype)


def _run_dpo(variant, head="stock", steps=3):
    """log_history's per-step entries and the patch's call counts, with TRL's head function
    ("stock"), fused_dpo's ("fused"), or the float64 truth ("truth")."""
    from unittest import mock

    from trl import DPOConfig, DPOTrainer

    cfg = dict(VARIANTS[variant])
    model = _dpo_model(torch.float64 if head == "truth" else torch.float32, cfg.pop("head", None))
    ref = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as stack:
        args = DPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                         max_steps=steps, per_device_train_batch_size=4, logging_steps=1, seed=0,
                         optim="sgd", learning_rate=0.5, disable_tqdm=True, **cfg)
        if head == "fused":
            stack.enter_context(fused_trl.patched())
        elif head == "truth":
            stack.enter_context(mock.patch.object(trl_utils, "_ChunkedLogProbFunction", EagerChunkedLogProb))
        trainer = DPOTrainer(model=model, ref_model=ref, args=args,
                             train_dataset=Dataset.from_dict({k: [r[k] for r in ROWS] for k in ROWS[0]}),
                             processing_class=TOK)
        trainer.train()
        counts = fused_trl.call_counts() if head == "fused" else None
    return [e for e in trainer.state.log_history if "loss" in e], counts


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dpo_trainer_matches_stock(variant):
    stock, _ = _run_dpo(variant, "stock")
    ours, counts = _run_dpo(variant, "fused")
    truth, _ = _run_dpo(variant, "truth")
    steps = len(stock)
    assert steps == len(ours) == len(truth) == 3
    # Every log-prob went through fused_dpo: per step the policy and the reference pass, or the
    # policy pass plus the precompute's batches (8 pairs, 4 per batch) once
    per_step = 1 if variant == "precompute" else 2
    expected = steps * per_step + (2 if variant == "precompute" else 0)
    assert counts == {"chunked_logprob": expected}, counts
    keys = [k for k in stock[0] if k not in NOT_COMPARED]
    for k in ("loss", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy",
              "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "grad_norm"):
        assert k in keys, (k, keys)
    if variant != "precompute":
        assert truth[-1]["rewards/margins"] != 0  # the reference was scored, and training moved
    scale = max(abs(e[k]) for e in truth for k in ("logps/chosen", "logps/rejected"))
    for k in keys:
        o, s, t = (torch.tensor([e[k] for e in run], dtype=torch.float64) for run in (ours, stock, truth))
        tol = 4 * EPS32 * (t.abs() + scale)
        assert_close_to_truth(o, s, t, tol, f"{variant}: {k}")
    if variant != "wpo":  # WPO weights the first step's log 2
        assert math.isclose(stock[0]["loss"], math.log(2), rel_tol=1e-6)


# ---- GRPOTrainer goes through the same head ----------------------------------------------------

def test_grpo_trainer_matches_stock(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    prompts = [f"sort {r['prompt'][5:]}" for r in ROWS[:4]]
    # GRPO builds its reference (beta > 0) from the model's path
    tiny_llama(len(TOK), seed=0, hidden=32).save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")

    def reward(completions, **kwargs):
        return [len(c) / 10 for c in completions]

    def run(patch):
        args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[],
                          save_strategy="no", max_steps=2, per_device_train_batch_size=4,
                          num_generations=2, max_completion_length=6, logging_steps=1, seed=0,
                          optim="sgd", learning_rate=0.5, disable_tqdm=True, beta=0.1,
                          temperature=0.7)
        if patch:
            fused_trl.patch()
        try:
            trainer = GRPOTrainer(model=str(tmp_path / "model"), reward_funcs=reward, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=TOK)
            trainer.train()
            counts = fused_trl.call_counts() if patch else None
        finally:
            fused_trl.unpatch()
        return [e for e in trainer.state.log_history if "loss" in e], counts

    stock, _ = run(False)
    ours, counts = run(True)
    assert counts == {"chunked_logprob": 4}, counts  # per step: the policy and the reference
    assert len(stock) == len(ours) == 2
    for s, o in zip(stock, ours, strict=True):
        assert s["kl"] >= 0 and "entropy" in s
        for k in s:
            if k in NOT_COMPARED or k == "step_time":
                continue
            assert math.isclose(o[k], s[k], rel_tol=1e-5, abs_tol=1e-7), (k, o[k], s[k])
