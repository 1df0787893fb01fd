"""`fused-dpo train`: every DPOConfig field is a flag (`--max-steps 4 --beta 0.1`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import types
import typing
from pathlib import Path

import torch

from .config import PRESETS, DPOConfig


def _parse_value(field: dataclasses.Field, text: str):
    hint = typing.get_type_hints(DPOConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if optional and text.lower() in ("none", "null"):
        return None
    base = args[0] if args and (optional or isinstance(hint, types.UnionType)) else hint
    origin = typing.get_origin(base)
    if origin is list:
        (inner,) = typing.get_args(base)
        return [inner(x) for x in text.split(",") if x]
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"--{field.name.replace('_', '-')}: expected true/false")
        return text.lower() in ("true", "1", "yes")
    return base(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fused-dpo train", description="Train a causal LM with DPO.")
    ap.add_argument("--config", help="JSON or TOML file of DPOConfig fields (flags override it)")
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | PATH to a local HF checkpoint")
    ap.add_argument("--data", default="synthetic", help="synthetic | zen | FILE.jsonl")
    ap.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    ap.add_argument("--preset", choices=["margin-explosion"],
                    help="margin-explosion: the failing configuration next to the fixed one")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    defaults = DPOConfig().to_dict()
    for f in dataclasses.fields(DPOConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None,
                        metavar="VALUE", type=lambda s, f=f: _parse_value(f, s),
                        help=f"DPOConfig.{f.name} (default {defaults[f.name]})")
    return ap


def _config(args, overrides: dict | None = None) -> DPOConfig:
    d = DPOConfig.from_file(args.config).to_dict() if args.config else {}
    d.update(overrides or {})
    d.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None})
    return DPOConfig.from_dict(d)


def run(args, cfg: DPOConfig) -> dict:
    from ..train.data import load_rows, row_texts
    from .models import load_model
    from .trainer import DPOTrainer

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = load_rows(args.data, seed=cfg.seed)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(len(rows) * cfg.eval_fraction)
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    model, tok = load_model(args.model, row_texts(rows), cfg.seed)
    if torch.cuda.is_available():
        model = model.cuda()
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"data {args.data}: {len(train_rows)} train / {len(eval_rows)} held-out pairs; "
          f"output {cfg.output_dir}")
    trainer = DPOTrainer(model, None, tok, train_rows, eval_rows or None, cfg)
    result = trainer.train(resume=args.resume, progress=not args.no_progress)
    _summary(result, Path(cfg.output_dir))
    return result


def _summary(result: dict, out: Path) -> None:
    ev = result["eval"]
    acc = f"{ev['eval/rewards/accuracies']:.3f}" if ev else "n/a"
    print(f"done: {result['steps']} steps; held-out preference accuracy {acc}; "
          f"health flags: {', '.join(sorted(set(result['flags']))) or 'none'}")
    print(f"run directory: {out} (metrics.jsonl, curves.png, health.md, config.json, checkpoint.pt)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.preset == "margin-explosion":
            base = _config(args)
            results = {}
            for name in ("margin-explosion", "margin-explosion-fixed"):
                over = dict(PRESETS[name], output_dir=str(Path(base.output_dir) / name))
                cfg = DPOConfig.from_dict({**base.to_dict(), **over})
                print(f"== {name}: " + json.dumps({k: v for k, v in PRESETS[name].items()}))
                results[name] = run(args, cfg)
            bad, good = results["margin-explosion"], results["margin-explosion-fixed"]
            print(f"failing configuration flagged: {sorted(set(bad['flags'])) or 'nothing'}; "
                  f"fixed configuration flagged: {sorted(set(good['flags'])) or 'nothing'}")
            return 0
        result = run(args, _config(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 3 if result["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
