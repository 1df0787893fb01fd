"""--activation-offloading (issue 22): the tensors autograd saves go to host memory and come back
for the backward. On the CPU the path runs with real copies (copy=True, every size): losses and
gradients bit-identical to a run without, alone and with gradient checkpointing (only the layers'
inputs are then offloaded), LoRA, bf16 autocast, padding-free batches, DDP and FSDP2 (one process);
parameters stay; a storage saved twice is copied once and its views come back from that copy; the
hooks go with the context. On CUDA (bench/gpu_check.sh): the same gradients, less peak memory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fused_dpo.train import lora, offload, plots
from fused_dpo.train.cli import main as train
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import synthetic_sorting
from fused_dpo.train.models import tiny_llama
from fused_dpo.train.offload import ActivationOffload

pytestmark = pytest.mark.usefixtures("one_thread")

VOLATILE = {"tokens_per_s", "peak_mem_MiB"}
V = 96


def forced(**kw):
    """Offloading on the CPU with real copies of every storage, a small stash (so storages come
    back from their copies) and prefetch."""
    return ActivationOffload("cpu", **{"min_bytes": 1, "in_flight": 2, "copy": True, **kw})


def tensors_in(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from tensors_in(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors_in(v)


def test_for_config_and_bad_arguments():
    assert not isinstance(offload.for_config(DPOConfig(), torch.device("cpu")), ActivationOffload)
    on = offload.for_config(DPOConfig(activation_offloading=True), torch.device("cpu"))
    assert isinstance(on, ActivationOffload) and not on.copy and on.min_bytes == offload.MIN_BYTES
    with pytest.raises(ValueError, match="runs on CUDA or the CPU, not meta"):
        ActivationOffload("meta")
    with pytest.raises(ValueError, match="in_flight >= 1.*got 0, 0, 2"):
        ActivationOffload("cpu", min_bytes=0, in_flight=0)


class SavesViews(torch.autograd.Function):
    """(a * b).sum(), saving a, two views of a's storage and b; its backward checks what came
    back: values, and that a's three views share one storage that is not a's (a copy)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, a[1:], a.t(), b)
        ctx.a_ptr = a.untyped_storage().data_ptr()
        ctx.want = (a.detach().clone(), b.detach().clone())
        return (a * b).sum()

    @staticmethod
    def backward(ctx, g):
        a, tail, at, b = ctx.saved_tensors
        ctx.seen = (a.untyped_storage().data_ptr(), tail.untyped_storage().data_ptr(),
                    at.untyped_storage().data_ptr())
        assert torch.equal(a, ctx.want[0]) and torch.equal(b, ctx.want[1])
        assert torch.equal(tail, ctx.want[0][1:]) and torch.equal(at, ctx.want[0].t())
        assert at.stride() == (1, 3) and tail.storage_offset() == 3
        return g * b, g * a


def test_one_storage_saved_three_times_is_one_copy_and_comes_back_as_its_views():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    off = forced(in_flight=1)  # b's storage pushes a's out of the stash: a comes back from its copy
    with off:
        a = x.exp()  # exp saves its output: a's storage, taken here
        b = x * 2
        out = SavesViews.apply(a, b)
        node = out.grad_fn
        out.backward()
    xd = x.detach()
    assert torch.equal(x.grad, 2 * xd * xd.exp() + 2 * xd.exp())
    ptrs = node.seen
    assert ptrs[0] == ptrs[1] == ptrs[2] != node.a_ptr
    # a's storage copied once for its four saves (exp's, and a and its two views), b's once
    assert off.stats["offloaded"] == 2 and off.stats["deduped"] == 3
    assert off.stats["unpacked"] == off.stats["packed"] - off.stats["kept"] == 5


def build(kind: str):
    model = tiny_llama(V, seed=0)
    if "checkpointing" in kind:
        model.activation_checkpointing_enable()
    if "lora" in kind:
        model = lora.apply_lora(model, 4, 8.0, None, seed=0)
    return model.train()


def forward_backward(model, ctx, kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 13), generator=g)
    w = torch.randn(2, 13, V, generator=g)
    precision = torch.bfloat16 if "bf16" in kind else torch.float32
    with ctx, torch.autocast("cpu", dtype=precision, enabled="bf16" in kind):
        loss = (model(input_ids=ids).logits.float() * w).sum()
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["plain", "checkpointing", "lora", "lora-checkpointing", "bf16",
                                  "by-reference"])
def test_tiny_llama_is_bit_identical_and_keeps_parameters(kind, monkeypatch):
    want_loss, want = forward_backward(build(kind), torch.enable_grad(), kind)

    model = build(kind)
    layer_inputs: list = []  # the storages of the inputs of the decoder layer running, if any

    def enter(module, args, kwargs):
        layer_inputs.append([t.untyped_storage() for t in tensors_in((args, kwargs))])

    def leave(module, args, output):
        layer_inputs.pop()

    for layer in lora.unwrap(model).model.layers:
        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(leave)

    taken, inside = [], []  # the storages taken over; per save inside a layer: one of its inputs?
    take, pack = ActivationOffload._take, ActivationOffload._pack

    def record_take(self, st):
        taken.append(st)
        return take(self, st)

    def record_pack(self, t):
        if layer_inputs:
            inside.append(any(t.untyped_storage() is s for s in layer_inputs[-1]))
        return pack(self, t)

    monkeypatch.setattr(ActivationOffload, "_take", record_take)
    monkeypatch.setattr(ActivationOffload, "_pack", record_pack)
    # by-reference: what the CPU does by default (no copies), at every size
    off = forced(copy="by-reference" not in kind)
    loss, got = forward_backward(model, off, kind)

    assert torch.equal(loss, want_loss)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    s = off.stats
    assert s["offloaded"] > 0 and s["deduped"] > 0 and s["prefetched"] > 0 and s["kept"] > 0
    assert s["unpacked"] == s["packed"] - s["kept"]  # every offloaded save came back once
    params = [p.untyped_storage() for p in model.parameters()]
    assert not [st for st in taken if any(st is p for p in params)]  # weights stay where they are
    # Under checkpointing the layers' own saves go to the checkpoint; what reaches the hooks from
    # inside a layer is its inputs (the boundaries), saved for the recomputation.
    assert inside and all(inside) == ("checkpointing" in kind)


def test_hooks_are_gone_after_the_context():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    module_hooks = torch.nn.modules.module._global_forward_pre_hooks
    n_hooks = len(module_hooks)
    model = build("plain")
    off = forced()
    forward_backward(model, off, "plain")
    after_one = dict(off.stats)
    assert after_one["packed"] > 0
    if top is not None:
        assert top(False) is None
    assert len(module_hooks) == n_hooks
    forward_backward(model, torch.enable_grad(), "plain")  # outside: nothing goes through it
    assert off.stats == after_one
    with off:  # reusable, not re-entrant
        if top is not None:
            assert top(False) is not None
        with pytest.raises(RuntimeError, match="not re-entrant"):
            off.__enter__()
    forward_backward(model, off, "plain")
    assert off.stats["packed"] == 2 * after_one["packed"]
    if top is not None:
        assert top(False) is None


# -- the trainer through the CLI ---------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_sorting(40, seed=0)))
    return path


@pytest.fixture
def own_process_group():
    """DDP/FSDP2 started as one process make a group of one in this process: gone afterwards."""
    had = torch.distributed.is_initialized()
    yield
    if not had and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(data, out, flags, offloading: bool):
    assert train(["--data", str(data), "--eval-fraction", "0.2", "--max-steps", "3", "--batch-size", "2",
                  "--gradient-accumulation-steps", "2", "--eval-steps", "3", "--save-steps", "3",
                  "--no-progress", "--output-dir", str(out), "--activation-offloading",
                  str(offloading).lower(), *flags]) == 0
    rows = [{k: v for k, v in json.loads(ln).items() if k not in VOLATILE}
            for ln in (out / "metrics.jsonl").read_text().splitlines()]
    weights = {}
    for f in sorted((out / "model").glob("*.safetensors")):
        weights.update(load_file(f))
    return rows, weights


@pytest.mark.parametrize("flags", [
    [],
    ["--gradient-checkpointing", "true", "--lora-r", "4", "--padding-free", "true"],
    ["--parallel", "ddp"],
    ["--parallel", "fsdp2", "--gradient-checkpointing", "true"],
], ids=["plain", "checkpointing-lora-padding-free", "ddp", "fsdp2-checkpointing"])
def test_training_run_is_the_run_without_offloading(data, tmp_path, monkeypatch, own_process_group,
                                                     flags):
    monkeypatch.setattr(plots, "plot_run", lambda *a, **k: None)  # curves.png: 4 s of a 5 s run
    want_rows, want_weights = run(data, tmp_path / "without", flags, False)
    made = []
    real = offload.for_config

    def spy(cfg, device):
        made.append(real(cfg, device, min_bytes=1, in_flight=2, copy=True))
        return made[-1]

    monkeypatch.setattr(offload, "for_config", spy)
    rows, weights = run(data, tmp_path / "with", flags, True)
    assert rows == want_rows  # every loss and metric of every step, and the held-out ones
    assert weights.keys() == want_weights.keys() and weights
    for k in want_weights:
        assert torch.equal(weights[k], want_weights[k]), k
    (off,) = made
    assert isinstance(off, ActivationOffload)
    # (the loss's metrics build graph nodes the backward never runs: their saves stay packed)
    assert off.stats["offloaded"] > 0 and 0 < off.stats["unpacked"] <= off.stats["packed"] - off.stats["kept"]


# -- CUDA (bench/gpu_check.sh) -----------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_offloading_same_gradients_less_peak_memory():
    """The defaults on a GPU (1 MiB threshold, pinned memory, side stream): gradients as without,
    to the run-to-run noise of the GPU's kernels (none if they are deterministic), and a lower
    peak: 8 layers' activations (about 1.3 GB) are mostly on the host after the forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="eager", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (4, 1024), generator=g).cuda()
    w = torch.randn(4, 1024, 1024, generator=g).cuda()

    def step(ctx):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with ctx:
            (model(input_ids=ids).logits * w).sum().backward()
        torch.cuda.synchronize()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, \
            torch.cuda.max_memory_allocated() - base

    first, peak_plain = step(torch.enable_grad())
    second, _ = step(torch.enable_grad())
    off = ActivationOffload(torch.device("cuda"))
    got, peak_off = step(off)
    assert off.stats["offloaded_bytes"] > 500 * 2**20 and off.stats["kept"] > 0
    for k in first:
        noise = (second[k] - first[k]).abs().max()
        assert (got[k] - first[k]).abs().max() <= noise, k
    assert peak_off < 0.6 * peak_plain, (peak_off / 2**20, peak_plain / 2**20)
