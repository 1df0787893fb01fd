"""Vocab-parallel calls whose shards have different widths (issue 20, item 10).

DTensor's `Shard(0)` cuts `torch.chunk`-style shards: V = 100 over 3 ranks is 34, 34, 32. Each
rank's start comes from the widths (one all-gather per call), so such shards work with no
`vocab_start=`, on the logits path and the hidden path, and equal the single-process op. A layout
that cannot be right (overlap, gap, vocab_start on some ranks only, vocab_size or ids that differ
across ranks) raises the same ValueError on every rank, and the group stays usable afterwards.

One spawn of 3 gloo ranks runs every distributed case (spawn costs seconds per process on the CPU
machine); the layout rules themselves are checked without a process group on the pure function.
"""

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

from fused_dpo import get_logps, get_logps_from_hidden, token_logps_and_entropy  # noqa: E402

V = 100  # over 3 ranks: torch.chunk / Shard(0) widths 34, 34, 32
WORLD = 3
ENT = dict(stats=("entropy", "is_top1"), entropy_grad=True)


def _fields(res):
    return [res] if isinstance(res, torch.Tensor) else [r for r in res if r is not None]


def _loss(res, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
               for o in _fields(res) if o.requires_grad)


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _shard(t, dim, mesh):
    """This rank's piece of t as DTensor's Shard(dim) cuts it (torch.chunk widths)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(t, mesh, [Shard(dim)]).to_local()


def _columns(rank):
    bounds = [0, 34, 68, 100]
    return bounds[rank], bounds[rank + 1]


def _inputs(seed=0, B=2, T=7):
    g = torch.Generator().manual_seed(seed)  # the same on every rank
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return logits, ids, mask


def _logits_cases(rank, group, mesh):
    logits, ids, mask = _inputs()
    a, b = _columns(rank)
    assert _shard(logits, 2, mesh).shape[-1] == b - a  # DTensor's widths, 34 34 32
    for impl, kw in (("torch", {}), ("triton", ENT),
                     ("torch", dict(reduction="none", temperature=0.7, softcap=4.0, **ENT))):
        x_loc = _shard(logits, 2, mesh).requires_grad_(True)
        res = get_logps(x_loc, ids, mask, impl=impl, process_group=group, **kw)
        _loss(res).backward()
        x = logits.clone().requires_grad_(True)
        ref = get_logps(x, ids, mask, impl=impl, **kw)
        _loss(ref).backward()
        what = f"rank {rank} logits {impl} {sorted(kw)}"
        for i, (o, r) in enumerate(zip(_fields(res), _fields(ref), strict=True)):
            assert o.isfinite().all(), f"{what} out {i}: {o}"
            _close(o, r, f"{what} out {i}")
        _close(x_loc.grad, x.grad[..., a:b], f"{what} d logits")
    # the RL entry point on the same shards
    lp, ent = token_logps_and_entropy(_shard(logits, 2, mesh), ids, row_mask=mask, impl="torch",
                                      process_group=group)
    lp_ref, ent_ref = token_logps_and_entropy(logits, ids, row_mask=mask, impl="torch")
    _close(lp, lp_ref, f"rank {rank} token_logps")
    _close(ent, ent_ref, f"rank {rank} token entropy")


def _hidden_cases(rank, group, mesh):
    g = torch.Generator().manual_seed(5)
    B, T, H = 2, 6, 8
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 3
    bias = torch.randn(V, generator=g) * 0.3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    a, b = _columns(rank)
    for kw in ({}, dict(reduction="mean", temperature=0.8, **ENT)):
        w_loc = _shard(w, 0, mesh).requires_grad_(True)
        b_loc = _shard(bias, 0, mesh).requires_grad_(True)
        h_loc = h.clone().requires_grad_(True)
        res = get_logps_from_hidden(h_loc, w_loc, ids, mask, bias=b_loc, impl="torch",
                                    chunk_size=16, process_group=group, **kw)
        _loss(res).backward()
        hh, ww, bb = (t.clone().requires_grad_(True) for t in (h, w, bias))
        ref = get_logps_from_hidden(hh, ww, ids, mask, bias=bb, impl="torch", chunk_size=16, **kw)
        _loss(ref).backward()
        what = f"rank {rank} hidden {sorted(kw)}"
        for i, (o, r) in enumerate(zip(_fields(res), _fields(ref), strict=True)):
            assert o.isfinite().all(), f"{what} out {i}: {o}"
            _close(o, r, f"{what} out {i}")
        _close(h_loc.grad, hh.grad, f"{what} d hidden")
        _close(w_loc.grad, ww.grad[a:b], f"{what} d weight")
        _close(b_loc.grad, bb.grad[a:b], f"{what} d bias")


def _same_error_everywhere(rank, group, call, match):
    """call() raises a ValueError matching `match` on this rank, with the same message as on
    every other rank (no rank hangs in a collective the others skipped)."""
    with pytest.raises(ValueError, match=match) as info:
        call()
    msgs = [None] * WORLD
    dist.all_gather_object(msgs, str(info.value), group=group)
    assert len(set(msgs)) == 1, f"rank {rank}: the ranks raised different errors: {msgs}"


def _layout_errors(rank, group):
    logits, ids, mask = _inputs(seed=3, T=5)
    a, b = _columns(rank)
    x = logits[..., a:b]
    starts = {0: 0, 1: 30, 2: 68}[rank]  # rank 1 overlaps rank 0 by 4 ids, leaves [64, 68)
    cases = [
        (dict(vocab_start=starts, vocab_size=V), r"ids \[30, 34\) are in two shards"),
        (dict(vocab_start=a + 1 if rank == 2 else a, vocab_size=V), r"ids \[68, 69\) are in no shard"),
        (dict(vocab_size=V + 3), r"ids \[100, 103\) are in no shard"),
        (dict(vocab_size=V - 40), r"rank 2's shard starts at vocab id 68, outside .*\[0, 60\)"),
        (dict(vocab_size=V if rank else V + 1), "vocab_size differs across the ranks"),
        (dict(vocab_start=a, vocab_size=V) if rank == 1 else dict(vocab_size=V),
         "vocab_start is given on rank.s. 1 but not on 0, 2"),
    ]
    for kw, match in cases:
        _same_error_everywhere(rank, group, lambda kw=kw: get_logps(
            x, ids, mask, impl="torch", process_group=group, **kw), match)
    # ids, mask or their shape differing across ranks (a data loader that gave each
    # tensor-parallel rank its own batch): refused on every rank
    other = ids.clone()
    other[1, 2] = (other[1, 2] + rank) % V
    _same_error_everywhere(rank, group, lambda: get_logps(
        x, other, mask, impl="torch", process_group=group), r"same ids .* between ranks 0 \| 1 \| 2")
    m2 = mask.clone()
    m2[0, 1] ^= rank == 2
    _same_error_everywhere(rank, group, lambda: get_logps(
        x, ids, m2, impl="torch", process_group=group),
        r"same response_mask; they differ between ranks 0, 1 \| 2")
    T = 5 if rank else 4
    _same_error_everywhere(rank, group, lambda: get_logps(
        logits[:, :T, a:b], ids[:, :T], impl="torch", process_group=group),
        r"ids of the same \(B, T\); got rank 0 \(2, 4\), rank 1 \(2, 5\)")
    # on the hidden path too
    w = torch.randn(V, 4)[a:b]
    _same_error_everywhere(rank, group, lambda: get_logps_from_hidden(
        torch.randn(2, 5, 4), w, ids, mask, impl="torch", process_group=group, vocab_size=V + 1),
        r"ids \[100, 101\) are in no shard")
    # after every refusal the group is still in step: a correct call works
    out = get_logps(x, ids, mask, impl="torch", process_group=group)
    _close(out, get_logps(logits, ids, mask, impl="torch"), f"rank {rank} after the errors")


def _no_gather_when_trusted(rank, group):
    """validate=False with vocab_start and vocab_size given: no all-gather, no host sync."""
    logits, ids, mask = _inputs(seed=4)
    a, b = _columns(rank)
    calls = []
    real = dist.all_gather
    dist.all_gather = lambda *args, **kw: calls.append(1) or real(*args, **kw)
    try:
        out = get_logps(logits[..., a:b], ids, mask, impl="torch", process_group=group,
                        vocab_start=a, vocab_size=V, validate=False)
        assert not calls, "an all-gather with validate=False and the layout given"
        get_logps(logits[..., a:b], ids, mask, impl="torch", process_group=group)
        assert len(calls) == 1, calls  # one small all-gather per call otherwise
    finally:
        dist.all_gather = real
    _close(out, get_logps(logits, ids, mask, impl="torch"), f"rank {rank} trusted layout")


def _worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        group = dist.group.WORLD
        _logits_cases(rank, group, mesh)
        _hidden_cases(rank, group, mesh)
        _layout_errors(rank, group)
        _no_gather_when_trusted(rank, group)
    except BaseException:
        # the parent shows this text; the raw exception may not survive pickling
        raise RuntimeError(f"rank {rank}:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def test_uneven_shards_3_ranks(tmp_path, monkeypatch):
    # CPU processes on gloo with Triton's interpreter, on a GPU machine too (gloo reduces CPU
    # tensors): the children see no CUDA.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


# ---- the layout rules, on the all-gathered table (no process group) -----------------------------

def resolve_layout(table, what):
    from fused_dpo.parallel import resolve_layout

    return resolve_layout(table, what)


def _table(widths, starts=None, size=None, ids=None):
    """Rows as vocab_shard all-gathers them: width, has_start, start, has_size, size, B, T, ids
    fingerprint, mask fingerprint."""
    return [[w, starts is not None, 0 if starts is None else starts[k], size is not None,
             size or 0, 2, 7, 11 if ids is None else ids[k], 0] for k, w in enumerate(widths)]


@pytest.mark.parametrize("widths,starts,size,expected", [
    ((34, 34, 32), None, None, ({0: 0, 1: 34, 2: 68}, 100)),  # torch.chunk / Shard(0)
    ((12, 12), None, 23, ({0: 0, 1: 12}, 23)),  # Megatron's padded last shard
    ((9, 7, 7), (0, 9, 16), 23, ({0: 0, 1: 9, 2: 16}, 23)),
    ((7, 9, 7), (9, 0, 16), 23, ({0: 9, 1: 0, 2: 16}, 23)),  # any order of the ranks
], ids=["chunk-34-34-32", "padded-12-12", "given-9-7-7", "given-permuted"])
def test_layout_from_widths(widths, starts, size, expected):
    assert resolve_layout(_table(widths, starts, size), "logits") == expected


@pytest.mark.parametrize("widths,starts,size,match", [
    ((34, 34, 32), (0, 30, 68), 100, r"ids \[30, 34\) are in two shards"),
    ((34, 34, 32), (0, 34, 69), 101, r"ids \[68, 69\) are in no shard"),
    ((34, 34, 32), None, 103, r"ids \[100, 103\) are in no shard"),
    ((12, 12, 12), None, 23, r"rank 2's shard starts at vocab id 24, outside"),
    ((12, 12), (0, 12), None, "needs vocab_size"),
], ids=["overlap", "gap", "short", "padding-shard", "start-without-size"])
def test_layout_errors(widths, starts, size, match):
    with pytest.raises(ValueError, match=match):
        resolve_layout(_table(widths, starts, size), "logits")


def test_layout_refuses_differing_ids():
    with pytest.raises(ValueError, match=r"same ids .* between ranks 0, 2 \| 1"):
        resolve_layout(_table((34, 34, 32), ids=(5, 6, 5)), "logits")
