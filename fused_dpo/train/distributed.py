"""Multi-process training on torch.distributed: DDP, or FSDP2's `fully_shard`, launched by torchrun.

    torchrun --nproc-per-node 2 -m fused_dpo train --parallel fsdp2 --batch-size 8

What the ranks share, and how (the trainer calls into this module at each point):

- **Data.** Every rank draws the same global batch of batch_size * world pairs from the seeded
  stream and keeps its contiguous slice: N ranks at batch b see what one process sees at batch N*b.
- **Gradients.** DDP averages them over ranks; FSDP2 reduce-scatters them (in fp32 under a bf16
  parameter policy). DDP reduces once per step, on the last micro-batch of gradient accumulation;
  FSDP2 on every micro-batch, into the shards (see `gradient_sync`).
- **Metrics.** Averaged over ranks (token counts and the token sums of TRL's metrics summed, the
  peak memory maxed) before the health monitor sees them. Every rank runs the same monitor on the
  same numbers and takes the same decisions; a NaN/inf loss on any rank skips the step on all.
- **Files.** Rank 0 alone writes the run files; every rank writes its shards of the checkpoint
  (`sharded.py`).

The forward goes through one module (`LogpsModule`: the model with its log-prob heads), because the
hidden path reads the base model and the lm_head's weight directly, not through `model.forward`:
DDP must see that forward to reduce the gradients, and FSDP2's root must see it to gather its own
parameters (embeddings, final norm, lm_head) once per forward and once in backward.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..losses import BCOState

PARALLEL = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. The default is a single process with no process group."""

    parallel: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.parallel != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank computes: its own GPU under NCCL, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """`t` reduced over the ranks (a new tensor on t's device); `t` itself without a group."""
        return _all_reduce(t, op) if self.enabled else t

    def all_true(self, flag: bool | torch.Tensor) -> bool:
        """Whether `flag` holds on every rank (one collective; a host sync)."""
        f = torch.as_tensor(flag, dtype=torch.int32).reshape(())
        return bool(self.all_reduce(f, dist.ReduceOp.MIN))

    def mean_metrics(self, sums: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
        """Per-rank metrics averaged over the ranks, those named in `summed` added up."""
        if not self.enabled:
            return sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] * (self.world if k in summed else 1) for k in keys],
                         dtype=torch.float64)
        t = self.all_reduce(t) / self.world
        return dict(zip(keys, t.tolist(), strict=True))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup(parallel: str) -> Dist:
    """The process group for `parallel` (ddp | fsdp2), joined from torchrun's environment, or a group
    of one when the process was started without torchrun; `Dist()` for "none"."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if launched > 1:
            raise ValueError(f"started as {launched} processes (WORLD_SIZE={launched}) with parallel "
                             f"none: pass --parallel ddp or --parallel fsdp2, or start one process")
        return Dist()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} "
                             f"GPUs: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        # A rank that dies is noticed by torchrun, which stops the others; the timeout bounds a
        # collective that waits on a rank that hangs instead.
        timeout = datetime.timedelta(minutes=float(os.environ.get("FUSED_DPO_DIST_TIMEOUT_MIN", "30")))
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # not under torchrun: a group of one, so the sharded code path runs as it would
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    return Dist(parallel, dist.get_rank(), dist.get_world_size(), local_rank)


class LogpsModule(torch.nn.Module):
    """A causal LM and its log-prob heads (`hf.LogpsHead`) as one module, whose forward is what DDP
    and FSDP2 wrap. `heads` maps a name ("policy", "reference") to a head on this same model (under
    LoRA, the reference's head reads the model with its adapters off)."""

    def __init__(self, model: torch.nn.Module, heads: dict):
        super().__init__()
        self.model = model
        self.heads = heads  # plain callables over self.model's modules, not submodules

    def forward(self, input_ids, attention_mask, response_mask, head: str = "policy"):
        return self.heads[head]({"input_ids": input_ids, "attention_mask": attention_mask,
                                 "response_mask": response_mask})


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers model: the modules whose class transformers names in
    `_no_split_modules` (LlamaDecoderLayer, ...), the unit FSDP2 shards one at a time."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"parallel fsdp2: found no decoder layers in {type(model).__name__} (its "
                         f"_no_split_modules is {sorted(names) or 'empty'}); FSDP2 shards a model one "
                         f"decoder layer at a time")
    return layers


def param_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def wrap(module: LogpsModule, d: Dist, precision: str, trainable: bool) -> torch.nn.Module:
    """`module` ready for `d.parallel`. FSDP2: each decoder layer, then the root (embeddings, final
    norm, lm_head: a tied embedding stays one parameter), sharded over the ranks, with parameters
    gathered in the `precision` dtype and gradients reduced in fp32. DDP: the trainable policy is
    wrapped; a frozen model stays a replica on each rank (nothing to reduce)."""
    if d.parallel == "ddp":
        if not trainable:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (rotary frequencies) are identical on every rank and never change: no broadcast
        # before each forward (torch 2.13 renamed the switch; the GPU image's 2.11 has the old one).
        renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
        return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                   **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
    if d.parallel == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype(precision), reduce_dtype=torch.float32)
        for layer in reversed(decoder_layers(module.model)):  # innermost first, if they nest
            fully_shard(layer, mp_policy=mp)
        # The root's parameters (the embeddings and lm_head: the largest) stay gathered from the
        # policy's forward to its backward, one gather for both; a frozen reference has no
        # backward, so its root is resharded at once (else they would stay gathered for good).
        fully_shard(module, mp_policy=mp, reshard_after_forward=not trainable)
        return module
    return module


def reshard(*modules) -> None:
    """Free the gathered parameters of FSDP2 modules (e.g. the policy's root after an evaluation,
    which has no backward to free them), so that what a rank holds is its shards."""
    for m in modules:
        if hasattr(m, "reshard"):
            m.reshard()


def gradient_sync(wrapped: torch.nn.Module, sync: bool):
    """The context for the forward and backward of a micro-batch: under DDP, gradient accumulation
    reduces once, on the last micro-batch (`sync`); the others accumulate in each rank's .grad.
    FSDP2 reduces every micro-batch into the shards: skipping it would hold the whole unsharded
    gradient on every rank between micro-batches (the memory FSDP2 is there to save), in buffers
    that optimizer.zero_grad does not clear when a NaN micro-batch ends the step early."""
    if not sync and hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    return nullcontext()


def discard_micro_batch(wrapped: torch.nn.Module, loss: torch.Tensor, sync: bool) -> None:
    """End a micro-batch whose step is skipped (a NaN/inf loss on some rank), on every rank. A DDP
    forward outside no_sync (`sync`: the last micro-batch) arms the reducer for its backward; if that
    backward never ran, the next backward would fire it: the next step's first micro-batch, inside
    no_sync, reduced in its place (an extra all-reduce, and sums in another order than a run without
    the skipped step: issue 19). So it runs here, and its gradients go with the step's. FSDP2 keeps
    nothing armed across a forward."""
    if sync and hasattr(wrapped, "no_sync"):  # DDP
        loss.backward()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also takes FSDP2's sharded gradients: the norm of the
    whole gradient (DTensor shards reduced to one number), then every shard scaled by it."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class GlobalBCOState(BCOState):
    """BCO's running reward mean over every rank's rewards: each update adds the rewards of the
    whole global batch, so the mean is the one a single process would keep. `active=False` adds
    nothing from this rank (a rank whose share of a held-out batch is empty still joins the
    collective)."""

    active: bool = True

    def update(self, rewards: torch.Tensor) -> None:
        r = rewards.detach().double()
        local = torch.stack([r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64,
                                                   device=r.device)])
        if not self.active:
            local = torch.zeros_like(local)
        total, n = (float(x) for x in _all_reduce(local))
        if n:
            self.mean = (self.mean * self.count + total) / (self.count + n)
            self.count += int(n)


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced over the default group, as a new tensor on t's device. gloo reduces CPU
    tensors, NCCL CUDA ones (this rank's device, set by `setup`)."""
    w = t.detach().clone().to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(w, op=op)
    return w.to(t.device)
