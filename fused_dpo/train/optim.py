"""The optimizer of a run, by transformers' and TRL's `optim` name, and the state bytes each keeps.

    adamw_torch          torch AdamW (foreach on CUDA, single-tensor on the CPU): 2 moments in the
                         parameter's dtype
    adamw_torch_fused    torch AdamW(fused=True): the same moments, one kernel for all parameters;
                         torch 2.13 has it on the CPU too (fp32, bf16, fp16, fp64), equal to
                         adamw_torch up to fp32 rounding (another order of operations)
    adafactor            torch.optim.Adafactor: factored second moment (a row and a column vector
                         per matrix), no first moment. Its lr is relative: an update moves each
                         weight by at most lr x max(1e-3, RMS(weight)) (Shazeer and Stern's
                         relative step, capped at lr), so the same --learning-rate moves weights
                         less than AdamW does, and a weight that starts at zero (LoRA's B) by
                         1e-3 x lr a step. transformers' `adafactor` is another optimizer (its own
                         class, relative_step=False: an absolute lr). weight_decay is decoupled,
                         weight *= 1 - lr x weight_decay, as in AdamW.
    adamw_8bit           bitsandbytes AdamW8bit: both moments quantised blockwise to 8 bits
                         (blocks of 256, a float32 absmax each); parameters of fewer than 4096
                         elements keep float32 moments (bnb's min_8bit_size)
    paged_adamw_8bit     the same in CUDA unified memory, paged to the host under memory pressure:
                         CUDA only (bnb falls back to adamw_8bit on a CPU; we refuse instead)
    adamw_cpu_offload    AdamW with every state tensor in host memory (pinned, for a CUDA run): the
                         gradient is copied to the host, the update computed there in fp32 on an
                         fp32 master copy of the weights, and the weights copied back. On fp32 CPU
                         weights (no master copy needed) it is torch AdamW(foreach=False), bit for bit
    adamw_anyprecision   AdamW for bf16 weights (transformers' name for AnyPrecisionAdamW with Kahan
                         summation): fp32 moments and a bf16 compensation buffer per parameter

adamw_anyprecision: bf16 weights round each update to 8 bits of mantissa, so an update smaller
than half a unit in the last place is lost and long fine-tuning stalls. The remedies are fp32
moments with stochastic rounding of the weights, or with compensated (Kahan) summation. We take
Kahan: the rounding error of every update is kept in the compensation buffer and added back into
the next, so weight + compensation carries about 16 bits of mantissa, and it is deterministic:
no random stream to save, a resume is exact from the state dict alone, and two runs agree bit for
bit. Stochastic rounding needs no buffer (2 bytes a parameter less) but draws random numbers
every step. On fp32 weights the compensation is wasted (use adamw_torch); fp16 weights are refused
too: their trouble is range (a 5-bit exponent), which compensation does not help.

Under FSDP2 (DTensor parameters) torch AdamW, fused or not, and adamw_anyprecision (plain
elementwise torch ops on the shards) work; the others are refused at config validation, for the
reasons FSDP2_UNSUPPORTED gives (torch 2.13's Adafactor was tried and fails on the shards). Under
DDP every optimizer runs as in one process: each rank updates its replica with the same reduced
gradient. Checked on 2 CPU ranks (gloo): under DDP every optimizer here, under FSDP2 the three
that work, resume bit for bit.
"""

from __future__ import annotations

import math

import torch

NAMES = ("adamw_torch", "adamw_torch_fused", "adafactor", "adamw_8bit", "paged_adamw_8bit",
         "adamw_cpu_offload", "adamw_anyprecision")
FSDP2_UNSUPPORTED = {  # name: why it cannot update FSDP2's DTensor shards
    "adafactor": "torch's Adafactor squares its column statistics in place, which DTensor refuses on "
                 "a dimension sharded over the ranks",
    "adamw_8bit": "bitsandbytes' kernels take plain local tensors",
    "paged_adamw_8bit": "bitsandbytes' kernels take plain local tensors",
    "adamw_cpu_offload": "its host copies are of whole local tensors",
}
CUDA_ONLY = ("paged_adamw_8bit",)

BNB_MIN_8BIT_SIZE = 4096  # bnb's default min_8bit_size: smaller parameters keep float32 moments
BNB_BLOCK = 256  # bnb's blockwise quantisation: one float32 absmax per 256 elements
BNB_QMAP_BYTES = 2 * 256 * 4  # the signed and unsigned 8-bit code books, float32, shared


def build(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.optim` names, over the trainable `params`, with cfg.learning_rate and
    cfg.weight_decay (decoupled, as AdamW's, in every one of them)."""
    name, lr, wd = cfg.optim, cfg.learning_rate, cfg.weight_decay
    device = params[0].device if params else torch.device("cpu")
    if name in CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"--optim {name} pages its state through CUDA unified memory and needs a CUDA "
                         f"device; these parameters are on {device.type}: --optim adamw_8bit is the "
                         f"same optimizer, unpaged")
    if name in FSDP2_UNSUPPORTED and any(hasattr(p, "to_local") for p in params):
        raise ValueError(fsdp2_refusal(name))
    for dtype in sorted({str(p.dtype).removeprefix("torch.") for p in params}):
        if name != "adamw_anyprecision":  # which refuses every dtype but bf16 itself
            check_weight_dtype(cfg, dtype)  # the weights really trained (--dtype auto: the file's)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adamw_torch_fused":
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
        except RuntimeError as e:  # a device or dtype the fused kernel does not cover
            raise ValueError(f"--optim adamw_torch_fused: {e}") from None
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=wd)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(f"--optim {name} needs bitsandbytes: pip install bitsandbytes") from None
        from .quant import quiet_cpu_kernel_notice

        quiet_cpu_kernel_notice()
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=wd, min_8bit_size=BNB_MIN_8BIT_SIZE)
    if name == "adamw_cpu_offload":
        return HostAdamW(params, lr=lr, weight_decay=wd)
    if name == "adamw_anyprecision":
        _check_bf16({p.dtype for p in params})
        return KahanAdamW(params, lr=lr, weight_decay=wd)
    raise ValueError(f"optim must be one of {NAMES}, got {name!r}")


def fsdp2_refusal(name: str) -> str:
    others = ", ".join(n for n in NAMES if n not in FSDP2_UNSUPPORTED)
    return (f"--optim {name} is not supported with --parallel fsdp2 ({FSDP2_UNSUPPORTED[name]}): use "
            f"--parallel ddp, or one of {others}")


def _check_bf16(dtypes: set) -> None:
    other = sorted(str(d).removeprefix("torch.") for d in dtypes if d != torch.bfloat16)
    if not other:
        return
    if "float16" in other:
        raise ValueError("--optim adamw_anyprecision is a bf16-only optimizer (fp32 moments, Kahan-"
                         f"compensated bf16 weights); the trainable weights are {', '.join(other)}: load "
                         "them in bf16 (--dtype bfloat16) or use --optim adamw_torch")
    raise ValueError(f"--optim adamw_anyprecision compensates the rounding of bf16 weights (a bf16 "
                     f"buffer per parameter); the trainable weights are {', '.join(other)}, where that "
                     f"is wasted: use --optim adamw_torch (or load the weights in bf16: --dtype bfloat16)")


def _adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
            group: dict) -> None:
    """One AdamW update of `p` in place, op for op torch's single-tensor AdamW (torch 2.13,
    adam.py `_single_tensor_adam`, decoupled weight decay), so that it rounds the same."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    step += 1
    if wd != 0:
        p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    t = step.item()
    step_size = lr / (1 - beta1**t)
    denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def _closure(closure):
    """The loss of an optimizer's `closure` (re-evaluated with autograd on), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _StatedAdamW(torch.optim.Optimizer):
    """Our AdamWs' common part: the hyperparameters, and a load_state_dict that keeps each state
    tensor's own dtype and puts it where `_home` says. torch's casts every floating state tensor to
    its parameter's dtype and device: fp32 moments of bf16 weights would be rounded to bf16, and
    host-resident state moved onto the GPU."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _home(self, p: torch.Tensor, key: str, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # checks the groups, sets lr & co
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            if i in saved:
                self.state[p] = {k: self._home(p, k, v.detach()) if torch.is_tensor(v) else v
                                 for k, v in saved[i].items()}

    def _grads(self):
        """(group, parameter, its state) of every parameter with a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not take sparse gradients")
                yield group, p, self.state[p]


class HostAdamW(_StatedAdamW):
    """`adamw_cpu_offload`: AdamW with its state in host memory. Per parameter: fp32 `exp_avg`,
    `exp_avg_sq`, a float32 `step` (as torch's), and `master`, an fp32 copy of the weights, unless
    the parameter is itself an fp32 CPU tensor (then it is updated in place: torch AdamW's
    arithmetic, bit for bit). On CUDA every state tensor is pinned; the gradient comes to the host
    through a pinned buffer, and the new weights go back asynchronously, ordered on the stream
    before the next forward; the next step's gradient copy waits for them."""

    def _home(self, p, key, v):
        pin = p.device.type == "cuda" and key != "step"
        v = v.to("cpu", copy=True)
        return v.pin_memory() if pin else v

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group, p, state in self._grads():
            pin = p.device.type == "cuda"
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for k in ("exp_avg", "exp_avg_sq"):
                    state[k] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
                if p.device.type != "cpu" or p.dtype != torch.float32:
                    state["master"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
                    state["master"].copy_(p.detach())
            g = p.grad
            if g.device.type != "cpu":
                g = torch.empty(g.shape, dtype=g.dtype, pin_memory=pin).copy_(g)  # blocking: read next
            w = state.get("master", p)
            _adamw_(w, g.float(), state["exp_avg"], state["exp_avg_sq"], state["step"], group)
            if w is not p:
                p.copy_(w, non_blocking=pin)
        return loss


class KahanAdamW(_StatedAdamW):
    """`adamw_anyprecision`: AdamW on bf16 weights with fp32 `exp_avg`, `exp_avg_sq`, a float32
    `step` on the host (as torch's) and a bf16 `compensation` per parameter. Each step computes in
    fp32 w = weight + compensation (the weight as exact arithmetic would have it, to about 16 bits
    of mantissa), applies torch's AdamW update to w, stores weight = bf16(w) (round to nearest) and
    compensation = bf16(w - weight) (w - weight is exact in fp32: they agree to 8 bits). Plain
    elementwise torch ops, so FSDP2's DTensor shards take it as they are."""

    def _home(self, p, key, v):
        return v.to("cpu" if key == "step" else p.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group, p, state in self._grads():
            if p.dtype != torch.bfloat16:
                _check_bf16({p.dtype})
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for k in ("exp_avg", "exp_avg_sq"):
                    state[k] = torch.zeros_like(p, dtype=torch.float32)
                state["compensation"] = torch.zeros_like(p)
            c = state["compensation"]
            w = p.float().add_(c)
            _adamw_(w, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], state["step"], group)
            p.copy_(w)
            c.copy_(w.sub_(p))
        return loss


def state_bytes(name: str, params: list[tuple[tuple[int, ...], torch.dtype]],
                device: str = "cuda") -> dict[str, int]:
    """The bytes of optimizer state that optimizer `name` holds after its first step, for trainable
    parameters of these (shape, dtype) on `device`: {"device": on the parameters' device, "host":
    in host memory}, as `memory.model_state_bytes` counts them (its "optimizer" and
    "optimizer_host"). On a CPU run the host is the device: everything is "device". torch AdamW
    and Adafactor keep their `step` counters (4 bytes a tensor) on the host, bitsandbytes a
    Python int; paged_adamw_8bit's paged buffers (parameters of 1e5 elements or more) count as
    device memory, which they occupy while the step runs, but lie outside torch's allocator."""
    if name not in NAMES:
        raise ValueError(f"optim must be one of {NAMES}, got {name!r}")
    dev = host = 0
    numels = [(math.prod(shape), tuple(shape), dtype) for shape, dtype in params]
    size = {d: d.itemsize for _, _, d in numels}
    if name in ("adamw_torch", "adamw_torch_fused"):
        dev = sum(2 * n * size[d] for n, _, d in numels)
        steps = 4 * len(params)  # fused: float32 on the device; else a float32 CPU tensor
        dev, host = (dev + steps, 0) if name == "adamw_torch_fused" else (dev, steps)
    elif name == "adafactor":
        for n, shape, d in numels:
            if len(shape) >= 2:  # row_var (..., rows, 1), col_var (..., 1, cols)
                n = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
            dev += n * size[d]
        host = 4 * len(params)
    elif name in ("adamw_8bit", "paged_adamw_8bit"):
        quantised = [n for n, _, _ in numels if n >= BNB_MIN_8BIT_SIZE]
        dev = sum(2 * 4 * n for n, _, _ in numels if n < BNB_MIN_8BIT_SIZE)
        dev += sum(2 * n + 2 * 4 * -(-n // BNB_BLOCK) for n in quantised)
        dev += BNB_QMAP_BYTES if quantised else 0
    elif name == "adamw_cpu_offload":
        for n, _, d in numels:
            master = device != "cpu" or d != torch.float32
            host += 4 * n * (3 if master else 2) + 4
    else:  # adamw_anyprecision
        _check_bf16({d for _, d in params})
        dev = sum((2 * 4 + 2) * n for n, _, _ in numels)
        host = 4 * len(params)
    if device == "cpu":
        return {"device": dev + host, "host": 0}
    return {"device": dev, "host": host}


WARNED_BF16: set[str] = set()  # the optimizers DPOConfig has warned about with bf16 full fine-tuning


def check_weight_dtype(cfg, dtype: str) -> None:
    """Full fine-tuning of `dtype` weights: refused for float16, a warning (once a process and
    optimizer) for bfloat16 without adamw_anyprecision. Called with the config's --dtype when it is
    checked, and with the dtype of the weights really trained when the optimizer is built
    (`optim.build`): --dtype auto keeps a checkpoint's, and from Python a model comes in any."""
    if cfg.lora_r is not None:
        return
    if dtype == "float16":
        # Measured (torch 2.13): AdamW on fp16 weights with gradients of 1e-3 reaches -inf in 3 steps.
        raise ValueError("full fine-tuning of float16 weights is refused: the weights, gradients and "
                         "AdamW moments would all be fp16 with no GradScaler, so a squared gradient "
                         "below 6e-8 flushes to 0 and AdamW's eps (1e-8) is 0 in fp16: the update "
                         "divides by zero. Use dtype bfloat16 or float32 (with --precision fp16 for "
                         "fp16 compute), or LoRA (lora_r), whose adapters train in fp32 on the frozen "
                         "fp16 base")
    if dtype == "bfloat16" and cfg.optim != "adamw_anyprecision" and cfg.optim not in WARNED_BF16:
        # Once a process: validate runs for every config built (the CLI's, the trainer's check),
        # and transformers' warning filters reset Python's own once-per-place memory.
        import warnings

        WARNED_BF16.add(cfg.optim)
        warnings.warn(f"bfloat16 weights with full fine-tuning and optim {cfg.optim}: each update is "
                      f"rounded to the weight's bf16 (8 significant bits), so steps below 0.2-0.4% of "
                      f"a weight's size round away; optim adamw_anyprecision keeps them (Kahan "
                      f"summation), dtype float32 keeps fp32 master weights", stacklevel=3)
