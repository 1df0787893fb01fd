"""Vocab-parallel (tensor-parallel) log-probs: each rank holds a contiguous shard of the vocabulary.

Megatron's layout: rank k of the group holds columns [start_k, start_k + V_local) of the logits
(or those rows of the lm_head), start_k = k * V_local unless given; the last shard may end in
padding columns past the true vocabulary, which are never read. Every rank holds the same labels,
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


def vocab_shard(process_group, V_local: int, vocab_start, vocab_size, what: str):
    """The VocabShard of a call, or None without a process group (then vocab_start / vocab_size
    must be None). Checks only what this rank can see: shards overlapping across ranks are the
    caller's to avoid."""
    if process_group is None:
        for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
            if v is not None:
                raise ValueError(f"{name}={v!r} needs process_group= (a vocab-parallel call)")
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group= needs torch.distributed initialised "
                         "(init_process_group) first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError("process_group does not contain this rank")
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if vocab_start is None:
        vocab_start = rank * V_local
    elif vocab_size is None:
        raise ValueError(f"vocab_start={vocab_start} needs vocab_size= (the global vocabulary "
                         "size): shards of different sizes cannot be summed locally")
    if vocab_size is None:
        vocab_size = world * V_local
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 0 <= vocab_start < vocab_size:
        raise ValueError(f"rank {rank}'s shard starts at vocab id {vocab_start}, outside the "
                         f"vocabulary [0, {vocab_size}) (vocab_start / vocab_size, {what} "
                         f"V_local = {V_local})")
    valid = min(V_local, vocab_size - vocab_start)
    return VocabShard(process_group, vocab_start, valid, vocab_size)


def combine_shards(parts, labels, shift: int, shard: VocabShard) -> None:
    """Turn this rank's row statistics (zy, m, logs, w[, pz, lq, sz, mb]) into the global ones, in
    place, with one MAX and one SUM all-reduce. Labels outside [0, V) give z_y = NaN (as an
    out-of-range id does on one process); labels in another shard contribute 0 here. A label that
    no shard holds, or that two hold (shards that leave a gap or overlap: vocab_start /
    vocab_size inconsistent across ranks), gives NaN too: the SUM counts its owners."""
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
