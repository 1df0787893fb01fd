"""--dtype and QLoRA's --load-in-4bit (issue 22): every dtype x LoRA x 4-bit combination trains
through the fused hidden path (no fallback to logits) with fp32 adapters; the NF4 base keeps its
lm_head a plain Linear, scores as its own logits do, trains (gradients reach every adapter),
fingerprints the same on every load, and resumes exactly; what cannot work is refused in one line.
bitsandbytes' CPU backend runs NF4 here; tiny models, max_length 32, batch 2."""

import importlib.util
import json
import math
import warnings

import pytest
import torch
from helpers import one_error_line

from fused_dpo import get_logps
from fused_dpo.train import hf, optim
from fused_dpo.train.checkpoint import weights_fingerprint
from fused_dpo.train.cli import main as cli_main
from fused_dpo.train.config import DPOConfig
from fused_dpo.train.data import row_texts, zen_pairs
from fused_dpo.train.hf import LogpsHead
from fused_dpo.train.lora import apply_lora, summary
from fused_dpo.train.models import load_model, tiny_llama, train_tokenizer
from fused_dpo.train.trainer import DPOTrainer

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = zen_pairs()
TEXTS = row_texts(ROWS)
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOLATILE = {"tokens_per_s", "peak_mem_MiB"}
QUIET = lambda s: None


def tiny(dtype="float32", load_in_4bit=False, seed=0):
    return load_model("tiny", TEXTS, seed, dtype=dtype, load_in_4bit=load_in_4bit, say=QUIET)


def is_4bit(m) -> bool:
    return type(m).__module__.startswith("bitsandbytes.")


def trainer(tmp_path, model, tok, **cfg):
    cfg = DPOConfig(**{"output_dir": str(tmp_path), "max_steps": 2, "batch_size": 2, "max_length": 32,
                       "learning_rate": 1e-2, "warmup_steps": 0, **cfg})
    return DPOTrainer(model, None, tok, ROWS, None, cfg)


# (dtype, LoRA, 4-bit): full fine-tuning in fp16 and a 4-bit base without adapters are refused.
MATRIX = [(d, lora, q) for d in DT for lora in (False, True) for q in (False, True)
          if (lora or not q) and not (d == "float16" and not lora)]


@pytest.mark.filterwarnings("ignore:bfloat16 weights with full fine-tuning")
@pytest.mark.parametrize("dtype,lora,q", MATRIX,
                         ids=[f"{d}-{'lora' if lo else 'full'}{'-nf4' if q else ''}" for d, lo, q in MATRIX])
def test_every_dtype_trains_through_the_hidden_path(tmp_path, monkeypatch, dtype, lora, q):
    model, tok = tiny(dtype, q)
    called = []
    monkeypatch.setattr(hf, "get_logps", lambda *a, **k: called.append(1))  # the logits fallback
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t = trainer(tmp_path, model, tok, dtype=dtype, load_in_4bit=q, **({"lora_r": 4} if lora else {}))
        m = t.train_step()
    assert not [w for w in seen if "full logits" in str(w.message)]
    assert called == [] and t.policy_logps.fused and t.ref_logps.fused
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference
    head = t.policy_logps.head
    assert type(head) is torch.nn.Linear and head.weight.dtype == DT[dtype]
    assert model.get_input_embeddings().weight.dtype == DT[dtype]
    linears = [mod for n, mod in model.named_modules() if n.endswith("mlp.up_proj")]
    assert linears and all(is_4bit(mod) == q for mod in linears)
    trained = [(n, p) for n, p in t.model.named_parameters() if p.requires_grad]
    # LoRA: fp32 adapters on any base; full fine-tuning trains the weights in their dtype.
    assert {p.dtype for _, p in trained} == {torch.float32 if lora else DT[dtype]}
    grads = [p.grad for n, p in trained if "lora_A" not in n]  # lora_A's gradient is 0 while B = 0
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    m = t.train_step()
    assert math.isfinite(m["loss"]) and m["loss"] != pytest.approx(math.log(2), abs=1e-7)


def test_nf4_base_keeps_the_head_and_scores_as_its_logits():
    model, tok = tiny(load_in_4bit=True)
    assert model.is_loaded_in_4bit and type(model.lm_head) is torch.nn.Linear
    head = LogpsHead(model, "torch")
    assert head.fused and head.fallback is None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(tok), (4, 32), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :9] = False
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask}
    with torch.no_grad():
        fused = head(batch).logps
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        truth = get_logps(logits.double(), ids, mask, impl="torch")
    assert torch.allclose(fused.double(), truth, rtol=0, atol=1e-4), (fused, truth)


def test_4bit_fingerprint_is_deterministic_and_covers_the_quantisation_state():
    a = apply_lora(tiny(load_in_4bit=True)[0], 4, 8.0, None, 0)
    keys = list(a.state_dict())
    assert any(k.endswith("weight.absmax") for k in keys)  # the block scales are fingerprinted
    assert any("quant_state.bitsandbytes__nf4" in k for k in keys)
    fp = weights_fingerprint(a, skip="lora_")
    b = apply_lora(tiny(load_in_4bit=True)[0], 4, 8.0, None, 0)
    assert weights_fingerprint(b, skip="lora_") == fp
    with torch.no_grad():  # an eval-mode forward without autograd leaves the base as it was
        b.eval()(input_ids=torch.arange(12)[None])
    assert weights_fingerprint(b, skip="lora_") == fp
    other = apply_lora(tiny(load_in_4bit=True, seed=1)[0], 4, 8.0, None, 0)
    assert weights_fingerprint(other, skip="lora_") != fp
    plain = apply_lora(tiny()[0], 4, 8.0, None, 0)
    assert weights_fingerprint(plain, skip="lora_") != fp
    # run.json counts the weights, not the bytes they are packed in (two NF4 weights a byte)
    assert summary(a)["parameters"] == summary(plain)["parameters"] == \
        sum(p.numel() for p in plain.parameters())


def stable(path):
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
            for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_qlora_cli_trains_and_resumes_exactly(tmp_path, capsys):
    flags = ["--model", "tiny", "--data", "zen", "--lora-r", "4", "--load-in-4bit", "true",
             "--max-length", "32", "--batch-size", "2", "--eval-steps", "2", "--save-steps", "2",
             "--learning-rate", "1e-2", "--warmup-steps", "0", "--no-progress",
             "--lr-scheduler", "constant"]  # the same schedule for a run of 2 steps and one of 4
    assert cli_main(flags + ["--max-steps", "4", "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert ("model: tiny (LlamaForCausalLM), built in float32, loaded as NF4 4-bit linear layers "
            "(bitsandbytes, double quantisation, bf16 compute), the other weights (embeddings, norms, "
            "lm_head) in float32 (--load-in-4bit; --dtype float32; --precision fp32: fp32 compute)") in out
    rows = [r for r in stable(tmp_path / "a") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["rewards/margins"] == 0
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["rewards/margins_abs"] > 0 for r in rows[1:])  # the adapters moved the policy
    assert cli_main(flags + ["--max-steps", "2", "--output-dir", str(tmp_path / "b")]) == 0
    assert cli_main(["--resume", "--max-steps", "4", "--no-progress",
                     "--output-dir", str(tmp_path / "b")]) == 0
    assert stable(tmp_path / "b") == stable(tmp_path / "a")
    a, b = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True) for x in "ab")
    assert a["model"] and all(".lora_" in k for k in a["model"])  # the adapters only
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    fp = json.loads((tmp_path / "a" / "run.json").read_text())["fingerprints"]
    assert fp["base"] == fp["reference"] == weights_fingerprint(
        apply_lora(tiny(load_in_4bit=True)[0], 4, 8.0, None, 0), skip="lora_")


def bf16_checkpoint(tmp_path) -> str:
    tok = train_tokenizer(TEXTS)
    model = tiny_llama(len(tok), seed=0, hidden=32, layers=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    return str(tmp_path / "bf16")


@pytest.mark.parametrize("dtype,q,held,words", [
    ("float32", False, torch.float32, "loaded as float32 master weights"),
    ("bfloat16", False, torch.bfloat16, "loaded as bfloat16 weights (--dtype bfloat16)"),
    ("auto", False, torch.bfloat16, "loaded as bfloat16 weights (--dtype auto: the file's dtype)"),
    ("float16", False, torch.float16, "loaded as float16 weights (--dtype float16; --precision fp32: "
                                      "fp32 compute)"),
    ("auto", True, torch.bfloat16, "loaded as NF4 4-bit linear layers (bitsandbytes, double "
                                   "quantisation, bf16 compute), the other weights (embeddings, norms, "
                                   "lm_head) in bfloat16 (--load-in-4bit; --dtype auto: the file's dtype)"),
], ids=["float32", "bfloat16", "auto", "float16-precision", "auto-nf4"])
def test_checkpoint_loads_in_the_dtype_asked_and_says_so(tmp_path, dtype, q, held, words):
    path = bf16_checkpoint(tmp_path)
    lines = []
    model, _ = load_model(path, [], 0, precision="fp32" if dtype == "float16" else None,
                          dtype=dtype, load_in_4bit=q, say=lines.append)
    assert lines == [f"model: {path} (LlamaForCausalLM), saved in bfloat16, {words}"]
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {held}
    assert is_4bit(model.model.layers[0].mlp.up_proj) == q and type(model.lm_head) is torch.nn.Linear


def test_qlora_on_a_local_checkpoint(tmp_path, capsys):
    path = bf16_checkpoint(tmp_path)
    out = tmp_path / "run"
    assert cli_main(["--model", path, "--data", "zen", "--lora-r", "4", "--load-in-4bit", "true",
                     "--dtype", "bfloat16", "--max-length", "32", "--batch-size", "2", "--max-steps", "1",
                     "--eval-steps", "1", "--no-progress", "--output-dir", str(out)]) == 0
    assert "saved in bfloat16, loaded as NF4 4-bit linear layers" in capsys.readouterr().out
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("flags,text", [
    (["--load-in-4bit", "true"], "load_in_4bit needs lora_r: the 4-bit NF4 base is frozen"),
    (["--load-in-4bit", "true", "--lora-r", "4", "--parallel", "fsdp2"],
     "load_in_4bit with parallel fsdp2 is not supported"),
    (["--load-in-4bit", "true", "--lora-r", "4", "--merge-lora", "true"],
     "merge_lora with load_in_4bit: the adapters cannot be merged into NF4"),
    (["--dtype", "float16", "--lora-r", "4", "--optim", "adamw_anyprecision"],
     "dtype float16 with optim adamw_anyprecision"),
    (["--dtype", "float16"], "full fine-tuning of float16 weights is refused"),
    (["--dtype", "half"], "dtype must be one of auto, bfloat16, float16, float32; got 'half'"),
], ids=["4bit-no-lora", "4bit-fsdp2", "4bit-merge", "fp16-anyprecision", "fp16-full", "dtype-typo"])
def test_refused_combinations(tmp_path, capsys, flags, text):
    out = tmp_path / "run"
    assert cli_main(flags + ["--output-dir", str(out)]) == 2
    one_error_line(capsys, text)
    assert not out.exists()


def test_bf16_full_fine_tuning_warns_once_unless_kahan(monkeypatch):
    monkeypatch.setattr(optim, "WARNED_BF16", set())
    with pytest.warns(UserWarning, match="bfloat16 weights with full fine-tuning and optim adamw_torch"):
        DPOConfig(dtype="bfloat16").validate()
    assert optim.WARNED_BF16 == {"adamw_torch"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPOConfig(dtype="bfloat16")  # said once a process
        DPOConfig(dtype="bfloat16", optim="adamw_anyprecision")
        DPOConfig(dtype="bfloat16", lora_r=4)


def test_missing_bitsandbytes_is_one_error_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    out = tmp_path / "run"
    assert cli_main(["--data", "zen", "--lora-r", "4", "--load-in-4bit", "true",
                     "--output-dir", str(out)]) == 2
    one_error_line(capsys, "load_in_4bit needs bitsandbytes: pip install bitsandbytes")
    assert not out.exists()


def test_qlora_gradient_checkpointing_gives_the_same_steps(tmp_path):
    # peft's prepare_model_for_kbit_training is not called: --gradient-checkpointing (non-reentrant)
    # checkpoints a 4-bit base without its input-grad hook and changes no number.
    losses = {}
    for gc in (False, True):
        model, tok = tiny(load_in_4bit=True)
        t = trainer(tmp_path / str(gc), model, tok, lora_r=4, load_in_4bit=True, max_steps=3,
                    gradient_checkpointing=gc)
        losses[gc] = [t.train_step()["loss"] for _ in range(3)]
    assert losses[True] == losses[False] and losses[False][-1] != losses[False][0]


def test_dtype_auto_is_checked_on_the_weights_loaded(tmp_path, capsys, monkeypatch):
    """--dtype auto keeps the file's dtype, which the config cannot see: an fp16 checkpoint's full
    fine-tuning is refused when the optimizer meets its weights (before anything is written), and
    a bf16 one warns that its updates round to bf16."""
    tok = train_tokenizer(TEXTS)
    fp16 = tmp_path / "fp16"
    tiny_llama(len(tok), seed=0, hidden=32, layers=1).half().save_pretrained(fp16)
    tok.save_pretrained(fp16)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "run"
    flags = ["--data", "zen", "--dtype", "auto", "--max-length", "32", "--batch-size", "2",
             "--max-steps", "1", "--no-progress", "--output-dir", str(out)]
    assert cli_main(["--model", str(fp16), *flags]) == 2
    one_error_line(capsys, "full fine-tuning of float16 weights is refused")
    assert not out.exists()
    monkeypatch.setattr(optim, "WARNED_BF16", set())
    with pytest.warns(UserWarning, match="bfloat16 weights with full fine-tuning and optim adamw_torch"):
        assert cli_main(["--model", bf16_checkpoint(tmp_path), *flags]) == 0


@pytest.mark.parametrize("flags,words", [
    (["--load-in-4bit", "--dtype", "bfloat16"],
     ["- Base loaded as: linear layers in NF4", "quantization_config=nf4, dtype='bfloat16'",
      "bnb_4bit_use_double_quant=True", "llm_int8_skip_modules=['lm_head']"]),
    ([], ["- Base loaded as: --dtype float32", "dtype='float32'"]),
], ids=["nf4-bf16", "fp32"])
def test_the_model_card_loads_the_base_as_it_trained(tmp_path, flags, words):
    """The adapters apply to the base as it was loaded for training: the card says how, and its
    loading code passes the quantisation and the dtype (transformers 5 would keep the file's)."""
    out = tmp_path / "run"
    assert cli_main(["--lora-r", "4", *flags, "--data", "zen", "--max-length", "32", "--batch-size", "2",
                     "--max-steps", "1", "--no-progress", "--output-dir", str(out)]) == 0
    card = (out / "model" / "README.md").read_text()
    for w in words:
        assert w in card, w
