"""token_logps_and_entropy(_from_hidden) vocab-parallel (`process_group=`) on gloo, 2 ranks: the
per-token log-probs and entropy, and their gradients (logits; hidden, weight, bias), equal the
single-process call, with a row_mask, a temperature and a padded last shard (V = 23 over 2 ranks
of 12 columns), the entropy with and without its gradient. One process group runs every case."""

import os
import traceback

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, in the children too

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from fused_dpo import token_logps_and_entropy, token_logps_and_entropy_from_hidden  # noqa: E402

V = 23  # 2 ranks x 12 columns: the last shard ends in one padding column
WORLD = 2


def _shard(rank, sizes=None):
    """(vocab_start, V_local): Megatron's equal, padded shards, or the given sizes."""
    if sizes is None:
        local = -(-V // WORLD)
        return rank * local, local
    return sum(sizes[:rank]), sizes[rank]


def _local(t, start, size):
    """Columns [start, start + size) of the last dim, padded past V with a finite junk value."""
    part = t[..., start : start + size]
    pad = size - part.shape[-1]
    return torch.cat([part, part.new_full((*part.shape[:-1], pad), 7.0)], -1) if pad else part


def _pad_cols(start, size):
    return torch.arange(start, start + size) >= V


def _backward(outs, entropy_grad, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    logps, ent = outs
    assert logps.requires_grad
    assert ent.requires_grad == entropy_grad
    loss = (logps.double() * w[0]).sum()
    if entropy_grad:
        loss = loss + (ent.double() * w[1]).sum()
    loss.backward()


def _close(a, b, what, atol=2e-5):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _inputs(seed, lead, last):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, last, generator=g) * 2
    ids = torch.randint(0, V, lead, generator=g)
    mask = (torch.rand(lead, generator=g) > 0.3).int()
    return g, x, ids, mask


def _logits_case(rank, group, *, lead=(2, 9), sizes=None, entropy_grad=True, seed=0, **kw):
    _, logits, ids, mask = _inputs(seed, lead, V)
    start, size = _shard(rank, sizes)
    extra = {"vocab_size": V} if sizes is None else {"vocab_start": start, "vocab_size": V}
    x_loc = _local(logits, start, size).requires_grad_(True)
    res = token_logps_and_entropy(x_loc, ids, entropy_grad, 0.7, mask, process_group=group,
                                  **extra, **kw)
    _backward(res, entropy_grad)
    x = logits.clone().requires_grad_(True)
    ref = token_logps_and_entropy(x, ids, entropy_grad, 0.7, mask, **kw)
    _backward(ref, entropy_grad)
    what = f"rank {rank} logits {lead} {sizes} entropy_grad={entropy_grad} {sorted(kw)}"
    for name, a, b in zip(("logps", "entropy"), res, ref, strict=True):
        assert a.shape == ids.shape, (what, name, a.shape)
        _close(a, b, f"{what} {name}")
        assert (a[mask == 0] == 0).all(), f"{what} {name}: nonzero off the row mask"
    want = _local(x.grad, start, size).masked_fill(_pad_cols(start, size), 0.0)
    _close(x_loc.grad, want, f"{what} dlogits", atol=2e-6)


def _hidden_case(rank, group, *, sizes=None, entropy_grad=True, seed=0, **kw):
    g, h, ids, mask = _inputs(seed, (2, 8), 6)
    w = torch.randn(V, 6, generator=g) / 6**0.5 * 3
    b = torch.randn(V, generator=g) * 0.3
    start, size = _shard(rank, sizes)
    extra = {"vocab_size": V} if sizes is None else {"vocab_start": start, "vocab_size": V}
    w_loc = _local(w.T, start, size).T.contiguous().requires_grad_(True)
    b_loc = _local(b, start, size).requires_grad_(True)
    h_loc = h.clone().requires_grad_(True)
    res = token_logps_and_entropy_from_hidden(h_loc, w_loc, ids, entropy_grad, 1.3, mask,
                                              bias=b_loc, chunk_size=5, process_group=group,
                                              **extra, **kw)
    _backward(res, entropy_grad)
    hh, ww, bb = (t.clone().requires_grad_(True) for t in (h, w, b))
    ref = token_logps_and_entropy_from_hidden(hh, ww, ids, entropy_grad, 1.3, mask, bias=bb,
                                              chunk_size=5, **kw)
    _backward(ref, entropy_grad)
    what = f"rank {rank} hidden {sizes} entropy_grad={entropy_grad} {sorted(kw)}"
    for name, a, c in zip(("logps", "entropy"), res, ref, strict=True):
        _close(a, c, f"{what} {name}")
        assert (a[mask == 0] == 0).all(), f"{what} {name}: nonzero off the row mask"
    pad = _pad_cols(start, size)
    _close(h_loc.grad, hh.grad, f"{what} dhidden", atol=2e-6)
    _close(w_loc.grad, _local(ww.grad.T, start, size).T.masked_fill(pad[:, None], 0.0),
           f"{what} dweight", atol=2e-6)
    _close(b_loc.grad, _local(bb.grad, start, size).masked_fill(pad, 0.0), f"{what} dbias",
           atol=2e-6)


def _worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        group = dist.group.WORLD
        _logits_case(rank, group, impl="torch")
        _logits_case(rank, group, impl="torch", entropy_grad=False, softcap=4.0)
        _logits_case(rank, group, impl="triton", lead=(3, 2, 5))  # 3-D index: one flat row
        _logits_case(rank, group, impl="torch", lead=(7,), sizes=(14, 9))  # uneven, vocab_start
        _hidden_case(rank, group, impl="torch")
        _hidden_case(rank, group, impl="torch", entropy_grad=False, compact=False)
        _hidden_case(rank, group, impl="triton", sizes=(9, 14), softcap=5.0)
    except Exception:
        # the parent shows this text; the raw exception may not survive pickling
        raise RuntimeError(f"rank {rank}:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def test_rl_vocab_parallel_equals_single_process(tmp_path, monkeypatch):
    # CPU ranks on gloo with Triton's interpreter, on a GPU machine too: the children see no CUDA
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
