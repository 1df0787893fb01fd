"""The run directory: what lives in it, starting a run there without destroying another one, and
reading its metrics log back on resume (repairing a last line torn by a kill).

Every check here runs before the first write, so a refused run leaves the directory as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoint import CKPT, atomic_write_text, checkpoint_step, tmp_path

METRICS, CONFIG, RUN = "metrics.jsonl", "config.json", "run.json"
SHARDED = "checkpoint.dcp"  # the folder of a distributed run's sharded checkpoints (sharded.py)
TENSORBOARD = "tensorboard"  # the event files of --report-to tensorboard (trackers.py)
MODEL = "model"  # the trained model, as save_pretrained writes it (export.py)
# The checkpoints come first: `clear` deletes in this order, so a run replaced by --overwrite and
# killed half-way can never leave the old model beside the new run's config and metrics.
RUN_FILES = (CKPT, SHARDED, MODEL, METRICS, CONFIG, RUN, "health.md", "curves.png", TENSORBOARD)


def check_output_dir(out: Path) -> None:
    """`out` is, or can be created as, a writable directory."""
    p = out
    while not p.exists() and p.parent != p:  # the nearest existing path: out or an ancestor
        p = p.parent
    if not p.is_dir():
        where = "is a file" if p == out else f"lies under {p}, which is a file"
        raise ValueError(f"output_dir {out} {where}, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):  # also EROFS on a read-only filesystem, even for root
        raise ValueError(f"output_dir {out}: {p} is not writable")


def check_fresh(out: Path, overwrite: bool) -> list[str]:
    """A new run may start in `out`: it holds no run, or `overwrite` says to replace it. Returns
    the run files found (to be cleared)."""
    check_output_dir(out)
    found = run_files(out)
    if found and not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(found)}): --resume continues it, "
                         f"--overwrite replaces it, or choose another --output-dir")
    return found


def run_files(out: Path) -> list[str]:
    """The run files present in `out`."""
    return [name for name in RUN_FILES if (out / name).exists()]


def temporaries(out: Path) -> list[Path]:
    """Leftovers of atomic writes killed half-way (`.checkpoint.pt.tmp-PID`, `.model.tmp-PID/`);
    `remove` deletes one, file or folder."""
    if not out.is_dir():
        return []
    return sorted(p for name in RUN_FILES for p in out.glob(f".{name}.tmp-*"))


def remove(p: Path) -> None:
    """Delete a leftover: a file, or a folder whole."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def clear(out: Path) -> None:
    """Delete a previous run's files (only those: anything else in the folder is left alone)."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            # Renamed first: a kill inside rmtree leaves a leftover (`temporaries`), not half a
            # model/ or a LATEST naming half-deleted shards.
            aside = tmp_path(p)
            os.replace(p, aside)
            shutil.rmtree(aside)
        else:
            p.unlink(missing_ok=True)


def last_checkpoint_step(out: Path) -> int | None:
    """The step of the newest complete checkpoint of the run in `out` (single-process or sharded),
    or None when it has none (or only a damaged one)."""
    from . import sharded

    try:
        target = sharded.latest(out)
    except ValueError:  # LATEST names a folder that is not whole
        target = None
    if target is not None:
        return int(target.name.removeprefix("step-"))
    return checkpoint_step(out / CKPT)


def numbered(base: Path, n: int) -> Path:
    """base, base-2, base-3, ..."""
    return base if n == 1 else base.with_name(f"{base.name}-{n}")


def next_free(base: Path) -> Path:
    n = 1
    while numbered(base, n).exists():
        n += 1
    return numbered(base, n)


def latest(base: Path) -> Path:
    """The highest-numbered existing base-N (base itself when none is numbered)."""
    n = 1
    while numbered(base, n + 1).exists():
        n += 1
    return numbered(base, n)


def read_metrics(path: Path, before_step: int) -> tuple[list[str], str | None]:
    """The metrics rows (as lines) for steps < before_step, and a note when a torn last line, the
    trace of a write cut by a kill, was dropped. Damage anywhere else is an error."""
    if not path.is_file():
        raise ValueError(f"--resume: {path} is missing; the run directory is incomplete "
                         f"(start again with --overwrite)")
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    tail = lines.pop()  # what follows the last newline: "" unless the last write was cut
    note = None
    if tail.strip():
        try:
            complete = isinstance(json.loads(tail), dict)
        except json.JSONDecodeError:
            complete = False
        if complete:
            lines.append(tail)  # the row was written whole; only its newline was lost
        else:
            note = (f"{path}: dropped a torn last line ({len(tail)} characters; the run was "
                    f"interrupted while writing it)")
    kept = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); only a torn last line can be "
                             f"repaired") from None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            raise ValueError(f"{path}:{i}: not a metrics row (no integer 'step')")
        if row["step"] < before_step:
            kept.append(ln + "\n")
    return kept, note


def read_run_json(out: Path) -> dict:
    """The run's identity: run id, sources (model, data), reference, fingerprints, resumes."""
    path = out / RUN
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume: {path} is missing; the run directory is incomplete") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {path} is unreadable ({e})") from None
    if not (isinstance(run, dict) and {"run_id", "sources", "reference", "resumes"} <= set(run)):
        raise ValueError(f"--resume: {path} is not a run description of this trainer")
    return run


def write_run_json(out: Path, run: dict) -> None:
    atomic_write_text(out / RUN, json.dumps(run, indent=2) + "\n")
