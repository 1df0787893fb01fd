"""Chunked PyTorch twin of kernels/logps.py: the same two row operations, same arguments.

Used on CPU and on GPUs without Triton. Rows are processed a chunk at a time so that no float32
tensor larger than about `FUSED_DPO_TORCH_CHUNK_BYTES` (default 64 MiB) ever exists, whatever the
batch, length or vocabulary.
"""

from __future__ import annotations

import os

import torch


def _chunk_rows(V: int) -> int:
    budget = int(os.environ.get("FUSED_DPO_TORCH_CHUNK_BYTES", str(64 * 2**20)))
    # z, exp(z) and one more temporary in the accumulation dtype per element.
    return max(1, budget // (3 * 4 * max(V, 1)))


def _transform(x: torch.Tensor, inv_temp: float, softcap: float | None) -> torch.Tensor:
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x * inv_temp


def _chunks(x: torch.Tensor):
    B, R, V = x.shape
    step = _chunk_rows(V)
    for b in range(B):
        for r0 in range(0, R, step):
            yield b, slice(r0, min(R, r0 + step))


def row_stats(x, labels, weights, ignore_index, label_shift, inv_temp, softcap):
    """See kernels.logps.row_stats."""
    B, R, V = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lse = torch.zeros((B, R), dtype=acc, device=x.device)
    zy = torch.zeros((B, R), dtype=acc, device=x.device)
    for b, rows in _chunks(x):
        z = _transform(x[b, rows].to(acc), inv_temp, softcap)
        col = labels[b, rows].long() - label_shift
        in_range = (col >= 0) & (col < V)
        picked = z.gather(-1, col.clamp(0, V - 1)[:, None]).squeeze(-1)
        active = torch.ones_like(in_range)
        if weights is not None:
            active &= weights[b, rows] != 0
        if ignore_index is not None:
            active &= labels[b, rows] != ignore_index
        # Not torch.logsumexp: it maps a row holding +inf to inf (then log p = -inf); the eager
        # log_softmax, and the kernel, give NaN, which is the honest answer.
        m = z.amax(-1, keepdim=True)
        row_lse = (m + torch.log(torch.exp(z - m).sum(-1, keepdim=True))).squeeze(-1)
        lse[b, rows] = torch.where(active, row_lse, 0.0)
        picked = torch.where(in_range, picked, float("nan"))
        zy[b, rows] = torch.where(active, picked, 0.0)
    return lse, zy


def row_grad(x, grad, labels, coef, lse, label_shift, inv_temp, softcap):
    """See kernels.logps.row_grad."""
    B, R, V = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for b, rows in _chunks(x):
        c = coef[b, rows].to(acc)[:, None]
        xc = x[b, rows].to(acc)
        z = _transform(xc, inv_temp, softcap)
        dz = -c * torch.exp(z - lse[b, rows].to(acc)[:, None])
        col = labels[b, rows].long() - label_shift
        hit = (col >= 0) & (col < V)
        dz.scatter_add_(-1, col.clamp(0, V - 1)[:, None], torch.where(hit[:, None], c, 0.0))
        if softcap is not None:
            th = torch.tanh(xc / softcap)
            dz = dz * ((1.0 - th * th) * inv_temp)
        else:
            dz = dz * inv_temp
        # Rows with coef 0 get exact zeros (the kernel does not read them; 0 * NaN must not leak).
        grad[b, rows] = torch.where(c != 0, dz, 0.0).to(grad.dtype)
