"""Vocab-parallel log-probs (`process_group=`) on gloo, 2 and 3 ranks (uneven and padded shards):
values and gradients equal the single-process op and float64 truth. Also an FSDP2-style DTensor
lm_head weight on the hidden path. Each world starts one process group and runs every case in it
(spawn costs seconds a process on the CPU machine)."""

import os
import sys
import traceback

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, in the children too

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_close_to_truth  # noqa: E402

from fused_dpo import get_logps, get_logps_from_hidden  # noqa: E402

V = 23  # global vocabulary: 2 ranks x 12 and 3 ranks x 8 both end in one padding column
ALL_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _shards(world, sizes=None):
    """[(vocab_start, V_local)] per rank: Megatron's equal shards padded to a multiple of the world
    (sizes None), or the given sizes (passed with vocab_start / vocab_size)."""
    if sizes is None:
        local = -(-V // world)
        return [(r * local, local) for r in range(world)]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return list(zip(starts[:-1], sizes, strict=True))


def _local(t, start, size):
    """Columns [start, start + size) of the last dim, zero-padded past V (Megatron's padding)."""
    part = t[..., start : start + size]
    pad = size - part.shape[-1]
    return torch.cat([part, part.new_full((*part.shape[:-1], pad), 7.0)], -1) if pad else part


def _fields(res):
    return [res] if isinstance(res, torch.Tensor) else [r for r in res if r is not None]


def _backward(res, seed=1):
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
               for o in _fields(res) if o.requires_grad)
    loss.backward()


def _check(res, ref, what, grads=()):
    for i, (a, b) in enumerate(zip(_fields(res), _fields(ref), strict=True)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, i=i: f"{what} out {i}: {m}")
    for name, a, b in grads:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m, n=name: f"{what} d{n}: {m}")


def _logits_case(rank, world, group, *, impl, sizes=None, seed=0, ties=False, packed=False,
                 **kw):
    g = torch.Generator().manual_seed(seed)
    B, T = (1, 12) if packed else (2, 9)
    logits = torch.randn(B, T, V, generator=g) * 2
    if ties:  # few distinct values: the first maximum often lies in another shard
        logits = torch.randint(0, 3, (B, T, V), generator=g).float()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    if "labels" in kw:
        kw["labels"] = torch.where(mask, ids, -100)
        targets = ()
    else:
        targets = (ids, mask)
    if packed:
        kw["cu_seqlens"] = torch.tensor([0, 4, 5, 7, 12], dtype=torch.int32)
    start, size = _shards(world, sizes)[rank]
    extra = {"vocab_start": start, "vocab_size": V} if sizes is not None else {"vocab_size": V}
    x_loc = _local(logits, start, size).requires_grad_(True)
    res = get_logps(x_loc, *targets, impl=impl, process_group=group, **extra, **kw)
    _backward(res)
    x = logits.clone().requires_grad_(True)
    ref = get_logps(x, *targets, impl=impl, **kw)
    _backward(ref)
    what = f"rank {rank}/{world} logits {impl} {sizes} {sorted(kw)}"
    _check(res, ref, what, [("logits", x_loc.grad, _local(x.grad, start, size).masked_fill(
        torch.arange(start, start + size) >= V, 0.0))])
    # float64 truth (Cut-CE's rule): the eager reference in float64 and in float32
    truth = get_logps(logits.double(), *targets, impl="reference", **kw)
    eager = get_logps(logits, *targets, impl="reference", **kw)
    for a, e, t in zip(_fields(res), _fields(eager), _fields(truth), strict=True):
        assert_close_to_truth(a, e, t, 2e-5 * max(1.0, t.abs().max().item()), what)


def _hidden_case(rank, world, group, *, impl, sizes=None, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 2, 8, 6
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 3
    b = torch.randn(V, generator=g) * 0.3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    start, size = _shards(world, sizes)[rank]
    extra = {"vocab_start": start, "vocab_size": V} if sizes is not None else {"vocab_size": V}
    w_loc = _local(w.T, start, size).T.contiguous().requires_grad_(True)
    b_loc = _local(b, start, size).requires_grad_(True)
    h_loc = h.clone().requires_grad_(True)
    res = get_logps_from_hidden(h_loc, w_loc, ids, mask, bias=b_loc, impl=impl,
                                process_group=group, chunk_size=5, **extra, **kw)
    _backward(res)
    hh, ww, bb = (t.clone().requires_grad_(True) for t in (h, w, b))
    ref = get_logps_from_hidden(hh, ww, ids, mask, bias=bb, impl=impl, chunk_size=5, **kw)
    _backward(ref)
    pad = torch.arange(start, start + size) >= V
    _check(res, ref, f"rank {rank}/{world} hidden {impl} {sizes} {sorted(kw)}", [
        ("hidden", h_loc.grad, hh.grad),
        ("weight", w_loc.grad, _local(ww.grad.T, start, size).T.masked_fill(pad[:, None], 0.0)),
        ("bias", b_loc.grad, _local(bb.grad, start, size).masked_fill(pad, 0.0))])
    truth = get_logps_from_hidden(h.double(), w.double(), ids, mask, bias=b.double(),
                                  impl="reference", **kw)
    eager = get_logps_from_hidden(h, w, ids, mask, bias=b, impl="reference", **kw)
    for a, e, t in zip(_fields(res), _fields(eager), _fields(truth), strict=True):
        assert_close_to_truth(a, e, t, 2e-5 * max(1.0, t.abs().max().item()), "hidden vs truth")


def _errors(rank, world, group):
    logits = torch.randn(1, 5, 12)
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(0))  # same on every rank
    for kw, err, msg in [
        (dict(process_group="world"), TypeError, "ProcessGroup, got str"),
        (dict(process_group=group, vocab_start=3), ValueError, "needs vocab_size"),
        (dict(process_group=group, vocab_start=30, vocab_size=V), ValueError, "vocab id 30"),
        (dict(process_group=group, vocab_size=True), TypeError, "vocab_size must be an int"),
        (dict(vocab_size=V), ValueError, "needs process_group"),
        (dict(process_group=group, impl="reference"), ValueError, "no vocab-parallel path"),
    ]:
        with pytest.raises(err, match=msg):
            get_logps(logits, ids, **kw)
    # a label past the global vocabulary: the same clear error on every rank, naming V
    bad = ids.clone()
    bad[0, 3] = V
    with pytest.raises(ValueError, match=rf"input_ids\[0, 3\] = {V} .* \[0, {V}\)"):
        get_logps(logits, bad, process_group=group, vocab_size=V, impl="torch")
    # ... and NaN, never a number, without validation
    assert get_logps(logits, bad, process_group=group, vocab_size=V, impl="torch",
                     validate=False).isnan().all()
    # vocab ids inside vocab_size that no shard holds (the shards, 12 columns each from rank * 12,
    # leave a gap before vocab_size): the same error on every rank ...
    gap = torch.full((1, 5), 1)
    gap[0, 3] = 12 * world + 1
    with pytest.raises(ValueError, match="are in no shard"):
        get_logps(logits, gap, process_group=group, vocab_size=12 * world + 5, impl="torch")
    # ... and with the layout trusted (validate=False, starts given): NaN at the label no shard
    # holds, not a log-prob missing its label's logit
    out = get_logps(logits, gap, process_group=group, vocab_start=12 * rank,
                    vocab_size=12 * world + 5, impl="torch", reduction="none", validate=False)
    assert out[0, 2].isnan() and out[0, [0, 1, 3]].isfinite().all(), out


def _dtensor_weight(rank, world):
    """An FSDP2-style lm_head: a DTensor sharded on dim 0, each rank with its own batch (data
    parallel): gathered once; the hidden-state gradient as a plain call's, the weight and bias
    gradients the plain ones averaged over the ranks (FSDP2's reduction). The same through
    dpo_loss_from_hidden's grad_in_forward path."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fused_dpo import dpo_loss_from_hidden

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 6, generator=g), torch.randn(24, 6, generator=g)[:, 0].contiguous()
    mine = torch.Generator().manual_seed(10 + rank)  # this rank's data
    h = torch.randn(2, 7, 6, generator=mine)
    ids = torch.randint(0, 24, (2, 7), generator=mine)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 3:] = True
    calls = {
        "logps": lambda hh, ww, bb: get_logps_from_hidden(
            hh, ww, ids, bias=bb, impl="torch", chunk_size=5, reduction="mean") @ (torch.arange(2.0) + 1),
        "grad_in_forward": lambda hh, ww, bb: dpo_loss_from_hidden(
            hh, ww, ids, mask, bias=bb, ref_logps=torch.tensor([-9.0, -8.0]), impl="torch",
            chunk_size=5, grad_in_forward=True)[0],
    }
    for name, call in calls.items():
        w_dt = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
        b_dt = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_(True)
        h1 = h.clone().requires_grad_(True)
        out = call(h1, w_dt, b_dt)
        out.backward()
        h2, w2, b2 = (t.clone().requires_grad_(True) for t in (h, w, b))
        ref = call(h2, w2, b2)
        ref.backward()
        torch.testing.assert_close(out, ref, msg=name)
        torch.testing.assert_close(h1.grad, h2.grad, msg=name)
        for got, want in ((w_dt.grad, w2.grad), (b_dt.grad, b2.grad)):
            dist.all_reduce(want)
            want /= world
            torch.testing.assert_close(got.full_tensor(), want, msg=name)


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        group = dist.group.WORLD
        ent = dict(stats=ALL_STATS, entropy_grad=True)
        if world == 2:  # Megatron's equal shards, the last one ending in a padding column
            _logits_case(rank, world, group, impl="triton", reduction="sum")
            _logits_case(rank, world, group, impl="triton", reduction="none", labels=True,
                         stats=("entropy", "is_top1"), entropy_grad=True, temperature=1.3)
            _logits_case(rank, world, group, impl="torch", reduction="sum", packed=True, **ent)
            _hidden_case(rank, world, group, impl="triton", reduction="mean", softcap=5.0,
                         compact=False, **ent)
            _errors(rank, world, group)
            _dtensor_weight(rank, world)
        else:  # the same padding, and uneven shards given by vocab_start (9, 7, 7)
            _logits_case(rank, world, group, impl="torch", reduction="mean", temperature=0.7,
                         softcap=4.0, **ent)
            _logits_case(rank, world, group, impl="torch", reduction="mean", ties=True,
                         stats=("is_top1", "mean_logits"))
            _logits_case(rank, world, group, impl="torch", sizes=(9, 7, 7), reduction="none",
                         **ent)
            _hidden_case(rank, world, group, impl="torch", reduction="sum")
            _hidden_case(rank, world, group, impl="torch", sizes=(9, 7, 7), reduction="mean",
                         temperature=0.8, **ent)
    except Exception:
        # the parent shows this text; the raw exception may not survive pickling
        raise RuntimeError(f"rank {rank}:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3], ids=["2ranks", "3ranks"])
def test_vocab_parallel_equals_single_process(world, tmp_path, monkeypatch):
    # The ranks are CPU processes on gloo, with Triton's interpreter, on a GPU machine too (one
    # GPU cannot hold 3 ranks; gloo reduces CPU tensors): the children see no CUDA.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(world, str(tmp_path / "init")), nprocs=world, join=True)


def test_process_group_needs_initialised_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        get_logps(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long),
                  process_group=object())
