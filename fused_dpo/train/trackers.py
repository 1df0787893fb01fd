"""Experiment trackers (`report_to`): the rows of metrics.jsonl, sent from rank 0.

Each row's numbers go out under the same names as in metrics.jsonl ("loss", "rewards/margins",
"eval/loss", ...) at step row["step"]; its health flags go as text (tensorboard) or as alerts
(trackio). metrics.jsonl stays the record: a tracker is a view of it.

- tensorboard: event files in output_dir/tensorboard/ (`tensorboard --logdir output_dir`). A
  resumed run writes there too, with purge_step at the resume step, so readers drop the steps the
  interrupted run logged after its last checkpoint: each step appears once, as in metrics.jsonl.
- trackio: trackio's local store (a SQLite file per project under $TRACKIO_DIR, else
  $HF_HOME/trackio; `trackio show --project fused-dpo`), project "fused-dpo", one trackio run per
  run directory, named `<dir name>-<run id>`. Nothing leaves the machine unless trackio's own
  TRACKIO_SPACE_ID / TRACKIO_SERVER_URL say so. trackio cannot drop logged steps, so a resumed
  run replaces its trackio run with the rows of metrics.jsonl before the resume step, then goes on.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from . import rundir
from .config import CHOICES

PROJECT = "fused-dpo"  # the trackio project every run goes to


def check_available(report_to: str) -> None:
    """Refuse a tracker whose library does not import, before anything is written."""
    if report_to not in CHOICES["report_to"]:
        raise ValueError(f"report_to must be one of {', '.join(CHOICES['report_to'])}, "
                         f"got {report_to!r}")
    try:
        if report_to == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
        elif report_to == "trackio":
            import trackio  # noqa: F401
    except ImportError as e:  # the cause too: an installed but broken package reads the same
        raise ValueError(f"--report-to {report_to} needs `pip install {report_to}` ({e})") from None


def open_tracker(cfg, out: Path, step: int, main: bool):
    """The tracker `cfg.report_to` names for the run in `out`, continuing at `step` (0: a fresh
    run). Ranks other than rank 0 (`main` False) get one that does nothing."""
    check_available(cfg.report_to)
    if not main or cfg.report_to == "none":
        return _Nothing()
    if cfg.report_to == "tensorboard":
        return _TensorBoard(Path(out), step)
    return _Trackio(cfg, Path(out), step)


def _scalars(row: dict) -> dict[str, float]:
    """The row's numbers (not the step, not the flags)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class _Nothing:
    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard:
    def __init__(self, out: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a reader drops the events at steps >= step from the earlier files, those the
        # interrupted run wrote after the checkpoint this run resumes from (a fresh run has none)
        self.writer = SummaryWriter(str(out / rundir.TENSORBOARD), purge_step=step or None)

    def log(self, row: dict) -> None:
        step = row["step"]
        for name, value in _scalars(row).items():
            self.writer.add_scalar(name, value, global_step=step)
        if row.get("flags"):
            self.writer.add_text("flags", ", ".join(row["flags"]), global_step=step)

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, cfg, out: Path, step: int):
        import trackio

        self.trackio = trackio
        name = f"{out.resolve().name}-{rundir.read_run_json(out)['run_id']}"
        history = []
        if step:
            # trackio cannot drop the steps an interrupted run sent after its last checkpoint: the
            # run is sent again, its rows before `step` from metrics.jsonl (already cut there)
            lines, _ = rundir.read_metrics(out / rundir.METRICS, step)
            history = [json.loads(ln) for ln in lines]
            with contextlib.suppress(ValueError):  # Api.runs: no such project yet
                for old in trackio.Api().runs(PROJECT):
                    if old.name == name:
                        old.delete()
        # auto_log_*: the run's rows only, no background threads sampling the machine
        self.run = trackio.init(project=PROJECT, name=name, config=cfg.to_dict(), embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)
        with contextlib.redirect_stdout(io.StringIO()):  # the old flags were announced already
            for row in history:
                self.log(row)
        if step:
            print(f"trackio: run {name} sent again from metrics.jsonl ({len(history)} rows before "
                  f"step {step})")

    def log(self, row: dict) -> None:
        step = row["step"]
        self.run.log(_scalars(row), step=step)
        for flag in row.get("flags", []):
            self.run.alert(title=flag, text=f"health flag at step {step} (see health.md)", step=step)

    def close(self) -> None:
        self.trackio.finish()
