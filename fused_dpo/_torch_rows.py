"""Chunked PyTorch twin of kernels/logps.py: the same three launchers, same arguments, same math.

Used on the CPU and on GPUs without Triton. Rows are processed a chunk at a time so that the
temporaries stay near `FUSED_DPO_TORCH_CHUNK_BYTES` (default 8 MiB per (rows, V) float32 block,
two such blocks live at once), whatever the batch, length or vocabulary. Elementwise steps run in
place on the chunk for that reason, in blocks allocated once per call (`_Blocks`).

On the CPU each launcher runs with `FUSED_DPO_TORCH_THREADS` intra-op threads (default 1; 0:
torch's own count) and restores torch's count on return (`_common.intra_op_threads` says what
that means for other threads). Each op on a block is one OpenMP parallel region ending in a
barrier, and a block is ~1M elements, about a millisecond of work: when another process holds a
core, the thread that lost it holds up every barrier for a scheduler slice. Measured on 2 cores
with a busy process pinned to one (`bench/cpu_threads.py`, B=4 T=256 V=32000 bf16, forward and
backward, medians): one thread 120 ms, torch's two 254 ms, the eager reference 798 ms. A machine
with idle cores to spare may do better with 0.
"""

from __future__ import annotations

import functools
import os

import torch

from ._common import intra_op_threads, threads_under

SUM, MEAN, NONE = 0, 1, 2
REDUCTION_CODE = {"sum": SUM, "mean": MEAN, "none": NONE}


def _threads() -> int:
    text = os.environ.get("FUSED_DPO_TORCH_THREADS", "1")
    n = int(text) if text.strip().isdigit() else -1
    if n < 0:
        raise ValueError("FUSED_DPO_TORCH_THREADS must be an integer >= 0 (0: torch's own thread "
                         f"count), got {text!r}")
    return n


def cpu_threads() -> int:
    """The intra-op threads the launchers run with on the CPU."""
    return threads_under(_threads())


def _cpu_threads(launcher):
    """Run `launcher` under FUSED_DPO_TORCH_THREADS when its first tensor is on the CPU."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        t = first if isinstance(first, torch.Tensor) else first[0]
        if t.device.type != "cpu":
            return launcher(first, *args, **kwargs)
        with intra_op_threads(_threads()):
            return launcher(first, *args, **kwargs)

    return wrapper


def _chunk_rows(V: int) -> int:
    budget = int(os.environ.get("FUSED_DPO_TORCH_CHUNK_BYTES", str(8 * 2**20)))
    return max(1, budget // (8 * max(V, 1)))  # 8 = one float64 or two float32 per element


def _transform_(z: torch.Tensor, inv_temp: float, softcap: float | None) -> torch.Tensor:
    """softcap(z) * inv_temp, in place on a temporary."""
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


class _Blocks:
    """The (rows, V) temporaries of one launcher call, allocated once and reused by every chunk:
    on the CPU a block allocated per chunk comes back as fresh pages from the kernel each time,
    and those page faults cost about as much as the chunk's arithmetic."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous uninitialised block of like's shape and `dtype`, the same memory for the
        same name on every chunk (a name is one temporary: its last use ends before its next)."""
        n = like.numel()
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=like.device)
        return buf[:n].view(like.shape)


def _row_chunks(x, R, row_index, blocks=2):
    """Yield (b0, r0, r1, b, r): rows x[b0, r0:r1] and the (batch, position) pairs they score, as
    int64 (n,) tensors; with `row_index` x is (1, M, V) and row i scores flat row_index[i].
    `blocks`: how many (rows, V) float32 temporaries the caller keeps at once (2 by default)."""
    step = max(1, _chunk_rows(x.shape[-1]) * 2 // blocks)
    if row_index is not None:
        for i0 in range(0, row_index.numel(), step):
            i1 = min(row_index.numel(), i0 + step)
            flat = row_index[i0:i1].long()
            yield 0, i0, i1, flat // R, flat % R
        return
    B, Tx = x.shape[0], x.shape[1]
    for b in range(B):
        for r0 in range(0, Tx, step):
            r1 = min(Tx, r0 + step)
            r = torch.arange(r0, r1, device=x.device)
            yield b, r0, r1, torch.full_like(r, b), r


def _labels_weights(labels, mask, b, t, ignore_index, acc):
    lab = labels[b, t].long()
    w = mask[b, t].to(acc) if mask is not None else torch.ones(lab.shape, dtype=acc, device=lab.device)
    if ignore_index is not None:
        w = torch.where(lab == ignore_index, 0.0, w)
    return lab, w


@_cpu_threads
def row_stats(x, labels, mask, *, stats, shift, vocab_start, ignore_index, inv_temp, softcap,
              row_index=None, accumulate=False):
    """See kernels.logps.row_stats."""
    zy, m, logs, w = (s.view(-1) for s in stats[:4])
    has_stats = len(stats) > 4
    if has_stats:
        pz, lq, sz, mb = (s.view(-1) for s in stats[4:])
    R = stats[0].shape[1]
    V = x.shape[-1]
    acc = zy.dtype
    if row_index is None:
        x = x[:, :R]  # a shifted call's logits have one row more than it scores
    block = _Blocks()
    if has_stats:
        cols = torch.arange(V, device=x.device)[None, :]
    # with the statistics: z, e, its masked copy or e (z - m), and a bool mask live at once
    for b0, r0, r1, b, r in _row_chunks(x, R, row_index, blocks=5 if has_stats else 2):
        xc = x[b0, r0:r1]
        flat = b * R + r
        lab, wc = _labels_weights(labels, mask, b, r + shift, ignore_index, acc)
        col = lab - vocab_start
        z = _transform_(block("z", xc, acc).copy_(xc), inv_temp, softcap)
        if has_stats:
            sz_c = z.sum(-1)
            after = torch.ge(cols, col[:, None], out=block("mask", xc, torch.bool))
            mb_c = block("spare", xc, acc).copy_(z).masked_fill_(after, float("-inf")).amax(-1)
        # Not torch.logsumexp: it maps a row holding +inf to inf (then log p = -inf); the eager
        # log_softmax, and the kernel, give NaN, which is the honest answer.
        mc = z.amax(-1)
        m_ref = torch.where(mc == float("-inf"), 0.0, mc)
        d = z.sub_(m_ref[:, None])
        if has_stats:
            e = torch.exp(d, out=block("e", xc, acc))
            s_c = e.sum(-1)
            # sum e (z - m); e = 0 where z = -inf, whose product with -inf is 0, not NaN
            ed = torch.mul(e, d, out=block("spare", xc, acc))
            u_c = ed.masked_fill_(torch.eq(e, 0, out=block("mask", xc, torch.bool)), 0.0).sum(-1)
            logs_c = s_c.log()
            pz_c = u_c / s_c
            lq_c = e.square_().sum(-1).log_() - 2 * logs_c
        else:
            logs_c = d.exp_().sum(-1).log_()
        in_range = (col >= 0) & (col < V)
        picked = xc.gather(-1, col.clamp(0, V - 1)[:, None]).squeeze(-1).to(acc)
        zy_c = torch.where(in_range, _transform_(picked, inv_temp, softcap), float("nan"))
        active = wc != 0
        if accumulate:
            m_old, logs_old = m[flat], logs[flat]
            m_all = torch.maximum(m_old, mc)
            ref = torch.where(m_all == float("-inf"), 0.0, m_all)
            mass_old = torch.exp(m_old - ref + logs_old)
            mass_new = torch.exp(mc - ref + logs_c)
            if has_stats:
                pi_old = mass_old / (mass_old + mass_new)
                pi_new = mass_new / (mass_old + mass_new)
                pz_c = torch.where(mass_old == 0, 0.0, pi_old * (pz[flat] + (m_old - ref))) + \
                    torch.where(mass_new == 0, 0.0, pi_new * (pz_c + (mc - ref)))
                # (a chunk of only -inf logits has mass 0 and an undefined lq: it adds nothing;
                # a NaN mass stays NaN)
                lq_c = torch.log(torch.where(mass_old == 0, 0.0, pi_old.square() * lq[flat].exp())
                                 + torch.where(mass_new == 0, 0.0, pi_new.square() * lq_c.exp()))
                sz_c = sz_c + sz[flat]
                mb_c = torch.maximum(mb_c, mb[flat])
            logs_c = torch.log(mass_old + mass_new)
            mc = m_all
            zy_c = torch.where(in_range, zy_c, zy[flat])
        zy[flat] = torch.where(active, zy_c, 0.0)
        m[flat] = torch.where(active, mc, 0.0)
        logs[flat] = torch.where(active, logs_c, 0.0)
        w[flat] = wc
        if has_stats:
            pz[flat] = torch.where(active, pz_c, 0.0)
            lq[flat] = torch.where(active, lq_c, 0.0)
            sz[flat] = torch.where(active, sz_c, 0.0)
            mb[flat] = torch.where(active, mb_c, 0.0)


def _reduce(out, counts, code):
    """out: the per-sequence sums; "mean" divides them by the counts (0 where a count is 0)."""
    if code == MEAN:
        out = torch.where(counts != 0, out / torch.where(counts != 0, counts, 1.0), 0.0)
    return out


def segment_ids(cu_seqlens: torch.Tensor, R: int, shift: int) -> torch.Tensor:
    """(R,) int64: the packed sequence of each row r, the one whose [cu[s], cu[s + 1]) holds the
    target r + shift (an empty sequence owns no row)."""
    targets = torch.arange(shift, R + shift, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, targets, right=True) - 1


def _segment_sum(vals: torch.Tensor, seg: torch.Tensor, n_seq: int) -> torch.Tensor:
    """(..., R) -> (..., n_seq): the sums over each segment's rows."""
    out = vals.new_zeros((*vals.shape[:-1], n_seq))
    return out.index_add_(-1, seg, vals)


@_cpu_threads
def seq_reduce(stats, labels, *, V, shift, reduction, cu_seqlens=None):
    """See kernels.logps.seq_reduce."""
    zy, m, logs, w = stats[:4]
    R = zy.shape[1]
    code = REDUCTION_CODE[reduction]
    live = w != 0
    tok = torch.where(live, w * ((zy - m) - logs), 0.0)
    lab = labels[:, shift : shift + R]
    bad_tok = live & ((lab < 0) | (lab >= V))
    if cu_seqlens is None:
        def total(v):
            return v.sum(-1)
    else:  # packed: B = 1, one sum per segment of the row
        seg = segment_ids(cu_seqlens, R, shift)
        n_seq = cu_seqlens.shape[0] - 1

        def total(v):
            return _segment_sum(v[..., 0, :], seg, n_seq)
    counts = total(w)
    bad = total(bad_tok.to(torch.int32)).to(torch.int32)
    ext = None
    if len(stats) > 4:
        pz, lq, sz, mb = stats[4:]
        top1 = (zy >= m) & (zy > mb)
        ext = torch.stack([logs - pz, lq, sz / V, top1.to(w.dtype)])
        ext = torch.where(live, w * ext, 0.0)
        ext[3] = torch.where(tok.isnan(), float("nan"), ext[3])  # a NaN row: NaN statistics
        if code != NONE:
            ext = _reduce(total(ext), counts, code)
    if code == NONE:
        return tok, counts, bad, ext
    return _reduce(total(tok), counts, code), counts, bad, ext


@_cpu_threads
def row_grad(x, grad, labels, stats, grad_out, counts, *, shift, vocab_start, inv_temp, softcap,
             reduction, row_index=None, grad_entropy=None):
    """See kernels.logps.row_grad."""
    _zy, m, logs, w = (s.view(-1) for s in stats[:4])
    ent = None if grad_entropy is None else (logs - stats[4].view(-1))
    R = stats[0].shape[1]
    V = x.shape[-1]
    acc = m.dtype
    code = REDUCTION_CODE[reduction]
    if R == 0:  # nothing is scored (T = 1 shifted)
        grad.zero_()
        return
    block = _Blocks()
    for b0, r0, r1, b, r in _row_chunks(x, R, row_index, blocks=3 if ent is not None else 2):
        xc = x[b0, r0:r1]
        scored = r < R  # rows past R (the last position of a shifted call) are not scored
        flat = torch.where(scored, b * R + r, 0)
        wc = torch.where(scored, w[flat], 0.0)
        g_up = grad_out[b, r.clamp(max=max(R - 1, 0))] if code == NONE else grad_out[b]
        # The weight gates the upstream read: a NaN upstream gradient must not reach prompt rows.
        coef = torch.where(wc != 0, g_up.to(acc) * wc, 0.0)
        if ent is not None:
            ge = grad_entropy[b, r.clamp(max=max(R - 1, 0))] if code == NONE else grad_entropy[b]
            coef_h = torch.where(wc != 0, ge.to(acc) * wc, 0.0)
        if code == MEAN:
            c = counts[b].to(acc)
            coef = torch.where(c != 0, coef / torch.where(c != 0, c, 1.0), 0.0)
            if ent is not None:
                coef_h = torch.where(c != 0, coef_h / torch.where(c != 0, c, 1.0), 0.0)
        z = _transform_(block("z", xc, acc).copy_(xc), inv_temp, softcap)
        lp = z.sub_(m[flat][:, None]).sub_(logs[flat][:, None])
        if ent is not None:
            # d/dz of coef log p_y + coef_h H: coef (onehot - p) - coef_h p (log p + H)
            p = torch.exp(lp, out=block("p", xc, acc))
            vanished = torch.eq(p, 0, out=block("mask", xc, torch.bool))
            dz = lp.add_(ent[flat][:, None]).mul_(coef_h[:, None]).masked_fill_(vanished, 0.0)
            dz = dz.add_(coef[:, None]).mul_(p).neg_()
            dead = (coef == 0) & (coef_h == 0)
        else:
            dz = lp.exp_().mul_(-coef[:, None])
            dead = coef == 0
        col = labels[b, torch.where(scored, r + shift, 0)].long() - vocab_start
        hit = (col >= 0) & (col < V)
        dz.scatter_add_(-1, col.clamp(0, V - 1)[:, None], torch.where(hit, coef, 0.0)[:, None])
        if softcap is not None:
            th = block("th", xc, acc).copy_(xc).div_(softcap).tanh_()
            dz.mul_(th.mul_(th).neg_().add_(1.0).mul_(inv_temp))
        elif inv_temp != 1.0:
            dz.mul_(inv_temp)
        # Unscored rows get exact zeros (the kernel does not read them; 0 * NaN must not leak).
        # On the CPU by row index: a masked_fill_ by a (rows, 1) mask costs as much as the exp_
        # (a host sync on a GPU, where it stays).
        if dz.device.type == "cpu":
            dz.index_fill_(0, dead.nonzero().squeeze(1), 0.0)
        else:
            dz.masked_fill_(dead[:, None], 0.0)
        grad[b0, r0:r1].copy_(dz)
