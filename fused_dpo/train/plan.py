"""`fused-dpo plan`: will a DPO run fit, and if not, what makes it fit. No weights are loaded.

The model is built from its config on the meta device (shapes, no storage: seconds even at 70B),
with the run's LoRA adapters, dtype and 4-bit base, and its forward is run there once at the step's
batch shape [2B, T] through the trainer's own log-prob head, under
`torch.autograd.graph.saved_tensors_hooks`. What autograd saves, each storage once and no
parameter, is summed per decoder layer: those are the saved activations of the step, derived from
the modules themselves, so a new transformers architecture needs no change here. What the meta
device does not do as the GPU would is put right during that forward: attention through
`scaled_dot_product_attention` runs the fused kernels' bookkeeping (q, k, v, the output and the
log-sum-exp are saved, not the T x T probabilities of the math path); `--precision bf16|fp16` over
fp32 weights casts as autocast does (matmul inputs to bf16, weights cached, reductions in fp32); a
question about the data's values (does the mask pad?) is answered as a padded batch would, and the
MoE experts' grouped matmul gets its shapes (`_MetaOps`).

The step's peak is then the largest of its phases, each a sum of the parts:

    reference forward   state + one layer's activations (no_grad) + the head's forward transient
    policy forward      state + saved activations + the head's forward transient
    head backward       state + saved activations + the head's backward transient + its gradient
    layer backward      state + activations still held + gradients so far + one layer's backward
    optimizer step      state + gradients + the optimizer's own temporaries

where state is the parameters (policy, and a separate reference) and the optimizer state
(`optim.state_bytes`). The head's transients follow `fused_dpo.hidden`'s chunk rule
(`auto_chunk_size`: one (M, chunk) block of logits for M scored rows) on the hidden path; a head
that builds the (2B, T, V) logits is run on the meta device with its storages counted while they
live (`eager_head_transients`). What is predicted is the allocated peak, what
`torch.cuda.max_memory_allocated` reports; the budget must also hold the allocator's slack
(`allocator_slack`).

On the CPU, where the same rules apply to the CPU's kernels (`device="cpu"`), tests/test_plan.py
measures one real training step of the trainer over a grid of small models and compares: the
predictions are within 4% of the measured peaks there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
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
    largest_quantized: int  # elements of the largest NF4 weight (dequantised at each use)
    head_trainable: bool
    quantized: int  # linear weights in NF4
    count: int  # parameters (elements; a tied embedding once)


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
    with torch.device("meta"):
        if not torch.empty(1).is_meta:  # else the skeleton's weights would really be allocated
            raise RuntimeError("torch.device('meta') does not capture torch.empty here (it was "
                               "replaced after torch cached its factory functions): the plan would "
                               "allocate the model's weights")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if cfg.disable_dropout:  # as the trainer does (a dropout saves its mask)
        from .hf import disable_dropout

        disable_dropout(model)
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
    seen, nbytes, trainable, count = set(), 0, [], 0
    for p in model.parameters():
        if id(p) in seen:  # a tied embedding is one parameter
            continue
        seen.add(id(p))
        count += p.numel()
        nbytes += nf4_bytes(p.numel()) if id(p) in q else p.numel() * p.element_size()
        if p.requires_grad:
            trainable.append((tuple(p.shape), p.dtype))
    head_w = lora.unwrap(model).get_output_embeddings().weight
    return Model(model, nbytes, trainable, max((w.numel() for w in quantized), default=0),
                 head_w.requires_grad, len(quantized), count)


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
    small_layers: list[int]  # per decoder layer: its saved storages under offload.MIN_BYTES
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
                # the storage is held: a freed one's address may come back for another
                into[s._cdata] = (s.nbytes(), at, s)
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
    per, ins, largest, small_layers = [0] * n, [0] * n, [0] * n, [0] * n
    before = after = small = 0
    for nbytes, at, _ in saved.values():
        small += nbytes if nbytes < MIN_BYTES else 0
        if at < 0:
            before += nbytes
        elif at >= n:
            after += nbytes
        else:
            per[at] += nbytes
            largest[at] = max(largest[at], nbytes)
            small_layers[at] += nbytes if nbytes < MIN_BYTES else 0
    for nbytes, at, _ in inputs.values():
        ins[at] += nbytes
    h = out_hidden[-1]
    return Probe(per, ins, before, after, small, small_layers, largest, h.numel() * h.element_size(),
                 h.dtype)


# -- the estimate ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
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


def _row_blocks(M: int, cols: int, blocks: int, f32: int, bools: int, device: str) -> int:
    """The (rows, cols) blocks the torch row kernels (`_torch_rows`, the CPU's) keep per call: rows
    per chunk by `_row_chunks`' rule for `blocks` blocks, at most the M rows there are, of which
    `f32` are float32 and `bools` bool."""
    if device != "cpu":
        return 0  # the Triton kernels work in registers
    from .._torch_rows import _chunk_rows

    rows = min(M, max(1, _chunk_rows(cols) * 2 // blocks))
    return rows * cols * (4 * f32 + bools)


def head_transients(V: int, H: int, M: int, rows: int, T: int, hidden: torch.dtype, compute: torch.dtype,
                    weight: torch.dtype, device: str, stats: bool, trainable: bool,
                    softcap: bool = False) -> tuple[int, int, int]:
    """(forward, backward, chunk) temporaries of `fused_dpo.hidden`'s 4-matmul path, as its code
    allocates them: the scored rows gathered (M, H) and cast to the compute dtype, one (M, chunk)
    block of logits (`auto_chunk_size`), the weight's chunk cast when it is in another dtype, the
    row kernels' blocks (a soft-capped head's backward keeps a second one, tanh); in the backward
    also the fp32 (M, H) accumulator of dh, the (2B, T, H) gradient of the hidden states and, on the
    CPU in bf16/fp16 (no fp32-output low-precision GEMM there), the fp32 copies `_addmm_f32_` and
    `_mm_into` multiply. The weight's gradient is counted with the gradients."""
    from ..hidden import auto_chunk_size

    ci, hi = compute.itemsize, hidden.itemsize
    chunk = auto_chunk_size(M, V, ci)
    gathered = M * H * hi + (M * H * ci if compute != hidden else 0)
    w_cast = chunk * H * ci if weight != compute else 0
    logits = M * chunk * ci
    # row_stats with the statistics: rows for 5 blocks, z, spare and e (fp32) and a bool mask held
    blocks = _row_blocks(M, chunk, 5, 3, 1, device) if stats else _row_blocks(M, chunk, 2, 1, 0, device)
    fwd = gathered + logits + w_cast + blocks
    after_rows = 0  # the GEMMs after the row kernel, once its blocks are freed
    if device == "cpu" and ci != 4:
        after_rows = M * chunk * 4 + chunk * H * 4  # dh += g @ w in fp32
        if trainable:
            after_rows = max(after_rows, M * chunk * 4 + M * H * 4)  # dW = g.T @ h in fp32
    rows_bwd = _row_blocks(M, chunk, 2, 1 + softcap, 0, device)
    bwd = gathered + M * H * 4 + logits + w_cast + max(rows_bwd, after_rows)
    bwd += rows * T * H * hi + (M * H * hi if hi != 4 else 0)  # d_hidden, and dh cast into it
    return fwd, bwd, chunk


class _Live(TorchDispatchMode):
    """The bytes of the storages that ops on the meta device create and that are still alive
    (each freed when the last tensor on it goes: `weakref.finalize`), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in self.seen:
                    self.seen.add(st._cdata)
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, st._cdata, st.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def eager_head_transients(weight: torch.Tensor, rows: int, T: int, hidden: torch.dtype,
                          autocast: torch.dtype | None, impl: str, impl_reference: bool, trainable: bool,
                          device: str) -> tuple[int, int, int]:
    """(forward, backward, forward without autograd) temporaries of a head that builds the (2B, T, V)
    logits: the eager reference (`logps_impl reference`) or the model's own lm_head and `get_logps`
    on its logits (a head the hidden path cannot take). Its ops are run on the meta device with
    every storage they create counted while it lives (`_Live`): the forward's peak beyond what it
    keeps for backward, the backward's beyond where it starts (the head weight's gradient is counted
    with the gradients), and the forward's whole peak (no_grad: what it keeps is freed too); plus,
    on the CPU, the row kernels' blocks of the logits path."""
    from .. import get_logps, get_logps_from_hidden
    from .token_metrics import STATS

    V, H = weight.shape
    h = torch.empty(rows, T, H, dtype=hidden, device="meta", requires_grad=True)
    w = torch.empty(V, H, dtype=weight.dtype, device="meta", requires_grad=trainable)
    ids = torch.zeros(rows, T, dtype=torch.long, device="meta")
    mask = torch.ones(rows, T, dtype=torch.bool, device="meta")
    kw = dict(return_counts=True, validate=False, reduction="sum", stats=STATS)
    live = _Live()
    with _MetaOps(), _AsOnDevice(autocast, 16 if device == "cuda" else 1), live:
        if impl_reference:
            out = get_logps_from_hidden(h, w, ids, mask, impl="reference", **kw)
        else:
            out = get_logps(torch.nn.functional.linear(h, w), ids, mask, impl=impl, **kw)
        fwd, kept = live.peak, live.live
        live.peak = start = live.live
        out.logps.sum().backward()
        bwd = live.peak - start - (V * H * weight.element_size() if trainable else 0)
    blocks = 0 if impl_reference else _row_blocks(rows * T, V, 5, 3, 1, device)
    bwd_blocks = 0 if impl_reference else _row_blocks(rows * T, V, 2, 1, 0, device)
    return fwd - kept + blocks, bwd + bwd_blocks, fwd + blocks


def _optimizer_step_bytes(name: str, trainable, device: str, world_size: int = 1) -> int:
    """The optimizer step's own temporaries on the device, as each implementation allocates them.
    On CUDA torch's AdamW and Adafactor run foreach: one list as large as the parameters
    (sqrt(exp_avg_sq); the second-moment estimates; under FSDP2 as large as the rank's shards); on
    the CPU they run a tensor at a time: AdamW two temporaries of the largest parameter (sqrt(v),
    its quotient), Adafactor one (the factored estimate). The fused kernels, and bitsandbytes' on
    CUDA, update in place; bitsandbytes' CPU update dequantises both moments and the gradient to
    fp32 and takes sqrt(v) and a quotient. adamw_anyprecision and adamw_cpu_offload go a parameter
    at a time: the fp32 weight and gradient and two temporaries (the host's, on CUDA, are not
    device memory)."""
    if not trainable:
        return 0
    sizes = [math.prod(s) * d.itemsize for s, d in trainable]
    numel = max(math.prod(s) for s, _ in trainable)
    cuda = device == "cuda"
    if name == "adamw_torch":
        return sum(sizes) // world_size if cuda else 2 * max(sizes)
    if name == "adafactor":
        return sum(sizes) // world_size if cuda else max(sizes)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        return 0 if cuda else 5 * 4 * numel
    if name == "adamw_anyprecision":
        return 4 * 4 * numel
    if name == "adamw_cpu_offload":
        return 0 if cuda else 2 * 4 * numel
    return 0


@dataclasses.dataclass
class Estimate:
    """Predicted bytes per rank of one training step."""

    parts: dict[str, int]  # the table's rows
    phases: dict[str, int]  # the step's phases
    layers: list[int]  # saved activations per decoder layer as the run holds them on the device
    saved: list[int]  # per decoder layer without checkpointing
    checkpointed: list[int]  # per decoder layer with checkpointing (its inputs)
    offloaded: list[int]  # per decoder layer left on the device by activation offloading
    host: int  # bytes in host memory (offloaded activations, optimizer state kept there)
    notes: list[str]
    device: str
    parameters: int  # the policy's, adapters included

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


@dataclasses.dataclass
class _Forward:
    """The meta-device part of an estimate: the model and what its forward saves."""

    m: Model
    p: Probe
    fused: bool  # the hidden path (else the logits)
    fallback: str | None  # why not, in the head's words
    weight: torch.Tensor  # the lm_head's weight (meta)
    softcap: bool
    autocast: torch.dtype | None


def _forward(config, cfg: DPOConfig, shape: Shape, device: str) -> _Forward:
    import warnings

    from . import lora
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
    low = LOW_PRECISION.get(cfg.precision)
    if cfg.parallel == "fsdp2" and low is not None:
        model.to(low)  # FSDP2 gathers the parameters in the compute dtype
    autocast = low if low is not None and next(model.parameters()).dtype == torch.float32 else None
    model.train()
    p = probe(model, head, _meta_batch(shape, cfg.padding_free), autocast, device)
    return _Forward(m, p, head.fused and cfg.logps_impl != "reference", head.fallback, head.head.weight,
                    head.softcap is not None, autocast)


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The DPOConfig fields the meta forward depends on (the rest is arithmetic on its result).
_FORWARD_FIELDS = ("dtype", "precision", "lora_r", "lora_alpha", "lora_target_modules", "load_in_4bit",
                   "padding_free", "logps_impl", "use_weighting")


def estimate(config, cfg: DPOConfig, shape: Shape, *, world_size: int = 1, device: str = "cuda",
             cache: dict | None = None) -> Estimate:
    """Predicted bytes per rank of one training step of run `cfg` (batch `shape` per rank) on the
    model `config` describes, on a `device` ("cuda" or "cpu": which kernels the step runs).
    `cache` (a dict kept by the caller) reuses the meta forward of configurations that differ only
    in what it does not depend on (checkpointing, offloading, the optimizer, the reference)."""
    from . import optim

    key = (tuple(str(getattr(cfg, k)) for k in _FORWARD_FIELDS), cfg.parallel == "fsdp2", shape, device)
    f = cache.get(key) if cache is not None else None
    if f is None:
        f = _forward(config, cfg, shape, device)
        if cache is not None:
            cache[key] = f
    m, p, fused, W, autocast = f.m, f.p, f.fused, f.weight, f.autocast
    sharded = cfg.parallel == "fsdp2" and world_size > 1
    rows, T, M = shape.rows, shape.seq_len, shape.m
    if cfg.padding_free:
        rows, T = 1, shape.rows * shape.seq_len
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
                                        m.head_trainable, f.softcap)
        ref_hf = head_transients(V, H, M, rows, T, p.hidden_dtype, compute, W.dtype, device, False,
                                 False)[0]
        after = p.after + 8 * M  # and the scored rows' indices (the meta op does not return them)
        notes.append(f"log-prob head: hidden path, {M} scored rows x {chunk} of V={V} columns per chunk")
    else:
        # the logits and what the eager head saves are counted with the saved activations; its
        # temporaries are simulated on the meta device (`eager_head_transients`)
        hf, hb, ref_hf = eager_head_transients(W, rows, T, p.hidden_dtype, f.autocast, cfg.logps_impl,
                                               impl_reference=f.fallback is None,
                                               trainable=m.head_trainable, device=device)
        after = p.after
        notes.append(f"log-prob head: eager logits ({rows} x {T} x V={V}): "
                     f"{f.fallback or 'logps_impl reference'}")

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
        layers_dev, acts, in_flight = list(p.small_layers), p.small + layer_max, layer_max
        notes.append("activation offloading: saved tensors of 1 MiB and more in host memory")
    else:
        layers_dev, acts, in_flight = kept, p.before + sum(kept) + after, 0
    if cfg.gradient_checkpointing:
        notes.append("gradient checkpointing: each layer's inputs kept, one layer recomputed at a time")
    # one layer's backward: the gradient coming down the residual stream and two of the layer's
    # largest intermediates' gradients at once (measured on the CPU: 1.5-2x)
    layer_bwd = p.hidden + 2 * largest
    dequant = m.largest_quantized * 2  # a 4-bit weight dequantised to bf16 in a layer's pass

    # with gradient accumulation the gradients of the earlier micro-batches are held throughout the
    # later ones (each new gradient added into them)
    carried = grads if cfg.gradient_accumulation_steps > 1 else 0
    phases = {}
    if cfg.reference != "none":
        # no_grad: one layer's working tensors (about three of its largest and the residual) or the
        # head's pass over the final hidden states, whichever is larger
        ref_pass = max(3 * largest + 2 * p.hidden + dequant, p.hidden + ref_hf)
        if cfg.reference == "precomputed":  # before training: the copy, freed once it is done
            copy = params if cfg.lora_r is None else 0
            phases["reference (precomputed before training)"] = params + copy + ref_pass
        else:
            phases["reference forward"] = state + carried + ref_pass
    phases["policy forward"] = state + carried + acts + hf
    phases["head backward"] = state + carried + acts + hb + head_grad
    top = acts if cfg.activation_offloading and device == "cuda" else acts - after
    phases["backward, last layer"] = state + max(carried, head_grad) + top + recompute + layer_bwd \
        + dequant
    phases["backward, first layer"] = state + p.before + in_flight + grads + recompute + layer_bwd \
        + dequant
    step = _optimizer_step_bytes(cfg.optim, m.trainable, device, world_size if sharded else 1)
    phases["optimizer step"] = state + grads + step
    gathered = 0
    if sharded:
        tied = getattr(_text_config(config), "tie_word_embeddings", False)
        root = V * H * W.element_size() * (1 if tied else 2)
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
    return Estimate(parts, phases, layers_dev, list(p.layers), list(p.inputs), list(p.small_layers), host,
                    notes, device, m.count)


def shape_of(pairs: list[tuple[list[int], list[int], list[int]]], batch_size: int) -> Shape:
    """The largest micro-batch tokenised pairs make: T the longest prompt + response, M the scored
    positions of the batch_size longest chosen and rejected responses (each batch is padded to its
    own longest pair, so no batch is larger)."""
    if not pairs:
        raise ValueError("no tokenised pairs to size a batch from")
    T = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    top = lambda k: sum(sorted((len(x[k]) for x in pairs), reverse=True)[:batch_size])  # noqa: E731
    return Shape(batch_size, T, top(1) + top(2))


# -- what makes it fit ----------------------------------------------------------------------------

def _changes(cfg: DPOConfig) -> list[tuple[str, dict]]:
    """Single changes to `cfg` that lower its memory, cheapest first: the first cost nothing but
    a kernel or a pass, then compute (recomputation, host copies, smaller micro-batches), then
    numerics (8-bit moments, bf16), then the method itself (LoRA, a 4-bit base)."""
    out = []
    if cfg.optim == "adamw_torch":
        out.append(("--optim adamw_torch_fused", {"optim": "adamw_torch_fused"}))
    if cfg.reference == "model" and cfg.lora_r is None:
        out.append(("--reference precomputed", {"reference": "precomputed"}))
    if not cfg.gradient_checkpointing:
        out.append(("--gradient-checkpointing true", {"gradient_checkpointing": True}))
    if not cfg.activation_offloading:
        out.append(("--activation-offloading true", {"activation_offloading": True}))
    b, a = cfg.batch_size, cfg.gradient_accumulation_steps
    while b > 1:
        b //= 2
        a2 = a * cfg.batch_size // b
        out.append((f"--batch-size {b} --gradient-accumulation-steps {a2}",
                    {"batch_size": b, "gradient_accumulation_steps": a2}))
    if cfg.optim in ("adamw_torch", "adamw_torch_fused", "adamw_anyprecision"):
        out.append(("--optim adamw_8bit", {"optim": "adamw_8bit"}))
    if cfg.precision == "fp32":
        out.append(("--precision bf16", {"precision": "bf16"}))
    if cfg.dtype == "float32":  # bf16 weights: a frozen base as it is; trained ones Kahan-summed
        out.append(("--dtype bfloat16", {"dtype": "bfloat16"}) if cfg.lora_r is not None else
                   ("--dtype bfloat16 --optim adamw_anyprecision",
                    {"dtype": "bfloat16", "optim": "adamw_anyprecision"}))
        if cfg.lora_r is None and cfg.optim != "adamw_8bit":
            # bf16 weights with 8-bit moments: ~6 bytes a parameter, full fine-tuning kept
            out.append(("--dtype bfloat16 --optim adamw_8bit", {"dtype": "bfloat16", "optim": "adamw_8bit"}))
    if cfg.lora_r is None:
        out.append(("--lora-r 16", {"lora_r": 16}))
    if not cfg.load_in_4bit and cfg.parallel != "fsdp2":
        lora_r = {} if cfg.lora_r is not None else {"lora_r": 16}
        out.append((("--lora-r 16 " if lora_r else "") + "--load-in-4bit true",
                    {"load_in_4bit": True, **lora_r}))
    return out


def _with(cfg: DPOConfig, changes: dict) -> DPOConfig | None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dataclasses.replace(cfg, **changes)
    except ValueError:  # a combination the trainer refuses (e.g. fsdp2 with adamw_8bit)
        return None


def suggestions(config, cfg: DPOConfig, shape_for, budget: int, world_size: int, device: str,
                limit: int = 5) -> list[dict]:
    """The cheapest changes that bring the run within `budget`: single changes in `_changes`' order,
    then pairs of them, then triples, as soon as any fits; at most `limit`, each with its predicted
    peak. `shape_for(cfg)` is the micro-batch of a configuration. When all of the changes at once
    do not fit, none is searched for."""
    singles = _changes(cfg)
    cache: dict = {}

    def needed(changes: dict) -> tuple[int, int] | None:
        new = _with(cfg, changes)
        if new is None:
            return None
        e = estimate(config, new, shape_for(new), world_size=world_size, device=device, cache=cache)
        return e.peak, e.needed

    most: dict = {}
    for _, ch in reversed(singles):  # the strongest first, then every other change that combines
        if not set(ch) & set(most) and _with(cfg, {**most, **ch}) is not None:
            most.update(ch)
    lowest = needed(most)
    if lowest is None or lowest[1] > budget:
        return []
    found: list[dict] = []
    for size in (1, 2, 3):
        for combo in itertools.combinations(singles, size):
            merged = {k: v for c in combo for k, v in c[1].items()}
            if len(merged) < sum(len(c[1]) for c in combo):
                continue  # two changes of the same field
            got = needed(merged)
            if got is not None and got[1] <= budget:
                found.append({"change": " ".join(c[0] for c in combo), "set": merged,
                              "peak_bytes": got[0], "needed_bytes": got[1]})
                if len(found) >= limit:
                    return found
        if found:
            return found
    return found


# -- the command ----------------------------------------------------------------------------------

# The DPOConfig fields `fused-dpo plan` takes, as `fused-dpo train` spells them.
FIELDS = ("dtype", "precision", "lora_r", "lora_target_modules", "load_in_4bit", "optim",
          "gradient_checkpointing", "activation_offloading", "padding_free", "reference", "loss_type",
          "batch_size", "gradient_accumulation_steps", "max_length", "truncation_side", "parallel",
          "logps_impl", "use_weighting")


def build_parser():
    from .._argparse import ArgumentParser
    from .flags import add_config_flags

    ap = ArgumentParser(prog="fused-dpo plan", description="Will a DPO run fit in GPU memory? The "
                        "predicted peak per rank of one training step, from the model's config on the "
                        "meta device (no weights), against the budget; if it does not fit, the "
                        "cheapest changes that make it fit.")
    ap.add_argument("--model", default=None,
                    help=f"a named shape ({', '.join(SHAPES)}), a checkpoint directory or a hub id "
                         f"from the local HF cache (default tiny)")
    ap.add_argument("--revision", default=None, help="the hub revision of --model")
    ap.add_argument("--config", help="JSON, TOML or YAML file of DPOConfig fields or TRL's keys, as "
                                     "`fused-dpo train` takes (its model unless --model is given)")
    ap.add_argument("--data", default=None,
                    help="size the batch from this data's longest pair (as --data of fused-dpo train; "
                         "needs the model's tokenizer) instead of --max-length")
    ap.add_argument("--world-size", type=int, default=1, help="ranks of --parallel ddp|fsdp2 (default 1)")
    ap.add_argument("--global-batch-size", type=int, default=None,
                    help="pairs per optimizer step over all ranks: sets the per-rank --batch-size "
                         "(global / world size / accumulation steps)")
    ap.add_argument("--gpu-memory-gib", type=float, default=None,
                    help="the budget per GPU in GiB (default: the CUDA device's total memory)")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON record")
    add_config_flags(ap, FIELDS)
    return ap


def _budget(gib: float | None) -> int:
    if gib is None:
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device here: give the budget with --gpu-memory-gib GIB")
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not (gib > 0 and math.isfinite(gib)):
        raise ValueError(f"--gpu-memory-gib must be a number > 0, got {gib!r}")
    return int(gib * GiB)


def _config_of(args) -> DPOConfig:
    from .config import read_config_file
    from .trl_config import split

    d, sources = split(read_config_file(args.config), args.config) if args.config else ({}, {})
    # the file's model (TRL's model_name_or_path) unless --model names one
    if args.model is None:
        args.model = sources.get("model", "tiny")
    if args.revision is None:
        args.revision = sources.get("revision")
    d.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None})
    if args.world_size < 1:
        raise ValueError(f"--world-size must be an integer >= 1, got {args.world_size}")
    if args.world_size > 1 and d.get("parallel", "none") == "none":
        raise ValueError(f"--world-size {args.world_size} needs --parallel ddp or fsdp2 (without it the "
                         f"run is one process)")
    if args.global_batch_size is not None:
        accum = d.get("gradient_accumulation_steps", 1)
        per = args.world_size * accum
        if args.global_batch_size < 1 or args.global_batch_size % per:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of the world "
                             f"size x accumulation steps ({args.world_size} x {accum} = {per}): each "
                             f"rank's micro-batch must be a whole number of pairs")
        d["batch_size"] = args.global_batch_size // per
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trainer warns at start; a plan only predicts
        return DPOConfig.from_dict(d)


def _data_shapes(args, config):
    """shape_for(cfg) from --data: tokenised with the model's tokenizer (tiny: trained on the data,
    as the trainer does), the largest batch of each configuration's batch size and max_length."""
    from .data import row_texts, tokenize
    from .models import train_tokenizer
    from .sources import read_rows

    rows = read_rows(args.data)
    if args.model == "tiny":
        tok = train_tokenizer(row_texts(rows))
    elif args.model in SHAPES:
        raise ValueError(f"--data needs the model's tokenizer: --model {args.model} is a named shape "
                         f"without one; give --max-length instead, or a checkpoint directory")
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model, revision=args.revision, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    cache = {}

    def shape_for(cfg):
        key = (cfg.max_length, cfg.truncation_side)
        if key not in cache:
            cache[key] = tokenize(rows, tok, cfg.max_length, cfg.truncation_side).pairs
        return shape_of(cache[key], cfg.batch_size)
    return shape_for


def _fmt(n: int) -> str:
    if n == 0:
        return "0"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _runs(values: list[int]) -> list[tuple[int, int, int]]:
    """(first, last, value) of each run of equal consecutive values."""
    out = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], i, v)
        else:
            out.append((i, i, v))
    return out


def record(model: str, config, cfg: DPOConfig, shape: Shape, e: Estimate, budget: int | None,
           world_size: int, found: list[dict] | None) -> dict:
    """The plan as a JSON-ready dict (what --json prints)."""
    rec = {
        "model": model, "model_type": getattr(config, "model_type", None), "parameters": e.parameters,
        "device": e.device, "world_size": world_size,
        "config": {k: getattr(cfg, k) for k in FIELDS},
        "batch": {"pairs": shape.pairs, "sequences": shape.rows, "seq_len": shape.seq_len,
                  "scored": shape.m},
        "parts_bytes": e.parts, "phases_bytes": e.phases,
        "saved_activations_per_layer_bytes": {"as_run": e.layers, "without_checkpointing": e.saved,
                                              "with_checkpointing": e.checkpointed,
                                              "with_offloading": e.offloaded},
        "host_bytes": e.host, "peak_bytes": e.peak, "peak_phase": e.peak_phase,
        "slack_bytes": e.slack, "needed_bytes": e.needed, "notes": e.notes,
    }
    if budget is not None:
        rec.update(budget_bytes=budget, fits=e.needed <= budget)
    if found is not None:
        rec["changes"] = found
    return rec


def format_plan(rec: dict) -> str:
    """The plan as the table `fused-dpo plan` prints."""
    c, b = rec["config"], rec["batch"]
    method = f"LoRA r={c['lora_r']}" if c["lora_r"] is not None else "full fine-tuning"
    if c["load_in_4bit"]:
        method = "QLoRA (NF4 base), " + method
    ranks = f", {c['parallel']} on {rec['world_size']} ranks" if c["parallel"] != "none" else ""
    lines = [f"fused-dpo plan: {rec['model']} ({rec['model_type']}, {rec['parameters'] / 1e9:.2f}B "
             f"parameters), per rank on a {'CUDA GPU' if rec['device'] == 'cuda' else 'CPU'}{ranks}",
             f"  {method}; dtype {c['dtype']}, precision {c['precision']}, optim {c['optim']}, "
             f"reference {c['reference']}; micro-batch {b['pairs']} pairs = [{b['sequences']}, "
             f"{b['seq_len']}] tokens ({b['scored']} scored)"
             + (", gradient checkpointing" if c["gradient_checkpointing"] else "")
             + (", activation offloading" if c["activation_offloading"] else "")
             + (", padding-free" if c["padding_free"] else ""), ""]
    for name, v in rec["parts_bytes"].items():
        lines.append(f"  {name:<30}{_fmt(v):>12}")
    if rec["host_bytes"] >= MiB:
        lines.append(f"  {'in host memory (not counted)':<30}{_fmt(rec['host_bytes']):>12}")
    lines.append("")
    per = rec["saved_activations_per_layer_bytes"]
    lines.append(f"  saved activations per decoder layer ({len(per['without_checkpointing'])} layers):")
    rows = list(zip(per["without_checkpointing"], per["with_checkpointing"], per["with_offloading"],
                    strict=True))
    for i, j, (v, k, o) in _runs(rows):
        where = f"layer {i}" if i == j else f"layers {i}-{j}"
        lines.append(f"    {where:<14}{_fmt(v):>12}{' each' if j > i else ''}; checkpointed {_fmt(k)} "
                     f"(+ one layer recomputed at a time); offloaded {_fmt(o)} on the device")
    lines.append("")
    for name, v in rec["phases_bytes"].items():
        mark = "  <- peak" if name == rec["peak_phase"] else ""
        lines.append(f"  {name:<30}{_fmt(v):>12}{mark}")
    lines.append(f"  {'allocator slack':<30}{_fmt(rec['slack_bytes']):>12}   (10% of the peak"
                 + (" + 0.5 GiB CUDA context)" if rec["device"] == "cuda" else ")"))
    verdict = ""
    if "budget_bytes" in rec:
        verdict = (f" of {_fmt(rec['budget_bytes'])}: " + ("fits" if rec["fits"] else "does NOT fit"))
    lines.append(f"  {'needed':<30}{_fmt(rec['needed_bytes']):>12}{verdict}")
    for note in rec["notes"]:
        lines.append(f"  note: {note}")
    if rec.get("changes") is not None and not rec.get("fits", True):
        if rec["changes"]:
            lines.append("changes that make it fit, cheapest first (predicted peak, and needed with slack):")
            for ch in rec["changes"]:
                lines.append(f"  + {ch['change']}: {_fmt(ch['peak_bytes'])} ({_fmt(ch['needed_bytes'])})")
        else:
            lines.append("no change tried makes it fit (checkpointing, offloading, smaller micro-batches, "
                         "8-bit AdamW, bf16, LoRA, a 4-bit base, up to three at once): more ranks "
                         "(--parallel fsdp2) or a larger GPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from .flags import join_negative_values

        args = build_parser().parse_args(join_negative_values(argv))
        budget = _budget(args.gpu_memory_gib)
        cfg = _config_of(args)
        config = model_config(args.model, args.revision)
        shape_for = _data_shapes(args, config) if args.data else (
            lambda c: Shape(c.batch_size, c.max_length))
        shape = shape_for(cfg)
        e = estimate(config, cfg, shape, world_size=args.world_size)
        found = None if e.needed <= budget else suggestions(config, cfg, shape_for, budget,
                                                             args.world_size, "cuda")
        rec = record(args.model, config, cfg, shape, e, budget, args.world_size, found)
    except (ValueError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(json.dumps(rec) if args.json else format_plan(rec))
    return 0


# -- the trainer's prediction ---------------------------------------------------------------------

def for_trainer(trainer) -> dict:
    """The plan of a trainer about to start: its predicted peak per rank for the largest batch its
    training data makes (`shape_of`), on its own device, as run.json's "memory_plan" records it."""
    from . import lora

    cfg = trainer.config
    config = lora.unwrap(trainer.model).config
    shape = shape_of(trainer.train_data.pairs, cfg.batch_size)
    e = estimate(config, cfg, shape, world_size=trainer.dist.world, device=trainer.device.type)
    return {"predicted_peak_MiB": round(e.peak / MiB, 1), "phase": e.peak_phase,
            "needed_MiB": round(e.needed / MiB, 1), "device": trainer.device.type,
            "batch": [shape.rows, shape.seq_len]}


def announce(trainer, say=print) -> dict:
    """{"memory_plan": `for_trainer`} for run.json, with its line said (`say`); {} and a line saying
    why when there is no prediction. Never raises: a prediction must not stop a training run."""
    try:
        rec = for_trainer(trainer)
    except Exception as e:  # any failure of the estimate: the run goes on without one
        say(f"memory plan: no prediction ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        return {}
    where = "per rank" if trainer.dist.world > 1 else "on this device"
    line = (f"memory plan: predicted peak {rec['predicted_peak_MiB']:.1f} MiB {where} ({rec['phase']}; "
            f"batch [{rec['batch'][0]}, {rec['batch'][1]}])")
    if trainer.device.type == "cuda":
        total = torch.cuda.get_device_properties(trainer.device).total_memory
        line += f"; {rec['needed_MiB']:.0f} MiB with allocator slack, of {total / MiB:.0f} MiB"
        if rec["needed_MiB"] * MiB > total:
            line += ": it may not fit (fused-dpo plan lists changes that do)"
    say(line)
    return {"memory_plan": rec}
