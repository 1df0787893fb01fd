"""`fused-dpo plan`: will a DPO run fit, and if not, what makes it fit. No weights are loaded.

The model is built from its config on the meta device (shapes, no storage: seconds even at 70B),
with the run's LoRA adapters, dtype and 4-bit base, and its forward is run there once at the step's
batch shape [2B, T] through the trainer's own log-prob head, under
`torch.autograd.graph.saved_tensors_hooks`. What autograd saves, each storage once and no
parameter, is summed per decoder layer: those are the saved activations of the step, derived from
the modules themselves, so a new transformers architecture needs no change here. Two things the
meta device does not do as the GPU would are put right during that forward: attention through
`scaled_dot_product_attention` runs the fused kernels' bookkeeping (q, k, v, the output and the
log-sum-exp are saved, not the T x T probabilities of the math path), and `--precision bf16|fp16`
over fp32 weights casts as autocast does (matmul inputs to bf16, weights cached, reductions in fp32).

The step's peak is then the largest of its phases, each a sum of the parts:

    reference forward   state + one layer's activations (no_grad) + the head's forward transient
    policy forward      state + saved activations + the head's forward transient
    head backward       state + saved activations + the head's backward transient + its gradient
    layer backward      state + activations still held + gradients so far + one layer's backward
    optimizer step      state + gradients + the optimizer's own temporaries

where state is the parameters (policy, and a separate reference) and the optimizer state
(`optim.state_bytes`). The head's transients follow `fused_dpo.hidden`'s chunk rule
(`auto_chunk_size`: one (M, chunk) block of logits for M scored rows) on the hidden path, or the
(2B, T, V) logits and their gradient when the head falls back to the logits. What is predicted is
the allocated peak, what `torch.cuda.max_memory_allocated` reports; the budget must also hold the
allocator's slack (ALLOCATOR_SLACK).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .config import DPOConfig

GiB, MiB = 2**30, 2**20

# Named shapes: configs for transformers' LlamaConfig / Qwen2Config (not memory tables).
SHAPES = {
    "tiny": ("llama", dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "smollm2": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                              num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                              tie_word_embeddings=True)),
    "qwen2-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                 tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 tie_word_embeddings=False)),
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                tie_word_embeddings=False, rope_theta=500000.0)),
}

# Allocator slack: what the device must hold beyond the allocated peak. PyTorch's caching allocator
# keeps freed blocks reserved for reuse, and a block split for a smaller request leaves a remainder
# that only fits smaller ones: reserved exceeds allocated by that fragmentation, which for a
# training step of many activation sizes is typically 5-10% (the allocator's own stats, reserved vs
# allocated); 10% is taken. Outside the allocator, the CUDA context and the kernels' modules take
# about 0.5 GiB (CUDA 12, lazy loading). The budget check is peak x 1.10 + 0.5 GiB <= budget.
SLACK_FRACTION = 0.10
CONTEXT_BYTES = GiB // 2


def allocator_slack(peak: int, device: str) -> int:
    return int(peak * SLACK_FRACTION) + (CONTEXT_BYTES if device == "cuda" else 0)


# -- the model's config ---------------------------------------------------------------------------

def model_config(model: str, revision: str | None = None):
    """The transformers config of `model`: a named shape (SHAPES), a local checkpoint directory
    (its config.json) or a hub id served from the local HF cache (offline)."""
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    if model in SHAPES:
        kind, kwargs = SHAPES[model]
        return (LlamaConfig if kind == "llama" else Qwen2Config)(**kwargs)
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"--model {model} is a file; give a checkpoint directory (with config.json), "
                             f"a hub id or one of the named shapes {', '.join(SHAPES)}")
        if not (p / "config.json").is_file():
            raise ValueError(f"--model {model} has no config.json: not a transformers checkpoint")
        return AutoConfig.from_pretrained(p)
    from .sources import hub_id

    if "/" not in model or not hub_id(model):
        what = "no such directory" if ("/" in model or model.startswith(".")) else "unknown shape name"
        raise ValueError(f"--model {model}: {what}; --model is one of the named shapes "
                         f"{', '.join(SHAPES)}, a checkpoint directory or a cached hub id (org/name)")
    try:
        return AutoConfig.from_pretrained(model, revision=revision, local_files_only=True)
    except OSError:
        raise ValueError(f"--model {model}: not a named shape ({', '.join(SHAPES)}), no such directory, "
                         f"and no config.json for it in the local HF cache") from None


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# -- the model on the meta device -----------------------------------------------------------------

@dataclasses.dataclass
class Model:
    """The run's model on the meta device, and the byte counts that need no forward."""

    module: torch.nn.Module  # the policy (a peft model under LoRA)
    params: int  # bytes of the policy's parameters as the run holds them (NF4 where quantised)
    trainable: list[tuple[tuple[int, ...], torch.dtype]]  # (shape, dtype) of each trainable one
    largest_linear: int  # elements of the largest linear weight (4-bit: dequantised per call)
    head_trainable: bool
    quantized: int  # linear weights in NF4


def weight_dtype(cfg: DPOConfig, config) -> torch.dtype:
    """The dtype the run stores its weights in: --dtype, or for auto the checkpoint's (float32 when
    its config names none, as the trainer's built-in models are)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    saved = getattr(_text_config(config), "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def nf4_bytes(n: int) -> int:
    """bitsandbytes 0.50.2's NF4 weight of n elements with double quantisation (quantize_4bit,
    blocksize 64, compress_statistics): the packed weight (two per byte), one uint8 absmax per
    64-element block (quantize_blockwise of the fp32 absmax, blocks of 256) with an fp32 absmax per
    256 of those, its 256-entry fp32 code book, the fp32 offset and the 16-entry NF4 code."""
    blocks = -(-n // 64)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4 + 16 * 4


def build_model(config, cfg: DPOConfig) -> Model:
    """The policy of the run `cfg` describes, on the meta device."""
    import warnings

    from transformers import AutoModelForCausalLM

    from . import lora

    dtype = weight_dtype(cfg, config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    quantized = []
    if cfg.load_in_4bit:
        from .quant import COMPUTE_DTYPE

        # transformers' bitsandbytes path: every linear layer but the lm_head, computing in bf16
        for m in model.modules():
            if type(m) is torch.nn.Linear and m is not head:
                m.weight.data = torch.empty_like(m.weight, dtype=COMPUTE_DTYPE)
                m.forward = _four_bit_forward(m, COMPUTE_DTYPE)
                quantized.append(m.weight)
    if cfg.lora_r is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lora.apply_lora(model, cfg.lora_r, cfg.effective_lora_alpha, cfg.lora_target_modules,
                                    cfg.seed)
    else:
        model.requires_grad_(True)
    q = {id(w) for w in quantized}
    seen, nbytes, trainable = set(), 0, []
    for p in model.parameters():
        if id(p) in seen:  # a tied embedding is one parameter
            continue
        seen.add(id(p))
        nbytes += nf4_bytes(p.numel()) if id(p) in q else p.numel() * p.element_size()
        if p.requires_grad:
            trainable.append((tuple(p.shape), p.dtype))
    linears = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head_w = lora.unwrap(model).get_output_embeddings().weight
    return Model(model, nbytes, trainable, max(linears, default=0), head_w.requires_grad, len(quantized))


def _four_bit_forward(m: torch.nn.Linear, compute: torch.dtype):
    """bitsandbytes Linear4bit's forward as autograd sees it: the input cast to the compute dtype,
    a matmul with the frozen weight (nothing saved: MatMul4Bit keeps only the packed weight) and
    the output cast back."""
    def forward(x):
        out = torch.nn.functional.linear(x.to(compute), m.weight, m.bias)
        return out.to(x.dtype)
    return forward


# -- the forward on the meta device ---------------------------------------------------------------

class _MetaOps(TorchDispatchMode):
    """The few ops the meta device cannot run as the model needs:
    - a data-dependent branch (`.item()`, `bool(t)`): transformers asks whether the attention mask
      has padding; the answer is yes (a DPO batch is padded), so the mask is built as in training;
    - `_grouped_mm` (the MoE experts), whose meta kernel accepts only bf16: shapes are computed in
      bf16, the result given the inputs' dtype."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return False if args[0].dtype == torch.bool else 0
        if func.overloadpacket is torch.ops.aten._grouped_mm and args[0].dtype != torch.bfloat16:
            a, b, *rest = args
            return func(a.to(torch.bfloat16), b.to(torch.bfloat16), *rest, **kwargs).to(a.dtype)
        return func(*args, **kwargs)


class _FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention as the fused kernels (flash, memory-efficient; their CPU twin)
    run it: the output, and saved for backward q, k, v, the output, the fp32 log-sum-exp per row
    and the float bias made from a boolean mask (the memory-efficient kernel pads its last dimension
    to a multiple of 16 on CUDA)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, pad):
        B, heads, T = q.shape[:3]  # the kernels write the output (B, T, heads, D), seen transposed
        out = q.new_empty((B, T, heads, v.shape[-1])).transpose(1, 2)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        saved = [q, k, v, out, lse]
        if mask is not None:
            if mask.dtype == torch.bool or mask.shape[-1] % pad:
                cols = -(-mask.shape[-1] // pad) * pad
                mask = mask.new_empty((*mask.shape[:-1], cols), dtype=q.dtype)
            saved.append(mask)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None


# Autocast's op lists (torch.amp, CUDA): computed in the low-precision dtype, or in fp32.
_LOW = {torch.nn.functional.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
        torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
        torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.conv1d}
_FP32 = {torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt,
         torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.sum, torch.Tensor.sum,
         torch.nn.functional.softmax, torch.Tensor.softmax, torch.nn.functional.log_softmax,
         torch.Tensor.log_softmax, torch.nn.functional.layer_norm, torch.cumsum, torch.Tensor.cumsum,
         torch.nn.functional.softplus, torch.nn.functional.cross_entropy}


class _AsOnDevice(TorchFunctionMode):
    """What the target device would run, for a forward on the meta device: fused attention
    (`_FusedAttention`) and, with `autocast` set, autocast's casts (inputs of matmuls to `autocast`,
    a trainable leaf's cast cached for the whole forward as autocast caches it; fp32 ops' inputs to
    fp32)."""

    def __init__(self, autocast: torch.dtype | None, pad: int):
        super().__init__()
        self.autocast, self.pad, self.cache = autocast, pad, {}

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype
                and x.dtype != torch.float64):
            return x
        if x.is_leaf and x.requires_grad:
            if id(x) not in self.cache:
                self.cache[id(x)] = (x, x.to(dtype))  # x kept: its id stays unique
            return self.cache[id(x)][1]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is not None and (func in _LOW or func in _FP32):
            dtype = self.autocast if func in _LOW else torch.float32
            if func in _FP32:  # only low-precision inputs go up; fp32 stays
                args = tuple(self._cast(a, dtype) if isinstance(a, torch.Tensor) and a.dtype in (
                    torch.bfloat16, torch.float16) else a for a in args)
            else:
                args = tuple(self._cast(a, dtype) for a in args)
                kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        with torch._C.DisableTorchFunction():
            return _FusedAttention.apply(q, k, v, attn_mask, self.pad)


@contextlib.contextmanager
def _packing_on_meta(head):
    """A padding-free head finds its sequences from the values of the packed row (`data.packing`),
    which the meta device does not have: its position_ids and cu_seqlens are made here instead, for
    2B sequences of equal length (their shapes are what the memory depends on)."""
    from . import hf

    real = hf.packing

    def packing(seq_ids):
        seqs = getattr(head, "sequences", 1)
        return (torch.zeros_like(seq_ids), torch.zeros(seqs + 1, dtype=torch.int32, device=seq_ids.device))

    hf.packing = packing if head.packed else real
    try:
        yield
    finally:
        hf.packing = real


@dataclasses.dataclass
class Probe:
    """What one forward of the policy saves for backward, in bytes (each storage once)."""

    layers: list[int]  # per decoder layer: the tensors first saved inside it
    inputs: list[int]  # per decoder layer: its inputs not held before (what checkpointing keeps)
    before: int  # saved before the first layer (the embedding's ids)
    after: int  # saved after the last one (final norm, the log-prob head)
    small: int  # of all of them, the bytes in storages under offload.MIN_BYTES
    largest: list[int]  # per decoder layer: its largest saved storage
    hidden: int  # one final hidden state (2B, T, H), in the activations' dtype
    hidden_dtype: torch.dtype


def probe(model: torch.nn.Module, head, batch: dict, autocast: torch.dtype | None, device: str) -> Probe:
    """Run `head` (a LogpsHead over `model`, on the meta device) on `batch` and count what autograd
    saves, per decoder layer (`distributed.decoder_layers`)."""
    from .distributed import decoder_layers
    from .offload import MIN_BYTES

    layers = decoder_layers(model)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    where = [-1]  # the layer running, -1 before the first, len(layers) after the last
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, where)
    inputs: dict[int, tuple[int, int]] = {}

    def note(x, into, at):
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            if s._cdata not in params and s._cdata not in into:
                into[s._cdata] = (s.nbytes(), at)
        elif isinstance(x, (tuple, list)):
            for y in x:
                note(y, into, at)

    def pre(i):
        def hook(module, args, kwargs):
            where[0] = i
            note(list(args) + list(kwargs.values()), inputs, i)
        return hook

    def post(i):
        def hook(module, args, out):
            where[0] = i + 1 if i + 1 == len(layers) else where[0]
        return hook

    handles = [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in enumerate(layers)]
    handles += [m.register_forward_hook(post(i)) for i, m in enumerate(layers)]
    out_hidden = []
    handles.append(layers[-1].register_forward_hook(lambda m, a, o: out_hidden.append(
        o[0] if isinstance(o, tuple) else o)))
    pad = 16 if device == "cuda" else 1
    try:
        with _MetaOps(), _AsOnDevice(autocast, pad), _packing_on_meta(head), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: (note(t, saved, where[0]), t)[1],
                                                         lambda t: t):
            head(batch)
    finally:
        for h in handles:
            h.remove()
    n = len(layers)
    per, ins, largest = [0] * n, [0] * n, [0] * n
    before = after = small = 0
    for nbytes, at in saved.values():
        small += nbytes if nbytes < MIN_BYTES else 0
        if at < 0:
            before += nbytes
        elif at >= n:
            after += nbytes
        else:
            per[at] += nbytes
            largest[at] = max(largest[at], nbytes)
    for nbytes, at in inputs.values():
        ins[at] += nbytes
    h = out_hidden[-1]
    return Probe(per, ins, before, after, small, largest, h.numel() * h.element_size(), h.dtype)


# -- the estimate ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Shape:
    """The micro-batch: 2B sequences padded to T tokens, M of whose positions are scored."""

    pairs: int
    seq_len: int
    scored: int | None = None  # None: every position but the last of each sequence

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def m(self) -> int:
        return self.scored if self.scored is not None else self.rows * (self.seq_len - 1)


def _row_blocks(M: int, cols: int, f32: int, bools: int, device: str) -> int:
    """The (rows, cols) blocks the torch row kernels (`_torch_rows`, the CPU's) keep per call:
    `_row_chunks`' rows per chunk for that many blocks, at most the M rows there are."""
    if device != "cpu":
        return 0  # the Triton kernels work in registers
    from .._torch_rows import _chunk_rows

    rows = min(M, max(1, _chunk_rows(cols) * 2 // (f32 + bools)))
    return rows * cols * (4 * f32 + bools)


def head_transients(V: int, H: int, M: int, rows: int, T: int, hidden: torch.dtype, compute: torch.dtype,
                    weight: torch.dtype, device: str, stats: bool, trainable: bool) -> tuple[int, int, int]:
    """(forward, backward, chunk) temporaries of `fused_dpo.hidden`'s 4-matmul path: the scored rows
    gathered (M, H) and cast to the compute dtype, one (M, chunk) block of logits (`auto_chunk_size`),
    the weight's chunk cast when it is in another dtype, the row kernels' blocks; in the backward
    also the fp32 (M, H) accumulator of dh and the (2B, T, H) gradient of the hidden states (the
    weight's gradient is counted with the gradients)."""
    from ..hidden import auto_chunk_size

    ci, hi = compute.itemsize, hidden.itemsize
    chunk = auto_chunk_size(M, V, ci)
    gathered = M * H * hi + (M * H * ci if compute != hidden else 0)
    w_cast = chunk * H * ci if weight != compute else 0
    logits = M * chunk * ci
    fwd = gathered + logits + w_cast + _row_blocks(M, chunk, 3 if stats else 1, 1 if stats else 0, device)
    bwd = gathered + M * H * 4 + logits + w_cast + _row_blocks(M, chunk, 1, 0, device) + rows * T * H * hi
    if trainable and device == "cpu" and compute != torch.float32:
        bwd += (M * chunk + M * H) * 4  # _mm_into without a low-precision fp32-output GEMM
    if hi != 4:
        bwd += M * H * hi  # dh in the hidden dtype before the scatter
    return fwd, bwd, chunk


def _optimizer_step_bytes(name: str, trainable, device: str) -> int:
    """The optimizer step's own temporaries. torch AdamW on CUDA runs foreach: one list of
    sqrt(exp_avg_sq), as large as the second moment; on the CPU single-tensor: two temporaries of
    the largest parameter (sqrt(v) and its quotient). Adafactor: the squared gradient, the update
    and its RMS of the largest parameter. The fused and bitsandbytes kernels update in place."""
    sizes = [math.prod(s) * d.itemsize for s, d in trainable] or [0]
    if name == "adamw_torch":
        return sum(sizes) if device == "cuda" else 2 * max(sizes)
    if name == "adafactor":
        return 3 * max(sizes)
    if name == "adamw_anyprecision":
        return 2 * 4 * max(s // 2 for s in sizes)  # fp32 temporaries of a bf16 parameter
    if name == "adamw_cpu_offload":
        return max(sizes)  # one parameter's update copied back at a time
    return 0


@dataclasses.dataclass
class Estimate:
    """Predicted bytes per rank of one training step."""

    parts: dict[str, int]  # the table's rows
    phases: dict[str, int]  # the step's phases
    layers: list[int]  # saved activations per decoder layer as the run holds them on the device
    host: int  # bytes in host memory (offloaded activations, optimizer state kept there)
    notes: list[str]
    device: str

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def slack(self) -> int:
        return allocator_slack(self.peak, self.device)

    @property
    def needed(self) -> int:
        return self.peak + self.slack


def _meta_batch(shape: Shape, packed: bool) -> dict:
    n = shape.rows * shape.seq_len
    size = (1, n) if packed else (shape.rows, shape.seq_len)
    ids = torch.zeros(size, dtype=torch.long, device="meta")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "response_mask": torch.ones_like(ids, dtype=torch.bool)}


def estimate(config, cfg: DPOConfig, shape: Shape, *, world_size: int = 1, device: str = "cuda") -> Estimate:
    """Predicted bytes per rank of one training step of run `cfg` (batch `shape` per rank) on the
    model `config` describes, on a `device` ("cuda" or "cpu": which kernels the step runs)."""
    import warnings

    from . import lora, optim
    from .hf import LogpsHead
    from .token_metrics import STATS

    m = build_model(config, cfg)
    model, base = m.module, lora.unwrap(m.module)
    stats = STATS + (("log_sum_sq_probs",) if cfg.use_weighting else ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = LogpsHead(base, cfg.logps_impl, stats=stats, warn=False)
    head.packed = cfg.padding_free  # (its probe forwards need weights: not run here)
    head.sequences = shape.rows
    fused = head.fused and cfg.logps_impl != "reference"
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    sharded = cfg.parallel == "fsdp2" and world_size > 1
    if cfg.parallel == "fsdp2" and low is not None:
        model.to(low)  # FSDP2 gathers the parameters in the compute dtype
    autocast = low if low is not None and next(model.parameters()).dtype == torch.float32 else None
    model.train()
    p = probe(model, head, _meta_batch(shape, cfg.padding_free), autocast, device)
    rows, T, M = shape.rows, shape.seq_len, shape.m
    if cfg.padding_free:
        rows, T = 1, shape.rows * shape.seq_len
    W = head.head.weight
    V, H = W.shape
    compute = autocast or p.hidden_dtype
    notes = []

    # what the rank holds throughout
    params = m.params
    ref = params if cfg.reference == "model" and cfg.lora_r is None else 0
    grads = sum(math.prod(s) * d.itemsize for s, d in m.trainable)
    opt = optim.state_bytes(cfg.optim, m.trainable, device=device)
    opt_dev, host = opt["device"], opt["host"]
    if sharded:
        params, ref, grads, opt_dev = (x // world_size for x in (params, ref, grads, opt_dev))
    buckets = grads if cfg.parallel == "ddp" and world_size > 1 else 0  # DDP's flat gradient copy
    state = params + ref + opt_dev + buckets

    # the log-prob head
    head_grad = V * H * W.element_size() if m.head_trainable else 0
    if sharded:
        head_grad //= world_size
    if fused:
        hf, hb, chunk = head_transients(V, H, M, rows, T, p.hidden_dtype, compute, W.dtype, device, True,
                                        m.head_trainable)
        ref_hf = head_transients(V, H, M, rows, T, p.hidden_dtype, compute, W.dtype, device, False,
                                 False)[0]
        after = p.after + 8 * M  # and the scored rows' indices (the meta op does not return them)
        notes.append(f"log-prob head: hidden path, {M} scored rows x {chunk} of V={V} columns per chunk")
    else:
        # the logits are saved in the forward (counted there); their gradient is made in backward
        hf = ref_hf = 0
        hb = rows * T * V * max(compute.itemsize, 4) + rows * T * H * p.hidden_dtype.itemsize
        after = p.after
        notes.append(f"log-prob head: eager logits ({rows} x {T} x V={V}): "
                     f"{head.fallback or 'logps_impl reference'}")

    # saved activations as the run keeps them
    n = len(p.layers)
    largest = max(p.largest, default=0)
    layer_max = max(p.layers, default=0)
    kept = list(p.inputs) if cfg.gradient_checkpointing else list(p.layers)
    recompute = layer_max if cfg.gradient_checkpointing else 0
    if cfg.activation_offloading and device == "cuda":
        # offload: the storages of 1 MiB and more go to host memory; about one layer's are on the
        # device at a time (in flight out in the forward, brought back in the backward). On the
        # CPU the offloaded storages are kept by reference: nothing moves.
        host += p.before + sum(kept) + after - p.small
        layers_dev, acts, in_flight = [0] * n, p.small + layer_max, layer_max
        notes.append("activation offloading: saved tensors of 1 MiB and more in host memory")
    else:
        layers_dev, acts, in_flight = kept, p.before + sum(kept) + after, 0
    if cfg.gradient_checkpointing:
        notes.append("gradient checkpointing: each layer's inputs kept, one layer recomputed at a time")
    # one layer's backward: the gradient coming down the residual stream and two of the layer's
    # largest intermediates' gradients at once (measured on the CPU: 1.5-2x)
    layer_bwd = p.hidden + 2 * largest
    dequant = m.largest_linear * 2 if m.quantized else 0  # a 4-bit weight dequantised per call

    phases = {}
    if cfg.reference != "none":
        # no_grad: one layer's working tensors (about three of its largest and the residual) or the
        # head's pass over the final hidden states, whichever is larger
        ref_pass = max(3 * largest + 2 * p.hidden, p.hidden + ref_hf) + dequant
        if cfg.reference == "precomputed":
            phases["reference (precomputed before training)"] = params * 2 + ref_pass
        else:
            phases["reference forward"] = state + ref_pass
    phases["policy forward"] = state + acts + hf + dequant
    phases["head backward"] = state + acts + hb + head_grad
    phases["backward, last layer"] = state + acts - after + head_grad + recompute + layer_bwd + dequant
    phases["backward, first layer"] = state + p.before + in_flight + grads + recompute + layer_bwd + dequant
    step = _optimizer_step_bytes(cfg.optim, m.trainable, device)
    phases["optimizer step"] = state + grads + step
    gathered = 0
    if sharded:
        root = V * H * W.element_size() * (1 if config.tie_word_embeddings else 2)
        gathered = 2 * max(0, m.params - root) // max(n, 1) + root
        for k in phases:
            phases[k] += gathered
        notes.append("fsdp2: the root's parameters and two decoder layers' gathered at a time")
    parts = {
        "parameters (policy)": params,
        "parameters (reference copy)": ref,
        "gradients": grads,
        "optimizer state": opt_dev,
        "saved activations": acts,
        "log-prob head transient": max(hf, hb),
        "reference forward transient": phases.get("reference forward", state) - state,
        "optimizer step transient": step,
    }
    if buckets:
        parts["ddp gradient buckets"] = buckets
    if gathered:
        parts["fsdp2 gathered parameters"] = gathered
    if m.quantized:
        notes.insert(0, f"load_in_4bit: {m.quantized} linear layers in NF4 with double quantisation")
    return Estimate(parts, phases, layers_dev, host, notes, device)
