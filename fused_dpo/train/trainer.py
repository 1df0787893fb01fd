"""A thin DPO trainer for transformers causal LMs. One loop, readable top to bottom:

    for each step:  every eval_steps: held-out loss and accuracy of the current weights
                    batch of pairs -> [chosen; rejected] in one forward -> hidden states
                    -> fused log-probs and per-token statistics (no logits)
                    -> DPO-family loss averaged over the batch
                    -> backward, clip, optimizer step -> metrics, health checks -> log, checkpoint

One step counter: step k is the weights after k optimizer updates. The metrics row of step k holds
the training forward pass on those weights (before update k + 1) and, every eval_steps, their
held-out evaluation; the checkpoint saved at step k holds them too. The last row, at step
`total_steps()`, is the held-out evaluation of the final weights.

Around the loop, in their own modules: the model adapter (`hf`), LoRA adapters and their reference
(`lora`), the checkpoint format and its fingerprints (`checkpoint`), the run directory (`rundir`),
the learning-rate schedule (`schedule`), the health checks (`health`), TRL's per-token metrics
(`token_metrics`), the model-state bytes (`memory`), and for a run over several processes, DDP or
FSDP2 (`distributed`) with sharded checkpoints (`sharded`).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import torch

from .. import LogpsStats
from ..losses import REFERENCE_FREE, BCOState, dpo_loss
from . import distributed, export, lora, offload, optim, rundir, sharded, trackers
from .checkpoint import (
    CKPT,
    FORMAT,
    atomic_write_text,
    check_resumable,
    config_fingerprint,
    data_fingerprint,
    describe_changes,
    load_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from .config import DPOConfig
from .data import Tokenized, collate, pad_id, tokenize
from .distributed import Dist, GlobalBCOState, LogpsModule
from .health import HealthMonitor
from .hf import LogpsHead, disable_dropout
from .memory import model_state_bytes
from .report import write_report
from .schedule import lr_lambda
from .token_metrics import KEYS as TOKEN_KEYS
from .token_metrics import STATS, averages, token_sums

# LogpsHead lives in .hf; it stays importable from here (bench/train_step.py imports it so).
__all__ = ["DPOTrainer", "LogpsHead"]


class DPOTrainer:
    def __init__(self, model, ref_model, tokenizer, train_dataset, eval_dataset=None,
                 config: DPOConfig | None = None, sources: dict | None = None, dist: Dist | None = None):
        """`ref_model=None` uses a frozen copy of the initial policy, or with LoRA (`lora_r`) the
        policy itself with its adapters off (no second copy of the weights). `sources` says how the caller
        built the model and the data (e.g. {"model": "tiny", "data": "zen"}); it is recorded in
        run.json, which is how `fused-dpo train --resume` finds them again. `dist` is this process's
        place in a distributed run (`distributed.setup(config.parallel)`); every rank builds the
        same model, data and config and constructs the trainer."""
        self.config = cfg = config or DPOConfig()
        cfg.validate()
        self.dist = d = dist if dist is not None else Dist()
        if d.parallel != cfg.parallel:
            raise ValueError(f"config.parallel is {cfg.parallel!r} but the process group was set up "
                             f"for {d.parallel!r}: pass dist=distributed.setup(config.parallel)")
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.sources = dict(sources or {})
        self.train_data = self._tokenize(train_dataset, "train")
        self.eval_data = self._tokenize(eval_dataset, "eval") if eval_dataset is not None else None
        if not self.train_data.pairs:
            raise ValueError(f"no usable training pairs ({self.train_data.report()})")
        if len(self.train_data.pairs) < self.global_batch_size:
            ranks = f" x {d.world} ranks" if d.world > 1 else ""
            accum = cfg.gradient_accumulation_steps
            self._print(f"warning: a step takes {self.global_batch_size} pairs (batch_size "
                        f"{cfg.batch_size}{ranks}{f' x {accum} accumulation steps' if accum > 1 else ''})"
                        f" but the training set has {len(self.train_data.pairs)}: every step sees "
                        f"some pairs twice (lower --batch-size)")
        self.out = Path(cfg.output_dir)

        if lora.is_peft_model(model):
            raise ValueError(f"the model is a peft {type(model).__name__}: pass the plain transformers "
                             f"model and set lora_r (--lora-r) to train LoRA adapters")
        self.model = model
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            # transformers 5 renamed it (the old name warns); non-reentrant by default, so frozen
            # embeddings under LoRA still pass gradients to the adapters.
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        self.lora = cfg.lora_r is not None
        if self.lora:
            model = self.model = lora.apply_lora(model, cfg.lora_r, cfg.effective_lora_alpha,
                                                 cfg.lora_target_modules, cfg.seed)
        model.train()
        # The policy's pass also yields TRL's per-token metrics (entropy, mean logit, top-1);
        # the reference's needs only its log-probs.
        # WPO's pair weights need log sum p^2 per response: one more statistic of the same pass
        stats = STATS + (("log_sum_sq_probs",) if cfg.use_weighting else ())
        self.policy_logps = LogpsHead(lora.unwrap(model), cfg.logps_impl, stats=stats,
                                      packed=cfg.padding_free)
        self.ref_is_copy = False  # set when the reference equals the initial policy
        self.ref_cache: dict[str, torch.Tensor] = {}
        # ref_source is not saved in checkpoints: the reference is rebuilt from it on resume and
        # checked against its fingerprint. A LoRA checkpoint holds only the adapters: the frozen
        # base weights under them are rebuilt likewise and checked against theirs.
        self.ref_model, self.ref_logps, self.ref_source = self._build_reference(model, ref_model)
        base = weights_fingerprint(model, skip="lora_") if self.lora else None
        self.fingerprints = {
            "config": config_fingerprint(cfg.to_dict()),
            "data": data_fingerprint(self.train_data, self.eval_data),
            "reference": (base if self.ref_model is model else
                          weights_fingerprint(self.ref_model) if self.ref_model is not None else None),
        }
        if self.lora:
            self.fingerprints["base"] = base
            self.adapters = lora.summary(model)
            self._print(f"LoRA r={cfg.lora_r} alpha={cfg.effective_lora_alpha:g} on "
                  f"{', '.join(self.adapters['target_modules'])}: "
                  f"{self.adapters['trainable_parameters']:,} trainable parameters of "
                  f"{self.adapters['parameters']:,}")

        # The forward passes DDP and FSDP2 wrap: the policy (and, under LoRA, its reference: the same
        # model with the adapters off), and a separate reference model. Sharded after the
        # fingerprints above were taken of the whole weights.
        heads = {"policy": self.policy_logps}
        if self.lora and self.ref_model is model:
            heads["reference"] = self.ref_logps
        self.policy_module = distributed.wrap(LogpsModule(model, heads), d, cfg.precision, True)
        self.ref_module = None
        if self.ref_model is not None and self.ref_model is not model:
            self.ref_module = distributed.wrap(LogpsModule(self.ref_model, {"policy": self.ref_logps}),
                                               d, cfg.precision, False)
        # Only the trainable parameters (all of them, or the adapters under LoRA).
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optim.build(self.params, cfg)
        self.offload = offload.for_config(cfg, self.device)  # around each micro-batch's step
        self.tracker = None
        steps = self.total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, steps))
        self.monitor = HealthMonitor(cfg.beta, steps, self._expected_step0_loss(), cfg.max_bad_steps)
        self.bco = self._new_bco()
        self.run_id: str | None = None
        self.run_json_extra: dict = {}  # what the caller adds to a new run's run.json (its memory plan)
        self.step = 0
        self.position = 0  # pairs consumed from the (epoch-shuffled) training stream
        self._perm: tuple[int, list[int]] = (-1, [])  # (epoch, its order), derived from position

    # -- setup helpers -------------------------------------------------------------------------
    def _build_reference(self, model, ref_model):
        """(reference model, its log-probs head, what it is in words)."""
        cfg = self.config
        if cfg.reference == "none":
            return None, None, "none"
        if ref_model is None and self.lora:
            # The policy's own base weights, not a second copy; lora_B starts at 0. Its head reads
            # the model with the adapters off (`_reference` switches them off around the call);
            # the policy's head already warned about a fallback to logits, if any.
            self.ref_is_copy = True
            return model, LogpsHead(model.get_base_model(), cfg.logps_impl, warn=False,
                                    packed=cfg.padding_free), \
                "the policy with its LoRA adapters disabled"
        source = "the model passed as ref_model"
        if ref_model is None:
            ref_model, self.ref_is_copy = copy.deepcopy(model), True
            source = "a frozen copy of the initial policy"
        if cfg.disable_dropout:
            disable_dropout(ref_model)
        ref_model.eval().requires_grad_(False)
        # A copy falls back to the logits for the reason the policy's head already gave.
        head = LogpsHead(lora.unwrap(ref_model), cfg.logps_impl,
                         warn=not (self.ref_is_copy and self.policy_logps.fallback),
                         packed=cfg.padding_free)
        return ref_model, head, source

    def _tokenize(self, data, what: str) -> Tokenized:
        if isinstance(data, Tokenized):
            return data
        tk = tokenize(list(data), self.tokenizer, self.config.max_length, self.config.truncation_side)
        if tk.skipped:
            self._print(f"[{what} data] {tk.report()}")
        return tk

    def total_steps(self) -> int:
        return self.config.total_steps(len(self.train_data.pairs), self.global_batch_size)

    @property
    def global_batch_size(self) -> int:
        """Pairs per optimizer step: batch_size per rank x ranks x accumulation steps."""
        return self.config.effective_batch_size * self.dist.world

    def _expected_step0_loss(self) -> float | None:
        """The logged loss at policy == reference (log 2 for DPO, times the batch size when the
        loss is summed). None when it is not a constant there: a reference that is not a copy of
        the policy, or any term that reads the policy's log-probs themselves (reference-free
        losses, the RPO NLL term)."""
        cfg = self.config
        # (WPO's weights read the policy's log-probs too)
        if (cfg.reference == "none" or not self.ref_is_copy or cfg.rpo_alpha is not None
                or cfg.use_weighting or any(t in REFERENCE_FREE for t in cfg.loss_type)):
            return None
        z = torch.zeros(1, dtype=torch.float64)
        loss, _ = dpo_loss(z - 1, z - 1, z - 1, z - 1, chosen_counts=z + 1, rejected_counts=z + 1,
                           **self._loss_kwargs(BCOState()))
        return float(loss) * (cfg.batch_size * self.dist.world if cfg.loss_reduction == "sum" else 1)

    def _loss_kwargs(self, bco: BCOState) -> dict:
        cfg = self.config
        return dict(loss_type=cfg.loss_type, loss_weights=cfg.loss_weights, beta=cfg.beta,
                    label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                    discopop_tau=cfg.discopop_tau, rpo_alpha=cfg.rpo_alpha, bco_state=bco,
                    f_divergence_type=cfg.f_divergence_type,
                    f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
                    use_weighting=cfg.use_weighting)

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
        """[chosen; rejected]: right-padded (2B, T), or with padding_free one packed row (1, N)
        whose attention_mask holds sequence numbers (`collate_packed`; the heads unpack it)."""
        b = collate([data.pairs[i] for i in idx], pad_id(self.tokenizer),
                    packed=self.config.padding_free)
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
            return self._ref_forward(batch).logps.float()

    def _ref_forward(self, batch) -> LogpsStats:
        if self.ref_module is None:  # LoRA: the policy's own model with its adapters off
            with lora.adapters_off(self.model):
                return _call(self.policy_module, batch, "reference")
        return _call(self.ref_module, batch, "policy")

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """reference="precomputed": log-probs of every pair once, then free the reference model.
        The batches are dealt out to the ranks (batch k to rank k mod world) and the results summed
        over them; a rank left without a batch in the last round runs one on pair 0 and keeps
        nothing (FSDP2's gathers need every rank)."""
        d, bs = self.dist, self.config.batch_size
        for split, data in (("train", self.train_data), ("eval", self.eval_data)):
            if data is None:
                continue
            n = len(data.pairs)
            out = torch.zeros(n, 2, dtype=torch.float32)
            starts = list(range(0, n, bs))
            rounds = -(-len(starts) // d.world)
            for k in range(rounds * d.world)[d.rank :: d.world]:
                idx = list(range(starts[k], min(starts[k] + bs, n))) if k < len(starts) else []
                with self._autocast():
                    lp = self._ref_forward(self._batch(data, idx or [0])).logps.float().cpu()
                if idx:
                    out[idx, 0], out[idx, 1] = lp[: len(idx)], lp[len(idx) :]
            self.ref_cache[split] = d.all_reduce(out)
        self.ref_model = self.ref_logps = self.ref_module = None

    # -- one step ------------------------------------------------------------------------------
    def _forward_loss(self, data: Tokenized, idx: list[int], split: str, bco: BCOState):
        """(mean loss over the pairs, metrics, per-pair reward margins (B,), the token sums of
        TRL's per-token metrics (see token_metrics), to be summed over batches and divided once)."""
        cfg = self.config
        batch = self._batch(data, idx)
        ref = self._reference(data, idx, batch, split)
        with self._autocast():
            out = _call(self.policy_module, batch, "policy")
        logps, counts = out.logps.float(), out.counts
        B = len(idx)
        tsums = token_sums(out, B)
        rc, rr = (ref[:B], ref[B:]) if ref is not None else (None, None)
        wpo = {}
        if cfg.use_weighting:
            lq = out.log_sum_sq_probs.float()
            wpo = dict(chosen_log_sum_sq_probs=lq[:B], rejected_log_sum_sq_probs=lq[B:])
        loss, metrics = dpo_loss(logps[:B], logps[B:], rc, rr, chosen_counts=counts[:B],
                                 rejected_counts=counts[B:], **self._loss_kwargs(bco), **wpo)
        tokens = counts.float().mean()
        metrics = {**metrics, "tokens_per_response": tokens, "tokens": (batch["attention_mask"] != 0).sum()}
        with torch.no_grad():
            n = counts.float().clamp_min(1)
            # The rewards dpo_loss compares for rewards/accuracies, per pair.
            if any(t not in REFERENCE_FREE for t in cfg.loss_type):
                r = cfg.beta * (logps - ref)
            else:
                r = cfg.beta * torch.where(counts > 0, logps / n, torch.zeros_like(logps))
            margins = r[:B] - r[B:]
            if ref is not None:
                # kl_estimate: k3 = (r - 1) - log r with r = policy / reference (Schulman,
                # "Approximating KL divergence", 2020), an estimator of KL(reference || policy)
                # from samples of the reference, which is what DPO's preference data usually are
                # (responses of the SFT model the reference is). Applied per response to its mean
                # log-ratio per token d: exp(d) - 1 - d, never negative, 0 at policy == reference.
                d = ((logps - ref) / n).double()
                metrics["kl_estimate"] = (torch.expm1(d) - d).mean()
                # Mean |margin| over pairs: exactly 0 at policy == reference, and first-order in any
                # difference (the loss is only second-order in symmetric noise such as dropout).
                u = (logps[:B] - rc) - (logps[B:] - rr)
                metrics["rewards/margins_abs"] = (cfg.beta * u).abs().mean()
        return loss, metrics, margins, tsums

    def train_step(self) -> dict[str, float] | None:
        """One optimizer update; its metrics, or None when the step was skipped for a NaN/inf loss."""
        cfg = self.config
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.optimizer.zero_grad(set_to_none=True)
        d, accum = self.dist, cfg.gradient_accumulation_steps
        sums: dict[str, float] = {}
        tsums = 0.0
        finite = True
        for micro in range(accum):
            # Every rank draws the same global batch and keeps its slice.
            idx = self._pair_indices(cfg.batch_size * d.world)[d.rank * cfg.batch_size:
                                                                (d.rank + 1) * cfg.batch_size]
            with distributed.gradient_sync(self.policy_module, micro == accum - 1), self.offload:
                loss, m, _, ts = self._forward_loss(self.train_data, idx, "train", self.bco)
                if cfg.loss_reduction == "sum":
                    # DDP and FSDP2 average the ranks' gradients: x world makes it the global sum.
                    loss = loss * len(idx) * d.world
                # All ranks skip the step together, or none does (a rank that skipped backward
                # alone would leave the others waiting in its gradient reduction).
                if not d.all_true(torch.isfinite(loss)):
                    finite = False
                    distributed.discard_micro_batch(self.policy_module, loss, micro == accum - 1)
                    break
                (loss / accum).backward()
            for k, v in {"loss": loss.detach(), **m}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
            tsums = tsums + ts
        step = self.step
        self.step += 1
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self._announce(self.monitor.nonfinite(step)[0])
            return None
        clip = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = distributed.clip_grad_norm(self.params, clip)  # of the whole, global gradient
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        # Global numbers: the ranks' means averaged, their token counts and token sums added.
        sums = d.mean_metrics(sums, summed=("tokens",))
        tsums = d.all_reduce(torch.as_tensor(tsums, dtype=torch.float64))
        peak = float(d.all_reduce(torch.tensor(_peak_mem_mib(self.device), dtype=torch.float64),
                                  torch.distributed.ReduceOp.MAX))
        secs = time.perf_counter() - t0
        tokens = sums.pop("tokens") * accum
        m = dict(step=step, **sums, **averages(tsums), grad_norm=float(grad_norm), lr=lr,
                 tokens_per_s=tokens / secs, peak_mem_MiB=peak,
                 epoch=self.position / len(self.train_data.pairs))
        flags = self.monitor.observe(step, m)
        self._announce(flags)
        m["flags"] = [f.name for f in flags]
        return m

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out preference accuracy (reward margin > 0), mean loss per pair, mean margin, and
        TRL's per-token metrics (eval/entropy, ...) token-weighted over the held-out set."""
        return self._evaluate()[0]

    def _evaluate(self) -> tuple[dict[str, float], int, int]:
        """(metrics, pairs ranked right, pairs ranked wrong); ties (margin exactly 0) are neither."""
        if self.eval_data is None or not self.eval_data.pairs:
            return {}, 0, 0
        self.model.eval()
        n = len(self.eval_data.pairs)
        d, bs = self.dist, self.config.batch_size
        sums = torch.zeros(4, dtype=torch.float64)  # loss, margin, right, wrong
        tsums = torch.zeros(len(TOKEN_KEYS), 2, dtype=torch.float64)
        bco = copy.deepcopy(self.bco)
        with torch.no_grad():
            # Global batches of bs x world pairs, each rank its slice. A rank whose slice of the
            # last one is empty still runs a forward (FSDP2's gathers need every rank), on pair 0,
            # and adds nothing.
            for s in range(0, n, bs * d.world):
                idx = list(range(s, min(s + bs * d.world, n)))[d.rank * bs:(d.rank + 1) * bs]
                bco.active = active = bool(idx)
                loss, _, margins, ts = self._forward_loss(self.eval_data, idx or [0], "eval", bco)
                if active:
                    tsums += ts.cpu()
                    sums += torch.tensor([float(loss) * len(idx), float(margins.double().sum()),
                                          int((margins > 0).sum()), int((margins < 0).sum())],
                                         dtype=torch.float64)
        self.model.train()
        (loss_sum, margin_sum, right, wrong), tsums = d.all_reduce(sums).tolist(), d.all_reduce(tsums)
        right, wrong = int(right), int(wrong)
        # Sums divided once: an accuracy of 160/160 reads 1.0, not 0.9999999999999999.
        return ({"eval/loss": loss_sum / n, "eval/rewards/accuracies": right / n,
                 "eval/rewards/margins": margin_sum / n, **averages(tsums, "eval/")}, right, wrong)

    def _evaluate_and_check(self, step: int) -> dict:
        """The eval/* metrics of the current weights, with the flags they raise under "flags"."""
        ev, right, wrong = self._evaluate()
        if not ev:
            return {}
        flags = self.monitor.observe_eval(step, ev["eval/loss"], right, right + wrong)
        self._announce(flags)
        return {**ev, "flags": [f.name for f in flags]}

    # -- checkpoints -----------------------------------------------------------------------------
    def _new_bco(self, mean: float = 0.0, count: int = 0) -> BCOState:
        # Under several ranks, BCO's running reward mean takes in every rank's rewards.
        return (GlobalBCOState if self.dist.enabled else BCOState)(mean, count)

    def _trainer_state(self) -> dict:
        """What a checkpoint holds besides the model, the optimizer and the RNG states."""
        return {"format": FORMAT, "run_id": self.run_id, "step": self.step, "position": self.position,
                "scheduler": self.scheduler.state_dict(), "monitor": self.monitor.state_dict(),
                "bco": {"mean": self.bco.mean, "count": self.bco.count},
                "ref_cache": self.ref_cache, "config": self.config.to_dict(),
                "fingerprints": self.fingerprints}

    def save(self) -> None:
        if self.dist.enabled:  # every rank its shards (sharded.py)
            sharded.save(self.out, self.dist, self.model, self.optimizer, self._trainer_state(),
                         adapters_only=self.lora)
            return
        save_checkpoint(self.out / CKPT, {
            **self._trainer_state(),
            "model": lora.adapter_state(self.model) if self.lora else self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    # dropout on a GPU draws from the CUDA generators
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        })

    def _load(self, s: dict, target: Path | None = None) -> None:
        """Restore checkpoint `s`: a single-process one, or the trainer state of the sharded one in
        `target`, whose model and optimizer shards and this rank's RNG states are read here."""
        if target is not None:
            rng = sharded.load(target, self.dist, self.model, self.optimizer, adapters_only=self.lora)
        else:
            if self.lora:
                lora.load_adapter_state(self.model, s["model"])
            else:
                self.model.load_state_dict(s["model"])
            self.optimizer.load_state_dict(s["optimizer"])
            rng = s["rng"]
        self.scheduler.load_state_dict(s["scheduler"])
        self.monitor.load_state_dict(s["monitor"])
        self.bco = self._new_bco(s["bco"]["mean"], s["bco"]["count"])
        self.run_id, self.step, self.position = s["run_id"], s["step"], s["position"]
        self.ref_cache = s["ref_cache"]
        if self.config.reference == "precomputed":  # the log-probs came with the checkpoint
            self.ref_model = self.ref_logps = self.ref_module = None
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(_as_tuples(rng["python"]))
        cuda = rng.get("cuda") or []  # absent in older checkpoints
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])

    # -- starting and resuming -------------------------------------------------------------------
    def _start(self, overwrite: bool) -> None:
        d = self.dist
        found = rundir.check_fresh(self.out, overwrite)
        d.barrier()  # every rank has checked before rank 0 writes
        # Nothing was written before this point.
        self.run_id = d.broadcast(uuid.uuid4().hex[:12])
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for p in rundir.temporaries(self.out):
                rundir.remove(p)
            if found:
                print(f"--overwrite: replacing the run in {self.out}")
                rundir.clear(self.out)
            rundir.write_run_json(self.out, {"run_id": self.run_id, "sources": self.sources,
                                              "reference": self.ref_source,
                                              **({"lora": self.adapters} if self.lora else {}),
                                              **self._shape(), "fingerprints": self.fingerprints,
                                              "resumes": [], **self.run_json_extra})
            atomic_write_text(self.out / rundir.CONFIG, json.dumps(self.config.to_dict(), indent=2) + "\n")
            atomic_write_text(self.out / rundir.METRICS, "")
        d.barrier()
        # Dropout, if enabled, is the only randomness in a step: each rank its own stream.
        torch.manual_seed(self.config.seed + d.rank)
        random.seed(self.config.seed + d.rank)
        if d.enabled:
            cfg = self.config
            self._print(f"{cfg.parallel} on {d.world} ranks: global batch {self.global_batch_size} "
                        f"pairs per step = {cfg.batch_size} per rank x {d.world} ranks x "
                        f"{cfg.gradient_accumulation_steps} accumulation steps")
        self._announce(self.monitor.check_config(self.global_batch_size))
        if self.config.reference == "precomputed":
            self.precompute_reference()

    def _shape(self) -> dict:
        """How the run is spread over processes (run.json; a resume must match it)."""
        return {"parallel": self.dist.parallel, "world_size": self.dist.world} if self.dist.enabled else {}

    def _resume(self) -> None:
        d = self.dist
        rundir.check_output_dir(self.out)
        run_json = self.out / rundir.RUN
        target = None
        if d.enabled:
            target = sharded.latest(self.out)
            if target is None and (self.out / CKPT).exists():
                raise ValueError(f"--resume: {self.out} holds a single-process run "
                                 f"({CKPT}); resume it without --parallel")
            found = target is not None
        else:
            found = (self.out / CKPT).exists()
            if not found and sharded.latest(self.out) is not None:
                run = rundir.read_run_json(self.out)
                raise ValueError(f"--resume: {self.out} holds a run sharded over "
                                 f"{run.get('world_size', '?')} ranks ({run.get('parallel', '?')}); "
                                 f"resume it with torchrun --nproc-per-node {run.get('world_size', '?')}"
                                 f" ... --parallel {run.get('parallel', '?')}")
        if not found and run_json.exists():
            raise ValueError(f"--resume: {self.out} holds a run that stopped before its first "
                             f"checkpoint (save_steps={self.config.save_steps}); there is nothing to "
                             f"resume: start it again with --overwrite")
        if target is not None:
            s = sharded.read_trainer_state(target, self.device)
        else:
            s = load_checkpoint(self.out / CKPT, self.device)
        run = rundir.read_run_json(self.out)
        allowed = check_resumable(s, run, self.config.to_dict(), self.fingerprints,
                                  check_reference=self.config.reference == "model",
                                  sources=self.sources)
        if d.enabled and s["world_size"] != d.world:
            raise ValueError(f"--resume: the run was trained on {s['world_size']} ranks, this job has "
                             f"{d.world}; the global batch, each rank's data and its RNG states "
                             f"depend on it: resume with torchrun --nproc-per-node {s['world_size']}")
        kept, note = rundir.read_metrics(self.out / rundir.METRICS, s["step"])
        d.barrier()  # every rank has checked before rank 0 writes
        # Every check passed: the writes start here.
        if d.main:
            for p in rundir.temporaries(self.out):
                print(f"removed {p.name}, left by a save that was killed")
                rundir.remove(p)
            for p in sharded.leftovers(self.out):
                print(f"removed {p.relative_to(self.out)}, left by a save that was killed")
                shutil.rmtree(p)
            atomic_write_text(self.out / rundir.METRICS, "".join(kept))
            if note:
                print(note)
            print(f"resuming at step {s['step']}"
                  + (f"; changed: {describe_changes(allowed)}" if allowed else ""))
            run["resumes"].append({"step": s["step"], "changed": allowed})  # every resume
            rundir.write_run_json(self.out, run)
            if allowed:
                atomic_write_text(self.out / rundir.CONFIG,
                                  json.dumps(self.config.to_dict(), indent=2) + "\n")
        d.barrier()
        self._load(s, target)

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume: bool = False, progress: bool = True, until_step: int | None = None,
              overwrite: bool = False) -> dict:
        """Run to the configured length (or stop after `until_step`, checkpointed, to resume later).

        A fresh run refuses a directory that holds another run unless `overwrite`; `resume`
        continues the run in the directory after checking that the checkpoint is its own and that
        the config (but for RESUMABLE_CHANGES), the data and the reference are the same."""
        cfg = self.config
        if resume:
            self._resume()
        else:
            self._start(overwrite)
        total = self.total_steps()
        end = total if until_step is None else min(total, until_step)
        bar = _progress(total, self.step, progress and self.dist.main)
        self.tracker = trackers.open_tracker(cfg, self.out, self.step, self.dist.main)
        stopped = None
        try:
            # Rank 0 alone writes the log (the others' metrics are the same global numbers).
            with (open(self.out / rundir.METRICS, "a") if self.dist.main else _NoLog()) as log:
                while self.step < end and stopped is None:
                    step = self.step
                    ev = self._evaluate_and_check(step) if step % cfg.eval_steps == 0 else {}
                    m = self.train_step()
                    row = {**(m or {"step": step}), **ev, "flags": (m or {}).get("flags", []) +
                           ev.get("flags", [])}
                    if (m is not None and step % cfg.logging_steps == 0) or ev or row["flags"]:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        self.tracker.log(row)
                    if m is not None:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", margin=f"{m['rewards/margins']:.2f}",
                                        acc=f"{m['rewards/accuracies']:.2f}")
                    bar.update(1)
                    if self.monitor.bad_in_a_row >= cfg.max_bad_steps:
                        stopped = (f"training stopped at step {step}: {self.monitor.bad_in_a_row} "
                                   f"NaN/inf losses in a row (max_bad_steps={cfg.max_bad_steps})")
                        self._print(stopped)
                    elif self.step % cfg.save_steps == 0 or self.step == end:
                        if self.dist.main:
                            os.fsync(log.fileno())  # the log is never behind the checkpoint
                        self.save()
                        if cfg.save_model and self.step < total:
                            export.save_model(self)
                if self.step == total and stopped is None:
                    ev = self._evaluate_and_check(self.step)
                    if ev:
                        print(json.dumps({"step": self.step, **ev}), file=log, flush=True)  # for the card
                        self.tracker.log({"step": self.step, **ev})
                    export.save_model(self)  # output_dir/model/: the final weights
        finally:
            bar.close()
            self.tracker.close()
        return self.finish(stopped)

    def finish(self, stopped: str | None) -> dict:
        d = self.dist
        distributed.reshard(self.policy_module, self.ref_module)
        state = model_state_bytes([self.model, self.ref_model], self.optimizer)
        per_rank = d.gather(state)  # a collective: before rank 0 goes its own way
        if not d.main:
            # Wait for rank 0's files: a rank that returned (and exited, with code 3 after an
            # early stop) now would make torchrun stop rank 0 half-way through writing them.
            d.barrier()
            return {"steps": self.step, "flags": [f.name for f in self.monitor.flags], "stopped": stopped,
                    "model_state_bytes": state, "model_state_bytes_per_rank": per_rank}
        try:
            return write_report(self, stopped, state, per_rank)
        finally:
            d.barrier()

    def _print(self, *args) -> None:
        if self.dist.main:  # one voice for the job
            print(*args)

    def _announce(self, flags) -> None:
        for f in flags:
            self._print(f"[health] step {f.step}: {f.name}: {f.message}")


def _call(module, batch, head: str) -> LogpsStats:
    """A LogpsModule (or its DDP/FSDP2 wrapper) on one [chosen; rejected] batch."""
    return module(batch["input_ids"], batch["attention_mask"], batch["response_mask"], head=head)


class _NoLog:
    """The metrics log of a rank other than 0: writes nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def fileno(self) -> int | None:
        return None


def _as_tuples(x):
    """random.setstate wants the tuples that the checkpoint's loader may hand back as lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


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
