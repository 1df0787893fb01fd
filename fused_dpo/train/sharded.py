"""Sharded checkpoints of a distributed run (torch.distributed.checkpoint), written atomically.

    run/checkpoint.dcp/LATEST        the name of the newest complete checkpoint ("step-000040")
    run/checkpoint.dcp/step-000040/  .metadata and *.distcp: the model and optimizer shards (DCP)
                               trainer.pt   step, data position, scheduler, monitor, BCO state,
                                            reference log-probs, config, fingerprints (rank 0)
                               rng-0.pt ... each rank's RNG states

A checkpoint is complete when LATEST names it. LATEST is replaced (write, fsync, rename) only
after every rank has written and synced its files, so a job killed mid-save leaves the previous
checkpoint as the one LATEST names; the half-written folder is removed by the next save or
resume. Older checkpoints are deleted once LATEST has moved past them.

The model's state is the transformers model's own (HF parameter names), so `load_model_state`
reads it back into a plain model in a single process (for evaluation or export), whatever the
number of ranks that wrote it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from .checkpoint import FORMAT, atomic_write_bytes, atomic_write_text, fsync_path
from .distributed import Dist
from .rundir import SHARDED as DIR  # beside checkpoint.pt of a single-process run; one or the other

LATEST = "LATEST"
TRAINER = "trainer.pt"
# What trainer.pt holds: the single-process checkpoint's keys but the model, the optimizer and the
# RNG states (those are sharded, or per rank), and the run's shape.
KEYS = ("format", "run_id", "step", "position", "scheduler", "monitor", "bco", "ref_cache", "config",
        "fingerprints", "world_size", "parallel")


def _options(adapters_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Under LoRA only the adapters are saved (the frozen base is rebuilt and fingerprinted), and
    # loaded back without the base's keys (strict would ask for them).
    return StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)


def _state_dicts(model, optimizer, adapters_only: bool) -> dict:
    """{"model": ..., "optimizer": ...} as DCP saves and loads them. Under LoRA the model's holds
    exactly the trainable parameters: ignore_frozen_params keeps a 4-bit base's quantisation state
    (absmax, quant_map: not parameters), which belongs to the rebuilt base, not to the checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(adapters_only))
    if adapters_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in trainable}
        if set(msd) != trainable:  # the names differ (a wrapper's prefix): nothing would be saved
            raise ValueError(f"sharded checkpoint: the state dict's names do not match the "
                             f"{len(trainable)} trainable parameters (e.g. {sorted(trainable)[0]!r})")
    return {"model": msd, "optimizer": osd}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save(out: Path, d: Dist, model, optimizer, state: dict, adapters_only: bool) -> Path:
    """Every rank: its model and optimizer shards, its RNG states; rank 0: `state`. Then LATEST."""
    import torch.distributed.checkpoint as dcp

    root = out / DIR
    name = f"step-{state['step']:06d}"
    target = root / name
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a save of this step that was killed before LATEST named it
            shutil.rmtree(target)
    d.barrier()
    dcp.save(_state_dicts(model, optimizer, adapters_only), checkpoint_id=target)  # fsyncs its files
    atomic_write_bytes(target / f"rng-{d.rank}.pt", lambda f: torch.save(_rng_state(), f))
    if d.main:
        atomic_write_bytes(target / TRAINER, lambda f: torch.save(
            {**state, "format": FORMAT, "world_size": d.world, "parallel": d.parallel}, f))
    fsync_path(target)  # the renames into it, too, before LATEST can name it
    d.barrier()  # every rank's files are on disk
    if d.main:
        atomic_write_text(root / LATEST, name + "\n")
        fsync_path(root)
        for p in root.iterdir():
            if p.is_dir() and p.name != name:
                shutil.rmtree(p)
    d.barrier()
    return target


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in `out`, or None when it has none."""
    pointer = out / DIR / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    target = out / DIR / name
    if not name.startswith("step-") or not (target / ".metadata").is_file() \
            or not (target / TRAINER).is_file():
        raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint in "
                         f"{out / DIR}; the run directory is damaged")
    return target


def leftovers(out: Path) -> list[Path]:
    """Checkpoint folders LATEST does not name: saves killed half-way."""
    root = out / DIR
    if not root.is_dir():
        return []
    pointer = root / LATEST
    keep = pointer.read_text().strip() if pointer.is_file() else None
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != keep)


def read_trainer_state(target: Path, device: torch.device) -> dict:
    path = target / TRAINER
    try:
        s = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError or UnpicklingError, by damage
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({e})") from None
    if not isinstance(s, dict) or s.get("format") != FORMAT or not set(KEYS) <= set(s):
        raise ValueError(f"--resume: {path} is not a checkpoint of this trainer")
    return s


def load(target: Path, d: Dist, model, optimizer, adapters_only: bool) -> dict:
    """Load this rank's shards of the model and optimizer from `target`; returns its RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = _state_dicts(model, optimizer, adapters_only)
    dcp.load(sd, checkpoint_id=target)  # every key of sd, or an error
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                   options=_options(adapters_only))
    path = target / f"rng-{d.rank}.pt"
    if not path.is_file():
        raise ValueError(f"--resume: {path} is missing: the checkpoint was written by fewer ranks")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_state(run_dir: str | Path, model: torch.nn.Module) -> int:
    """Read the newest checkpoint of a distributed run into `model` (a plain transformers model of
    the same architecture, in this one process; no process group needed). Under LoRA, `model` is
    the peft model and only its adapters are read. Returns the checkpoint's step."""
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    target = latest(run_dir)
    if target is None:
        raise ValueError(f"{run_dir} holds no sharded checkpoint ({run_dir / DIR / LATEST} is missing)")
    s = read_trainer_state(target, torch.device("cpu"))
    adapters = s["config"].get("lora_r") is not None
    sd = {n: p.detach() for n, p in model.state_dict().items()}
    if adapters:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {n: t for n, t in sd.items() if n in trainable}
    box = {"model": sd}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(box, checkpoint_id=target)  # every key of sd, or an error
    except (CheckpointException, RuntimeError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[-1][:300] if lines else type(e).__name__  # DCP's text ends in the cause
        raise ValueError(f"{target} does not hold this model's weights ({type(model).__name__}): "
                         f"{detail}") from None
    model.load_state_dict(box["model"], strict=False)  # box holds exactly sd's keys, all read
    return s["step"]

