"""`fused-dpo train`: every DPOConfig field is a flag (`--max-steps 4 --beta 0.1`).

Where a value comes from, later wins: DPOConfig's defaults, then (with --resume) the run's own
config.json, then --config FILE, then the preset, then the flags. Every error is one line,
`error: ...` on stderr, exit code 2, and nothing is written.

Under torchrun (`torchrun --nproc-per-node N -m fused_dpo train --parallel ddp|fsdp2 ...`) every rank
runs this same command; rank 0 alone prints, and an error names the rank that raised it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
import types
import typing
from pathlib import Path

import torch

from ..cli import ArgumentParser
from . import rundir
from .config import PRESETS, DPOConfig, read_config_file

DEFAULT_OUTPUT = Path(DPOConfig().output_dir)
DEFAULT_SOURCES = {"model": "tiny", "data": "synthetic"}
_WORD = {int: "an integer", float: "a number", str: "a string"}


def _parse_value(field: dataclasses.Field, text: str):
    hint = typing.get_type_hints(DPOConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if optional and text.lower() in ("none", "null"):
        return None
    base = args[0] if args and (optional or isinstance(hint, types.UnionType)) else hint
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    inner = typing.get_args(base)[0] if typing.get_origin(base) is list else None
    try:
        if inner is not None:
            return [inner(x) for x in text.split(",") if x]
        return base(text)
    except ValueError:
        what = f"a comma-separated list of {_WORD[inner][2:]}s" if inner else _WORD[base]
        none = " or none" if optional else ""
        raise argparse.ArgumentTypeError(f"expected {what}{none}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="fused-dpo train", description="Train a causal LM with DPO.")
    ap.add_argument("--config", help="JSON or TOML file of DPOConfig fields (flags override it)")
    ap.add_argument("--model", default=None,
                    help="tiny | smollm2 | PATH to a local HF checkpoint (default tiny; on --resume, "
                         "the run's)")
    ap.add_argument("--data", default=None,
                    help="synthetic | zen | FILE.jsonl (default synthetic; on --resume, the run's)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in OUTPUT_DIR (default: the latest runs/default-N) from "
                         "its checkpoint, with its config; only max_steps, num_epochs and the "
                         "logging, eval and save cadence may change")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the run in an existing --output-dir (refused without this)")
    ap.add_argument("--preset", choices=["margin-explosion"],
                    help="margin-explosion: the failing configuration next to the fixed one (your "
                         "flags apply to both)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    defaults = DPOConfig().to_dict()
    for f in dataclasses.fields(DPOConfig):
        extra = ("; without this flag a new run goes to the first free one of runs/default, "
                 "runs/default-2, ..." if f.name == "output_dir" else "")
        ap.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None,
                        metavar="VALUE", type=lambda s, f=f: _parse_value(f, s),
                        help=f"DPOConfig.{f.name} (default {defaults[f.name]}{extra})")
    return ap


_NEGATIVE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--learning-rate -1e-3` -> `--learning-rate=-1e-3`: argparse reads "-1e-3" as an option."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def _say(*args) -> None:
    """print, on rank 0 only under torchrun (before the process group exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args)


def _flags(args) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def _plan(args) -> list[tuple[str | None, DPOConfig, dict]]:
    """(preset name, config, sources) of each run this command makes, checked before any write."""
    file_cfg = read_config_file(args.config) if args.config else {}
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
        sources.update({k: getattr(args, k) for k in ("model", "data") if getattr(args, k)})
        if not args.resume:
            rundir.check_fresh(out, args.overwrite)
        plans.append((name, cfg, sources))
    return plans


def run(args, cfg: DPOConfig, sources: dict) -> dict:
    from . import distributed
    from .data import load_rows, row_texts
    from .models import load_model
    from .trainer import DPOTrainer

    d = distributed.setup(cfg.parallel)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = load_rows(sources["data"], seed=cfg.seed)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(len(rows) * cfg.eval_fraction)
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    model, tok = load_model(sources["model"], row_texts(rows), cfg.seed, precision=cfg.precision,
                            say=_say)
    if torch.cuda.is_available():
        model = model.to(d.device)
    _say(f"model {sources['model']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters; data {sources['data']}: {len(train_rows)} train / {len(eval_rows)} held-out "
          f"pairs; output {cfg.output_dir}")
    trainer = DPOTrainer(model, None, tok, train_rows, eval_rows or None, cfg, sources=sources, dist=d)
    result = trainer.train(resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if d.main:
        _summary(result, Path(cfg.output_dir))
    d.barrier()  # no rank exits (torchrun would then stop the others) before the summary is out
    return result


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
        args = build_parser().parse_args(_join_negative_values(argv))
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
