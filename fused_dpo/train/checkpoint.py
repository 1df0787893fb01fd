"""Checkpoints: atomic writes, reading one back with a clear error, and the fingerprints that tie a
checkpoint to its configuration, its data and its reference model.

A checkpoint holds what cannot be rebuilt: the policy weights (under LoRA only the adapters: the
frozen base weights are rebuilt and checked against their fingerprint), the optimizer and scheduler state,
the step and the position in the data stream, the RNG states, the health monitor and BCO state,
the precomputed reference log-probs (reference="precomputed"), the config, the run id and the
fingerprints. It does not hold a frozen reference model: that is rebuilt from its source (a copy of
the initial policy, or the model the caller passes) and checked against its fingerprint on resume.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .config import RESUMABLE_CHANGES

CKPT = "checkpoint.pt"
FORMAT = 2  # bumped when the layout changes; an older checkpoint is refused by name
KEYS = ("format", "run_id", "step", "position", "model", "optimizer", "scheduler", "monitor", "bco",
        "rng", "ref_cache", "config", "fingerprints")


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


class NoSpaceError(OSError):
    """A save that failed for want of disk space, said in one line (torch's own error is a C++
    assertion and a stack trace) with the last checkpoint that is whole."""

    def __str__(self) -> str:
        return self.strerror


def save_checkpoint(path: Path, state: dict) -> None:
    """`state` to `path` atomically: on any failure the previous checkpoint there stays whole.
    A full disk is a NoSpaceError naming the file and the step of that previous checkpoint."""
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        if not _out_of_space(e):
            raise
        step = checkpoint_step(path)
        last = f"step {step}" if step is not None else "none yet"
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        raise NoSpaceError(errno.ENOSPC, f"no space left on device writing {path}{free}; last good "
                                         f"checkpoint: {last}") from e


def _out_of_space(e: BaseException) -> bool:
    """ENOSPC / EDQUOT from Python's file, or torch's serializer failing to write into it: its
    RuntimeError `[enforce fail at inline_container.cc:...] PytorchStreamWriter failed writing
    file data/0: file write failed` carries no errno, and a full disk is what makes it."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return "inline_container.cc" in text or "PytorchStreamWriter failed writing" in text


def checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at `path`, or None when there is none or it cannot be read.
    Memory-mapped: only the step is read, not the weights."""
    if not path.is_file():
        return None
    try:
        s = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(s["step"])
    except Exception:  # a damaged file: no good checkpoint there
        return None


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint at `path`; a missing, empty, truncated or foreign file is a ValueError."""
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path}")
    try:
        # weights_only: tensors, numbers, strings and containers; no arbitrary code from the file.
        s = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError or UnpicklingError, by damage
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({path.stat().st_size} bytes; "
                         f"truncated or corrupted? {detail})") from None
    if not isinstance(s, dict) or s.get("format") != FORMAT or not set(KEYS) <= set(s):
        got = s.get("format") if isinstance(s, dict) else type(s).__name__
        raise ValueError(f"--resume: {path} is not a checkpoint of this trainer (format {got!r}, "
                         f"expected {FORMAT}); start again with --overwrite")
    return s


def fingerprint(obj) -> str:
    """Short sha256 of a JSON-able object (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def config_fingerprint(config: dict) -> str:
    """Of every field that shapes the trajectory (not the ones a resume may change)."""
    return fingerprint({k: v for k, v in config.items() if k not in RESUMABLE_CHANGES})


def data_fingerprint(*splits) -> str:
    """Of the tokenised pairs of each split: the data, the tokenizer, max_length and truncation."""
    h = hashlib.sha256()
    for split in splits:
        pairs = split.pairs if split is not None else []
        h.update(f"split {len(pairs)}\n".encode())
        for pair in pairs:
            h.update(repr(pair).encode())
    return h.hexdigest()[:16]


def weights_fingerprint(module: torch.nn.Module, skip: str | None = None) -> str:
    """Of a model's state: names, dtypes, shapes and bytes; without the tensors whose name holds
    `skip` ("lora_": the base weights under LoRA adapters)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if skip is not None and skip in name:
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def config_changes(saved: dict, current: dict) -> tuple[dict, dict]:
    """(allowed, refused): field -> [saved value, current value], split by RESUMABLE_CHANGES. A
    field the saved config lacks (added to DPOConfig after the checkpoint was written) counts as
    its default, which is what that run trained with."""
    from .config import DPOConfig

    saved = {**DPOConfig().to_dict(), **saved}
    changed = {k: [saved.get(k), current.get(k)] for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k)}
    allowed = {k: v for k, v in changed.items() if k in RESUMABLE_CHANGES}
    return allowed, {k: v for k, v in changed.items() if k not in RESUMABLE_CHANGES}


def check_resumable(s: dict, run: dict, config: dict, fingerprints: dict, check_reference: bool,
                    sources: dict | None = None) -> dict:
    """Refuse to resume checkpoint `s` into the run described by run.json (`run`) with this config
    and these fingerprints, naming what differs. `sources` (e.g. {"model": ..., "data": ...}) says
    how this process built its model and data: a --model other than the run's is named as such,
    not as different data (its tokenizer tokenises the data differently). Returns the changes that
    are allowed."""
    if s["run_id"] != run["run_id"]:
        raise ValueError(f"--resume: the checkpoint belongs to another run (run id {s['run_id']}; "
                         f"run.json says {run['run_id']}): start again with --overwrite")
    allowed, refused = config_changes(s["config"], config)
    if refused:
        why = ""
        if any(k.startswith("lora_") for k in refused):
            held = "LoRA adapters of that shape" if s["config"].get("lora_r") else "full weights"
            into = "full fine-tuning" if config.get("lora_r") is None else "other LoRA adapters"
            why = f" (the checkpoint holds {held}, which cannot continue as {into})"
        raise ValueError(f"--resume: the configuration differs from the checkpoint's in "
                         f"{describe_changes(refused)}{why}; only {', '.join(RESUMABLE_CHANGES)} may change")
    saved = s["fingerprints"]
    ran = run["sources"]
    now = sources or {}
    if "model" in ran and "model" in now and str(now["model"]) != str(ran["model"]) and (
            saved["data"] != fingerprints["data"] or saved.get("base") != fingerprints.get("base")
            or (check_reference and saved["reference"] != fingerprints["reference"])):
        raise ValueError(f"--resume: the model differs from the run's: --model {now['model']} here, "
                         f"the run was trained from --model {ran['model']} (its tokenizer, weights "
                         f"and reference are that model's): resume with --model {ran['model']}, "
                         f"or start a new run")
    sources = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in ran.items() if v is not None) \
        or "sources not recorded"
    if saved["data"] != fingerprints["data"]:
        raise ValueError(f"--resume: the data differs from the run's (fingerprint {fingerprints['data']}, "
                         f"checkpoint {saved['data']}; the run used {sources}): resume with the same "
                         f"data, tokenizer and max_length")
    if saved.get("base") != fingerprints.get("base"):
        raise ValueError(f"--resume: the base model under the LoRA adapters differs from the run's "
                         f"(weights fingerprint {fingerprints.get('base')}, checkpoint {saved.get('base')}; "
                         f"the run used {sources}); the checkpoint holds only the adapters: build the "
                         f"model the same way")
    if check_reference and saved["reference"] != fingerprints["reference"]:
        raise ValueError(f"--resume: the reference model differs from the run's (weights fingerprint "
                         f"{fingerprints['reference']}, checkpoint {saved['reference']}); it is "
                         f"{run['reference']} ({sources}): build it the same way")
    return allowed


def describe_changes(d: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in d.items())


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: the renames into it) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
