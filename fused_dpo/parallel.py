"""Vocab-parallel (tensor-parallel) log-probs: each rank holds a contiguous shard of the vocabulary.

Layout: rank k of the group holds columns [start_k, start_k + V_local_k) of the logits (or those
rows of the lm_head). The widths may differ: Megatron pads every shard to the same width,
DTensor's `Shard(0)` cuts `torch.chunk`-style shards (V = 100 over 3 ranks: 34, 34, 32). Unless
`vocab_start` is given, start_k is the sum of the widths of ranks 0..k-1, learnt by one small
all-gather of every rank's width per call; the last shard may end in padding columns past the
true vocabulary (`vocab_size`), which are never read. The same all-gather checks that the
shards tile [0, V) exactly and that every rank passes the same ids and mask; a layout that
cannot be right raises the same ValueError on every rank. Every rank holds the same labels,
mask and (for the hidden path) hidden states.

Forward: the usual row-statistics pass over the local shard (a local max m_k, the local sum
s_k = sum exp(z - m_k), the label's z where this rank owns it, and the statistics' partials), then

    all_reduce(MAX):  m = max_k m_k                       (and the top-1 'max before the label')
    all_reduce(SUM):  S = sum_k e^{m_k - m} s_k,  z_y,    (and e^{m_k - m} s_k (pz_k + m_k - m),
                      (e^{m_k - m} s_k)^2 sum p_k^2, sum z for the statistics)

so that every rank holds the global (m, log S, z_y, ...) and reduces them to the same outputs.
Backward: the local logits' gradient from the global statistics (the one-hot only where the
label falls in this shard); the hidden path all-reduces its hidden-state gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of the vocabulary."""

    group: object  # torch.distributed.ProcessGroup
    start: int  # global id of local column 0
    valid: int  # local columns that hold vocabulary ids; the rest (to V_local) are padding
    size: int  # the global vocabulary size


def vocab_shard(process_group, V_local: int, vocab_start, vocab_size, what: str, *,
                impl: str | None = None, device=None, targets=None, validate: bool = True):
    """The VocabShard of a call, or None without a process group (then vocab_start / vocab_size
    must be None).

    The layout comes from every rank: one all-gather of each rank's (width, vocab_start,
    vocab_size, (B, T) and a fingerprint of its `targets`, the `_common.Targets` of the call),
    then the same checks on every rank, so that a layout that cannot be right raises the same
    ValueError everywhere (none hangs in a later collective): shards that overlap or leave a
    gap in [0, vocab_size), vocab_start given on some ranks only, vocab_size differing across
    ranks, ids or mask differing across ranks. One host sync. With validate=False and both
    vocab_start and vocab_size given there is no all-gather (no sync): only this rank's range
    is checked, and a label that no shard or two shards hold gives NaN (`combine_shards`).
    `device`: where the all-gather runs (the inputs' device, as the forward's all-reduces).
    `impl` "reference" is refused here, before the all-gather."""
    if process_group is None:
        for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
            if v is not None:
                raise ValueError(f"{name}={v!r} needs process_group= (a vocab-parallel call)")
        return None
    if impl == "reference":
        raise ValueError("impl='reference' has no vocab-parallel path; use impl='triton'/'torch'")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group= needs torch.distributed initialised "
                         "(init_process_group) first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("process_group does not contain this rank")
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if device is not None and torch.device(device).type == "meta":
        raise ValueError("process_group= needs real tensors; got tensors on the meta device")
    if not validate and vocab_start is not None and vocab_size is not None:
        starts, size = {rank: vocab_start}, vocab_size  # trusted: no all-gather
        _check_starts(starts, size, what, V_local)
    else:
        table = _gather_layout(process_group, V_local, vocab_start, vocab_size, device,
                               targets if validate else None)
        starts, size = resolve_layout(table, what)
    start = starts[rank]
    return VocabShard(process_group, start, min(V_local, size - start), size)


# Columns of the all-gathered layout table: one row per rank.
_WIDTH, _HAS_START, _START, _HAS_SIZE, _SIZE, _B, _T, _IDS, _MASK = range(9)
_P = 2**31 - 1  # the fingerprint's modulus: every product and sum stays exact in int64


def _fingerprint(t, w) -> torch.Tensor:
    """sum_i (t_i mod P) * w_i mod P, exact in int64 (float masks by their bits)."""
    if t.is_floating_point():
        t = t.to(torch.float64).view(torch.int64)
    return ((t.reshape(-1).to(torch.int64) % _P) * w % _P).sum()


@torch.compiler.disable
def _gather_layout(group, V_local, vocab_start, vocab_size, device, targets):
    """Every rank's row of the layout table (a list of int lists, in rank order)."""
    import torch.distributed as dist

    dev = torch.device("cpu") if device is None else torch.device(device)
    meta = [V_local, vocab_start is not None, vocab_start or 0, vocab_size is not None,
            vocab_size or 0, -1, -1]
    prints = torch.zeros(2, dtype=torch.int64, device=dev)
    if targets is not None:
        lab = targets.labels
        meta[_B], meta[_T] = lab.shape
        # position weights in [1, 2^20): the same ids in another order change the fingerprint
        w = torch.arange(lab.numel(), device=dev, dtype=torch.int64) * 40503 % 1048573 + 1
        prints = torch.stack([_fingerprint(lab, w), torch.zeros((), dtype=torch.int64, device=dev)
                              if targets.mask is None else _fingerprint(targets.mask, w) + 1])
    row = torch.cat([torch.tensor(meta, dtype=torch.int64, device=dev), prints])
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows).tolist()


def _ranks(ks) -> str:
    return ", ".join(str(k) for k in ks)


def _check_starts(starts: dict, size: int, what: str, V_local=None) -> None:
    if size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {size}")
    for k, s in starts.items():
        if not 0 <= s < size:
            width = "" if V_local is None else f", {what} V_local = {V_local}"
            raise ValueError(f"rank {k}'s shard starts at vocab id {s}, outside the vocabulary "
                             f"[0, {size}) (vocab_start / vocab_size{width})")


def resolve_layout(table, what: str) -> tuple[dict, int]:
    """({rank: vocab_start}, vocab_size) from the all-gathered table, or the ValueError every
    rank raises alike. A pure function of the table, so every rank reaches the same verdict."""
    world = len(table)
    widths = [r[_WIDTH] for r in table]
    given = [k for k in range(world) if table[k][_HAS_START]]
    sized = [k for k in range(world) if table[k][_HAS_SIZE]]
    if given and len(given) < world:
        raise ValueError(f"vocab_start is given on rank(s) {_ranks(given)} but not on "
                         f"{_ranks(k for k in range(world) if k not in given)}: pass it on "
                         "every rank of the group or on none")
    if given and len(sized) < world:
        raise ValueError("vocab_start needs vocab_size= (the global vocabulary size) on every "
                         "rank: shards of different sizes cannot be summed locally")
    if sized and len(sized) < world:
        raise ValueError(f"vocab_size is given on rank(s) {_ranks(sized)} but not on "
                         f"{_ranks(k for k in range(world) if k not in sized)}")
    sizes = {r[_SIZE] for r in table}
    if sized and len(sizes) > 1:
        raise ValueError("vocab_size differs across the ranks of the group: " + ", ".join(
            f"rank {k} {r[_SIZE]}" for k, r in enumerate(table)))
    if given:
        starts = {k: table[k][_START] for k in range(world)}
    else:
        acc = 0
        starts = {}
        for k, w in enumerate(widths):
            starts[k], acc = acc, acc + w
    size = table[0][_SIZE] if sized else sum(widths)
    _check_starts(starts, size, what)
    # the shards' real columns, [start, min(start + width, size)), must tile [0, size)
    spans = sorted((starts[k], min(starts[k] + widths[k], size), k) for k in range(world))
    layout = ", ".join(f"rank {k} [{a}, {b})" for a, b, k in sorted(spans, key=lambda s: s[2]))
    end = 0
    for a, b, k in spans:
        if a != end:
            kind = f"ids [{end}, {a}) are in no shard" if a > end else \
                f"ids [{a}, {min(end, b)}) are in two shards (rank {k}'s among them)"
            raise ValueError(f"the vocab shards of the group do not tile [0, {size}): {kind}; "
                             f"{what} shards: {layout} (vocab_start / vocab_size, or the "
                             "widths, differ from what the ranks hold)")
        end = b
    if end != size:
        raise ValueError(f"the vocab shards of the group do not tile [0, {size}): ids "
                         f"[{end}, {size}) are in no shard; {what} shards: {layout}")
    # every rank must score the same targets
    if len({(r[_B], r[_T]) for r in table}) > 1:
        raise ValueError("every rank of the group must pass ids of the same (B, T); got " +
                         ", ".join(f"rank {k} ({r[_B]}, {r[_T]})" for k, r in enumerate(table)))
    for col, name in ((_IDS, "ids (input_ids / labels)"), (_MASK, "response_mask")):
        if len({r[col] for r in table}) > 1:
            groups = {}
            for k, r in enumerate(table):
                groups.setdefault(r[col], []).append(k)
            raise ValueError(f"every rank of the group must pass the same {name}; they differ "
                             "between ranks " + " | ".join(_ranks(g) for g in groups.values()))
    return starts, size


def combine_shards(parts, labels, shift: int, shard: VocabShard) -> None:
    """Turn this rank's row statistics (zy, m, logs, w[, pz, lq, sz, mb]) into the global ones, in
    place, with one MAX and one SUM all-reduce. Labels outside [0, V) give z_y = NaN (as an
    out-of-range id does on one process); labels in another shard contribute 0 here. A label that
    no shard holds, or that two hold (shards that leave a gap or overlap, which `vocab_shard`
    refuses unless the layout was trusted with validate=False), gives NaN too: the SUM counts
    its owners."""
    import torch.distributed as dist

    zy, m, logs, _w = parts[:4]
    has_stats = len(parts) > 4
    R = zy.shape[1]
    lab = labels[:, shift : shift + R]
    owned = (lab >= shard.start) & (lab < shard.start + shard.valid)
    outside = (lab < 0) | (lab >= shard.size)
    # max of the rows' maxima, and (top-1) of the maxima over the columns before the label: a
    # shard left of the label contributes its whole max, one right of it -inf
    mx = torch.stack([m, parts[7]]) if has_stats else m.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=shard.group)
    m_all = mx[0] if has_stats else mx
    ref = torch.where(m_all == float("-inf"), 0.0, m_all)
    mass = torch.exp(m - ref + logs)  # this shard's sum exp(z - ref); 0 for a shard of -inf
    sums = [mass, torch.where(owned, zy, torch.where(outside, float("nan"), 0.0))]
    if has_stats:
        pz, lq, sz = parts[4:7]
        # sum exp(z - ref) (z - ref) and sum exp(z - ref)^2 of the shard
        sums.append(torch.where(mass == 0, 0.0, mass * (pz + (m - ref))))
        sums.append(torch.where(mass == 0, 0.0, mass * mass * torch.exp(lq)))
        sums.append(sz)
    sums.append(owned.to(mass.dtype))  # how many shards hold the label: must be exactly 1
    packed = torch.stack(sums)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
    log_tot = torch.log(packed[0])
    m.copy_(m_all)
    logs.copy_(log_tot)
    zy.copy_(torch.where((packed[-1] != 1) & ~outside, float("nan"), packed[1]))
    if has_stats:
        pz.copy_(packed[2] / packed[0])
        lq.copy_(torch.log(packed[3]) - 2.0 * log_tot)
        sz.copy_(packed[4])
        parts[7].copy_(mx[1])


def all_reduce_sum(t: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t
