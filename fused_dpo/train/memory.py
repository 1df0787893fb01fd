"""The bytes of model state a trainer holds, summed from its tensors: parameters (of the policy and
the reference model), gradients and optimizer state. Each storage counts once, so a tied embedding,
or a LoRA reference that is the policy's own base weights, is not counted twice. Under FSDP2, what
this rank holds: its shards."""

from __future__ import annotations

import torch


def _add(seen: set, t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard is what it holds
        t = t.to_local()
    s = t.untyped_storage()
    key = (t.device, s.data_ptr())
    if key in seen or s.nbytes() == 0:
        return 0
    seen.add(key)
    return s.nbytes()


def model_state_bytes(models, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{"parameters", "gradients", "optimizer", "total"}: bytes on the training device, for the
    modules in `models` (None entries skipped) and the optimizer's state (AdamW: two moments and a
    step per parameter; bitsandbytes: its 8-bit moments, absmax blocks and code books). State kept
    in host memory for parameters on an accelerator (adamw_cpu_offload's moments and master
    weights, torch AdamW's step counters) is "optimizer_host" instead, present when not 0 and not
    in "total". On a CPU run everything is on the device: "optimizer"."""
    seen: set = set()
    params = [p for m in models if m is not None for p in m.parameters()]
    out = {"parameters": sum(_add(seen, p) for p in params),
           "gradients": sum(_add(seen, p.grad) for p in params), "optimizer": 0}
    host = 0
    for p, state in optimizer.state.items():
        on_accelerator = isinstance(p, torch.Tensor) and p.device.type != "cpu"
        for v in state.values():
            if isinstance(v, torch.Tensor):
                n = _add(seen, v)
                if on_accelerator and v.device.type == "cpu":
                    host += n
                else:
                    out["optimizer"] += n
    out["total"] = sum(out.values())
    if host:
        out["optimizer_host"] = host
    return out
