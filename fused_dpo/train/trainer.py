"""A thin DPO trainer for transformers causal LMs. One loop, readable top to bottom:

    for each step:  batch of pairs -> [chosen; rejected] in one forward -> hidden states
                    -> fused log-probs (no logits) -> DPO-family loss averaged over the batch
                    -> backward, clip, optimizer step -> metrics, health checks, eval, checkpoint
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from .. import get_logps, get_logps_from_hidden
from ..losses import REFERENCE_FREE, BCOState, dpo_loss
from .config import DPOConfig
from .data import Tokenized, collate, tokenize
from .health import HealthMonitor

CKPT = "checkpoint.pt"


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout, module or functional (HF attention reads `attention_dropout`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for k, v in list(vars(cfg).items()):
            if "dropout" in k and isinstance(v, float):
                setattr(cfg, k, 0.0)


class LogpsHead:
    """Per-sequence response log-probs of a causal LM through its final hidden states and lm_head
    (no full logits), falling back to logits when the head is not a plain linear layer."""

    def __init__(self, model, impl: str):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{type(model).__name__} has no lm_head (get_output_embeddings() is None);"
                             " DPO needs a causal language model")
        self.model, self.head, self.impl = model, head, impl
        self.base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None) or None
        scale = getattr(cfg, "logit_scale", None)
        self.temperature = 1.0 / scale if scale else 1.0
        self.fused = isinstance(head, torch.nn.Linear) and self.base is not None

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(impl=self.impl, softcap=self.softcap, temperature=self.temperature,
                  return_counts=True, validate=False)
        if self.fused:
            hidden = self.base(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).last_hidden_state
            bias = self.head.bias.to(hidden.dtype) if self.head.bias is not None else None
            return get_logps_from_hidden(hidden, self.head.weight.to(hidden.dtype), batch["input_ids"],
                                         batch["response_mask"], bias=bias, **kw)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return get_logps(logits, batch["input_ids"], batch["response_mask"], **kw)


class DPOTrainer:
    def __init__(self, model, ref_model, tokenizer, train_dataset, eval_dataset=None,
                 config: DPOConfig | None = None):
        self.config = cfg = config or DPOConfig()
        cfg.validate()
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.train_data = self._tokenize(train_dataset, "train")
        self.eval_data = self._tokenize(eval_dataset, "eval") if eval_dataset is not None else None
        if not self.train_data.pairs:
            raise ValueError(f"no usable training pairs ({self.train_data.report()})")
        self.out = Path(cfg.output_dir)

        self.model = model
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        self.policy_logps = LogpsHead(model, cfg.logps_impl)

        self.ref_is_copy = False
        self.ref_cache: dict[str, torch.Tensor] = {}
        if cfg.reference == "none":
            self.ref_model = None
        else:
            if ref_model is None:
                ref_model, self.ref_is_copy = copy.deepcopy(model), True
            if cfg.disable_dropout:
                disable_dropout(ref_model)
            self.ref_model = ref_model.eval().requires_grad_(False)
            self.ref_logps = LogpsHead(self.ref_model, cfg.logps_impl)

        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        steps = self.total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda(steps))
        self.monitor = HealthMonitor(cfg.beta, steps, self._expected_step0_loss(), cfg.max_bad_steps)
        self.bco = BCOState()
        self.step = 0
        self.position = 0  # pairs consumed from the (epoch-shuffled) training stream
        self._perm: tuple[int, list[int]] = (-1, [])  # (epoch, its order), derived from position

    # -- setup helpers -------------------------------------------------------------------------
    def _tokenize(self, data, what: str) -> Tokenized:
        if isinstance(data, Tokenized):
            return data
        tk = tokenize(list(data), self.tokenizer, self.config.max_length, self.config.truncation_side)
        if tk.skipped:
            print(f"[{what} data] {tk.report()}")
        return tk

    def total_steps(self) -> int:
        cfg = self.config
        if cfg.num_epochs is None:
            return cfg.max_steps
        return max(1, cfg.num_epochs * len(self.train_data.pairs) // cfg.effective_batch_size)

    def _lr_lambda(self, steps: int):
        cfg = self.config

        def f(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / (cfg.warmup_steps + 1)
            if cfg.lr_scheduler == "constant":
                return 1.0
            frac = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
            if cfg.lr_scheduler == "linear":
                return max(0.0, 1.0 - frac)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

        return f

    def _expected_step0_loss(self) -> float | None:
        """The loss at policy == reference (log 2 for DPO). None when it is not a constant there:
        a reference that is not a copy of the policy, or any term that reads the policy's
        log-probs themselves (reference-free losses, the RPO NLL term)."""
        cfg = self.config
        if (cfg.reference == "none" or not self.ref_is_copy or cfg.rpo_alpha is not None
                or any(t in REFERENCE_FREE for t in cfg.loss_type)):
            return None
        z = torch.zeros(1, dtype=torch.float64)
        loss, _ = dpo_loss(z - 1, z - 1, z - 1, z - 1, chosen_counts=z + 1, rejected_counts=z + 1,
                           **self._loss_kwargs(BCOState()))
        return float(loss)

    def _loss_kwargs(self, bco: BCOState) -> dict:
        cfg = self.config
        return dict(loss_type=cfg.loss_type, loss_weights=cfg.loss_weights, beta=cfg.beta,
                    label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                    rpo_alpha=cfg.rpo_alpha, bco_state=bco)

    # -- data stream ---------------------------------------------------------------------------
    def _pair_indices(self, n_pairs: int) -> list[int]:
        """The next n_pairs indices of a stream that reshuffles every epoch from (seed, epoch)."""
        n = len(self.train_data.pairs)
        out = []
        for p in range(self.position, self.position + n_pairs):
            epoch, k = divmod(p, n)
            if self._perm[0] != epoch:
                g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
                self._perm = (epoch, torch.randperm(n, generator=g).tolist())
            out.append(self._perm[1][k])
        self.position += n_pairs
        return out

    def _batch(self, data: Tokenized, idx: list[int]) -> dict[str, torch.Tensor]:
        b = collate([data.pairs[i] for i in idx], self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in b.items()}

    def _autocast(self):
        cfg = self.config
        if cfg.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=getattr(torch, {"bf16": "bfloat16",
                                                                       "fp16": "float16"}[cfg.precision]))

    # -- reference log-probs -------------------------------------------------------------------
    @torch.no_grad()
    def _reference(self, data: Tokenized, idx: list[int], batch, split: str) -> torch.Tensor | None:
        if self.config.reference == "none":
            return None
        if self.config.reference == "precomputed":
            cached = self.ref_cache[split]  # (pairs, 2): chosen, rejected
            return torch.cat([cached[idx, 0], cached[idx, 1]]).to(self.device)
        with self._autocast():
            return self.ref_logps(batch)[0].float()

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """reference="precomputed": log-probs of every pair once, then free the reference model."""
        for split, data in (("train", self.train_data), ("eval", self.eval_data)):
            if data is None:
                continue
            out = torch.empty(len(data.pairs), 2, dtype=torch.float32)
            bs = self.config.batch_size
            for s in range(0, len(data.pairs), bs):
                idx = list(range(s, min(s + bs, len(data.pairs))))
                with self._autocast():
                    lp = self.ref_logps(self._batch(data, idx))[0].float().cpu()
                out[idx, 0], out[idx, 1] = lp[: len(idx)], lp[len(idx) :]
            self.ref_cache[split] = out
        self.ref_model = self.ref_logps = None

    # -- one step ------------------------------------------------------------------------------
    def _forward_loss(self, data: Tokenized, idx: list[int], split: str, bco: BCOState):
        batch = self._batch(data, idx)
        ref = self._reference(data, idx, batch, split)
        with self._autocast():
            logps, counts = self.policy_logps(batch)
        logps = logps.float()
        B = len(idx)
        rc, rr = (ref[:B], ref[B:]) if ref is not None else (None, None)
        loss, metrics = dpo_loss(logps[:B], logps[B:], rc, rr, chosen_counts=counts[:B],
                                 rejected_counts=counts[B:], **self._loss_kwargs(bco))
        if self.config.loss_reduction == "sum":
            loss = loss * B
        tokens = counts.float().mean()
        metrics = {**metrics, "tokens_per_response": tokens, "tokens": batch["attention_mask"].sum()}
        if ref is not None:
            with torch.no_grad():
                ratio = logps - ref
                metrics["kl_estimate"] = (ratio / counts.clamp_min(1)).mean()
                # Mean |margin| over pairs: exactly 0 at policy == reference, and first-order in any
                # difference (the loss is only second-order in symmetric noise such as dropout).
                metrics["rewards/margins_abs"] = (self.config.beta * (ratio[:B] - ratio[B:])).abs().mean()
        return loss, metrics

    def train_step(self) -> dict[str, float] | None:
        cfg = self.config
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for _ in range(cfg.gradient_accumulation_steps):
            idx = self._pair_indices(cfg.batch_size)
            loss, m = self._forward_loss(self.train_data, idx, "train", self.bco)
            if not torch.isfinite(loss):
                finite = False
                break
            (loss / cfg.gradient_accumulation_steps).backward()
            for k, v in {"loss": loss.detach(), **m}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
        step = self.step
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            flags, stop = self.monitor.nonfinite(step)
            self._announce(flags)
            self.step += 1
            self.scheduler.step()
            if stop:
                raise TrainingStopped(f"training stopped at step {step}: {self.monitor.bad_in_a_row} "
                                      f"NaN/inf losses in a row (max_bad_steps={cfg.max_bad_steps})")
            return None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        secs = time.perf_counter() - t0
        tokens = sums.pop("tokens") * cfg.gradient_accumulation_steps
        m = dict(sums, step=step, grad_norm=float(grad_norm), lr=lr, tokens_per_s=tokens / secs,
                 peak_mem_MiB=_peak_mem_mib(self.device),
                 epoch=self.position / len(self.train_data.pairs))
        flags = self.monitor.observe(step, m)
        self._announce(flags)
        m["flags"] = [f.name for f in flags]
        self.step += 1
        return m

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out preference accuracy (policy margin > 0 against the reference) and loss."""
        if self.eval_data is None or not self.eval_data.pairs:
            return {}
        self.model.eval()
        n = len(self.eval_data.pairs)
        total: dict[str, float] = {}
        for s in range(0, n, self.config.batch_size):
            idx = list(range(s, min(s + self.config.batch_size, n)))
            loss, m = self._forward_loss(self.eval_data, idx, "eval", copy.deepcopy(self.bco))
            for k, v in {"loss": loss, "rewards/accuracies": m["rewards/accuracies"],
                         "rewards/margins": m["rewards/margins"]}.items():
                total[k] = total.get(k, 0.0) + float(v) * len(idx) / n
        self.model.train()
        return {f"eval/{k}": v for k, v in total.items()}

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step, "position": self.position, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "monitor": self.monitor.state_dict(), "bco": vars(self.bco).copy(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "ref_cache": self.ref_cache, "config": self.config.to_dict(),
        }
        if self.ref_is_copy and self.ref_model is not None:
            state["ref_model"] = self.ref_model.state_dict()
        atomic_write_bytes(self.out / CKPT, lambda f: torch.save(state, f))

    def load(self) -> None:
        path = self.out / CKPT
        if not path.exists():
            raise ValueError(f"--resume: no checkpoint at {path}")
        s = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.monitor.load_state_dict(s["monitor"])
        self.bco = BCOState(**s["bco"])
        self.step, self.position = s["step"], s["position"]
        self.ref_cache = s["ref_cache"]
        if "ref_model" in s and self.ref_model is not None:
            self.ref_model.load_state_dict(s["ref_model"])
        torch.set_rng_state(s["rng"]["torch"])
        random.setstate(s["rng"]["python"])

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume: bool = False, progress: bool = True, until_step: int | None = None) -> dict:
        """Run to the configured length (or stop after `until_step`, checkpointed, to resume later)."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        if resume:
            self.load()
            kept = [ln for ln in _read_lines(metrics_path) if json.loads(ln)["step"] < self.step]
            atomic_write_text(metrics_path, "".join(kept))
        else:
            torch.manual_seed(cfg.seed)  # dropout, if enabled, is the only randomness in a step
            random.seed(cfg.seed)
            atomic_write_text(metrics_path, "")
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            self._announce(self.monitor.check_config(cfg.effective_batch_size))
            if cfg.reference == "precomputed":
                self.precompute_reference()
        total = self.total_steps()
        end = total if until_step is None else min(total, until_step)
        bar = _progress(total, self.step, progress)
        stopped = None
        try:
            with open(metrics_path, "a") as log:
                while self.step < end:
                    m = self.train_step()
                    if m is not None:
                        if (self.step) % cfg.eval_steps == 0 or self.step == total:
                            m.update(self.evaluate())
                        if (m["step"] % cfg.logging_steps == 0) or "eval/loss" in m:
                            log.write(json.dumps(m) + "\n")
                            log.flush()
                        bar.set_postfix(loss=f"{m['loss']:.4f}", margin=f"{m['rewards/margins']:.2f}",
                                        acc=f"{m['rewards/accuracies']:.2f}")
                    bar.update(1)
                    if self.step % cfg.save_steps == 0 or self.step == end:
                        self.save()
        except TrainingStopped as e:
            stopped = str(e)
            print(stopped)
        finally:
            bar.close()
        return self.finish(stopped)

    def finish(self, stopped: str | None) -> dict:
        rows = [json.loads(ln) for ln in _read_lines(self.out / "metrics.jsonl")]
        evals = [r for r in rows if "eval/rewards/accuracies" in r]
        extra = [f"Training data: {self.train_data.report()}."]
        if self.eval_data is not None:
            extra.append(f"Held-out data: {self.eval_data.report()}.")
        if evals:
            extra.append(f"Held-out preference accuracy at step {evals[-1]['step']}: "
                         f"{evals[-1]['eval/rewards/accuracies']:.3f}.")
        if stopped:
            extra.append(f"**Stopped:** {stopped}")
        atomic_write_text(self.out / "health.md", self.monitor.report(extra))
        try:
            from .plots import plot_run

            plot_run(rows, self.monitor.flags, self.out / "curves.png")
        except ImportError:
            print("matplotlib is not installed: no plots (pip install fused_dpo[plot])")
        return {"steps": self.step, "flags": [f.name for f in self.monitor.flags], "stopped": stopped,
                "eval": evals[-1] if evals else {}, "metrics": rows}

    def _announce(self, flags) -> None:
        for f in flags:
            print(f"[health] step {f.step}: {f.name}: {f.message}")


class TrainingStopped(RuntimeError):
    pass


def _peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="dpo", dynamic_ncols=True)
