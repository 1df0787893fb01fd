"""`fused-dpo train`: every DPOConfig field is a flag (`--max-steps 4 --beta 0.1`).

Where a value comes from, later wins: DPOConfig's defaults, then (with --resume) the run's own
config.json, then --config FILE, then the preset, then the flags. Every error is one line,
`error: ...` on stderr, exit code 2, and nothing is written.

Under torchrun (`torchrun --nproc-per-node N -m fused_dpo train --parallel ddp|fsdp2 ...`) every rank
runs this same command; rank 0 alone prints, and an error names the rank that raised it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from pathlib import Path

import torch

from .._argparse import ArgumentParser
from . import plan, rundir, trackers
from .config import PRESETS, DPOConfig, read_config_file
from .flags import add_config_flags, join_negative_values

DEFAULT_OUTPUT = Path(DPOConfig().output_dir)
# Where the model and the data come from (run.json's "sources": a resume finds them there).
DEFAULT_SOURCES = {"model": "tiny", "revision": None, "data": "synthetic", "data_config": None,
                   "data_split": None, "eval_data": None, "eval_split": None}
SOURCE_FLAGS = tuple(DEFAULT_SOURCES)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="fused-dpo train", description="Train a causal LM with DPO.")
    ap.add_argument("--config", help="JSON, TOML or YAML file of DPOConfig fields, or of the keys TRL's "
                                     "`trl dpo --config` reads (model_name_or_path, dataset_name, "
                                     "per_device_train_batch_size, ...: fused_dpo/train/trl_config.py; "
                                     "keys it leaves out keep these defaults); flags override it")
    ap.add_argument("--model", default=None,
                    help="tiny | smollm2 | PATH to a local HF checkpoint | a hub id such as "
                         "Qwen/Qwen2.5-0.5B-Instruct, at --revision (offline: from the HF cache) "
                         "(default tiny; on --resume, the run's)")
    ap.add_argument("--data", default=None,
                    help="synthetic | zen | FILE (.json, .jsonl, .parquet, .csv) | a folder "
                         "(Dataset.save_to_disk, or of data files) | a hub dataset id (offline: from "
                         "the HF cache); rows in TRL's formats: prompt/chosen/rejected, text or chat "
                         "messages, the prompt explicit or shared by chosen and rejected (default "
                         "synthetic; on --resume, the run's)")
    ap.add_argument("--revision", default=None,
                    help="the model's hub revision (branch, tag or commit) when --model is a hub id")
    ap.add_argument("--data-config", default=None, help="the hub dataset's configuration (name)")
    ap.add_argument("--data-split", default=None, help="the split of --data to train on (default train)")
    ap.add_argument("--eval-data", default=None,
                    help="a held-out set, in any form --data takes (default: eval_fraction of --data)")
    ap.add_argument("--eval-split", default=None,
                    help="the split of --data (or --eval-data) to evaluate on, e.g. test")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in OUTPUT_DIR (default: the latest runs/default-N) from "
                         "its checkpoint, with its config; only max_steps, num_epochs, the "
                         "logging, eval and save cadence, --report-to, --save-model and "
                         "--merge-lora may change")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the run in an existing --output-dir (refused without this)")
    ap.add_argument("--preset", choices=["margin-explosion"],
                    help="margin-explosion: the failing configuration next to the fixed one (your "
                         "flags apply to both)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (it is drawn only when stdout and stderr are a terminal)")
    add_config_flags(ap)
    return ap


def _say(*args) -> None:
    """print, on rank 0 only under torchrun (before the process group exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args)


def _flags(args) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def _plan(args) -> list[tuple[str | None, DPOConfig, dict]]:
    """(preset name, config, sources) of each run this command makes, checked before any write."""
    from .trl_config import split

    # the file's fields, and its model and data when it names them (TRL's keys)
    file_cfg, file_sources = split(read_config_file(args.config), args.config) if args.config else ({}, {})
    flags = _flags(args)
    explicit = flags.get("output_dir", file_cfg.get("output_dir"))
    if explicit is not None and not str(explicit).strip():  # Path("") is ".", the current directory
        raise ValueError("output_dir must not be empty (it would write into the current directory)")
    base = Path(explicit) if explicit is not None else (
        rundir.latest(DEFAULT_OUTPUT) if args.resume else rundir.next_free(DEFAULT_OUTPUT))
    if explicit is None and base != DEFAULT_OUTPUT and not args.resume:
        _say(f"{DEFAULT_OUTPUT} holds an earlier run: this one goes to {base}")
    names = ["margin-explosion", "margin-explosion-fixed"] if args.preset else [None]
    plans = []
    for name in names:
        out = base / name if name else base
        layers = [DPOConfig().to_dict()]
        sources = dict(DEFAULT_SOURCES)
        if args.resume:
            rundir.check_output_dir(out)
            layers.append(read_config_file(out / rundir.CONFIG) if (out / rundir.CONFIG).exists() else {})
            sources.update(rundir.read_run_json(out)["sources"])
        layers += [file_cfg, PRESETS[name] if name else {}, flags, {"output_dir": str(out)}]
        if name:
            kept = {k: v for k, v in flags.items() if k in PRESETS[name] and v != PRESETS[name][k]}
            if kept:
                _say(f"--preset {name}: your " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                           for k, v in kept.items())
                      + " replaces the preset's value")
        cfg = DPOConfig.from_dict({k: v for layer in layers for k, v in layer.items()})
        sources.update(file_sources)  # above the resumed run's and the defaults, below the flags
        sources.update({k: getattr(args, k) for k in SOURCE_FLAGS if getattr(args, k)})
        check_sources(sources)
        trackers.check_available(cfg.report_to)  # a missing library, before the run dir is written
        if not args.resume:
            rundir.check_fresh(out, args.overwrite)
        plans.append((name, cfg, sources))
    cfg = plans[0][1]
    if cfg.max_steps is not None and cfg.num_epochs is not None:
        _say(f"max_steps {cfg.max_steps} and num_epochs {cfg.num_epochs} are both set: max_steps wins "
             f"(as in transformers' Trainer and TRL)")
    return plans


# The files a transformers tokenizer is read from (AutoTokenizer.from_pretrained): at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "merges.txt", "tekken.json", "*.model", "*.tiktoken")


def check_sources(sources: dict) -> None:
    """--model and --data name something that exists and is of the right kind, said before any
    model is loaded or file written (transformers' own errors for an empty folder or one without
    a tokenizer are "Unrecognized model" and "install sentencepiece or tiktoken"). A --model that
    is no local path but a hub id (`org/name`) is resolved by transformers: offline, it must be in
    the local HF cache."""
    from . import sources as where

    where.check_data(sources)
    model, revision = sources["model"], sources.get("revision")
    where.check_revision(model, revision)
    if model in where.BUILTIN_MODELS:
        return
    if where.hub_id(model):
        where.check_hub_model(model, revision)
        return
    p = Path(model)
    save = "(a folder written by model.save_pretrained and tokenizer.save_pretrained)"
    if not p.exists():
        raise ValueError(f"--model {model}: no such directory; --model is tiny, smollm2, a local "
                         f"transformers checkpoint directory or a hub id (org/name)")
    if not p.is_dir():
        raise ValueError(f"--model {model} is a file; a transformers checkpoint is a directory "
                         f"(config.json, the weights, the tokenizer files) {save}")
    if not any(p.iterdir()):
        raise ValueError(f"--model {model} is an empty directory, not a transformers checkpoint {save}")
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise ValueError(f"--model {model} holds LoRA adapters (adapter_config.json), not a whole "
                             f"model: train on their base model, or export merged weights with "
                             f"--merge-lora true")
        raise ValueError(f"--model {model} has no config.json: not a transformers checkpoint {save}")
    if not any(any(p.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ValueError(f"--model {model} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                         f"save the tokenizer beside the model (tokenizer.save_pretrained)")


def run(args, cfg: DPOConfig, sources: dict) -> dict:
    from . import distributed
    from .data import pad_id, row_texts
    from .hf import progress_bars
    from .models import load_model
    from .sources import load_pairs
    from .trainer import DPOTrainer

    d = distributed.setup(cfg.parallel)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # A bar redrawn with \r is a terminal's: in a log file (`make run > log`) it is one long line.
    # transformers' and datasets' own bars (loading weights, reading data) follow ours.
    progress = not args.no_progress and sys.stdout.isatty() and sys.stderr.isatty()
    train_rows, eval_rows, rows = load_pairs(sources, cfg.seed, cfg.eval_fraction, progress)
    with progress_bars(progress):
        model, tok = load_model(sources["model"], row_texts(rows), cfg.seed,
                                precision=cfg.precision, say=_say, dtype=cfg.dtype,
                                load_in_4bit=cfg.load_in_4bit, revision=sources.get("revision"))
    pad_id(tok)  # a tokenizer with neither pad nor EOS is refused here, before the run directory
    if torch.cuda.is_available():
        model = model.to(d.device)
    from .lora import weights

    _say(f"model {sources['model']}: {sum(weights(p) for p in model.parameters()) / 1e6:.2f}M "
          f"parameters; data {sources['data']}: {len(train_rows)} train / {len(eval_rows)} held-out "
          f"pairs; output {cfg.output_dir}")
    trainer = DPOTrainer(model, None, tok, train_rows, eval_rows or None, cfg, sources=sources, dist=d)
    trainer.run_json_extra = plan.announce(trainer, _say)  # the predicted peak, into run.json
    try:
        with _cpu_threads_for(model):
            result = trainer.train(resume=args.resume, progress=progress, overwrite=args.overwrite)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(trainer, args)) from None
    if d.main:
        _summary(result, Path(cfg.output_dir))
    d.barrier()  # no rank exits (torchrun would then stop the others) before the summary is out
    return result


# Below this many parameters a CPU run trains on one intra-op thread: each op is then a few
# microseconds of work between OpenMP barriers, and with another job holding a core the second
# thread stalls every barrier. Measured on 2 cores with a pinned busy process: the default tiny
# run (0.11M) took 379 s on torch's 2 threads, 58.6 s with OMP_NUM_THREADS=1 (issue 20).
_ONE_THREAD_PARAMS = 50_000_000


def _cpu_threads_for(model):
    """One torch thread for training a small model on the CPU, restored afterwards; unchanged on
    a GPU, for a larger model, or when the user set OMP_NUM_THREADS."""
    from .._common import intra_op_threads

    on_cpu = next(model.parameters()).device.type == "cpu"
    small = sum(p.numel() for p in model.parameters()) < _ONE_THREAD_PARAMS
    if not (on_cpu and small) or "OMP_NUM_THREADS" in os.environ:
        return contextlib.nullcontext()
    return intra_op_threads(1)


class Interrupted(Exception):
    """Ctrl-C during training, after the report of what ran was written; the message says so."""


def _interrupted(trainer, args) -> str:
    """After Ctrl-C: health.md and curves.png for the steps that ran (single process: under
    torchrun the other ranks may be gone, and the report's collectives would wait for them), and
    the line that says where the run stands and how to continue it."""
    out = trainer.out
    started = trainer.run_id is not None  # set once the run's directory is its own (or resumed)
    where = f"interrupted at step {trainer.step}" if started else "interrupted before training started"
    if started and not trainer.dist.enabled and (out / rundir.METRICS).exists():
        trainer.finish(f"{where} (Ctrl-C)")
    last = rundir.last_checkpoint_step(out)
    if last is None and not started:
        return f"{where}; nothing was written to {out}"
    if last is None:
        return (f"{where}; no checkpoint yet (save_steps {trainer.config.save_steps}): "
                f"`--overwrite --output-dir {out}` starts the run again")
    alone = args.preset is None and out.resolve() == rundir.latest(DEFAULT_OUTPUT).resolve()
    resume = "--resume" if alone else f"--resume --output-dir {out}"  # what `--resume` alone finds
    return f"{where}; last checkpoint step {last}; `{resume}` continues"


def _summary(result: dict, out: Path) -> None:
    ev = result["eval"]
    acc = f"{ev['eval/rewards/accuracies']:.3f}" if ev else "n/a"
    print(f"done: {result['steps']} steps; held-out preference accuracy {acc}; "
          f"health flags: {', '.join(sorted(set(result['flags']))) or 'none'}")
    files = [name for name in rundir.RUN_FILES if (out / name).exists()]
    print(f"run directory: {out} ({', '.join(files)})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(join_negative_values(argv))
        plans = _plan(args)
        results = {}
        for name, cfg, sources in plans:
            if name:
                _say(f"== {name}: " + json.dumps(PRESETS[name]))
            results[name] = run(args, cfg, sources)
        if args.preset:
            bad, good = results["margin-explosion"], results["margin-explosion-fixed"]
            _say(f"failing configuration flagged: {sorted(set(bad['flags'])) or 'nothing'}; "
                  f"fixed configuration flagged: {sorted(set(good['flags'])) or 'nothing'}")
            return 0
    except Interrupted as e:
        _say(str(e))
        return 130  # the shell's code for a command ended by SIGINT
    except KeyboardInterrupt:
        _say("interrupted before training started")
        return 130
    except (ValueError, OSError) as e:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        where = f"rank {rank}: " if rank is not None else ""
        print(f"error: {where}" + " ".join(str(e).split()), file=sys.stderr)
        if rank is not None:
            # for torchrun's failure summary, which otherwise shows only the exit code here (and
            # the other ranks' lost connections)
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(e)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 3 if results[None]["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
