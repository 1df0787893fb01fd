"""`--report-to none|tensorboard|trackio` (issue 21): the trackers get the rows of metrics.jsonl,
each step once across a resume, from rank 0 only; a missing library is refused before anything is
written. Runs are tiny (the CLI's default tiny model, `zen` data, 2-4 steps)."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line

from fused_dpo.train import trackers
from fused_dpo.train.cli import main as train
from fused_dpo.train.config import DPOConfig

# The models here are tiny: one intra-op thread (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--data", "zen", "--eval-steps", "2", "--no-progress"]


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def expected(out: Path, cast=float) -> dict[tuple[str, int], float]:
    """{(metric, step): value} of metrics.jsonl, `cast` as the tracker stores it."""
    return {(k, r["step"]): cast(v) for r in rows(out) for k, v in r.items()
            if k not in ("step", "flags")}


def events(out: Path) -> tuple[list[tuple[str, int]], dict[tuple[str, int], float]]:
    """(every (tag, step) read from output_dir/tensorboard, in order; their values), as
    tensorboard's own reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    seen = [(tag, e.step) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    values = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    return seen, values


def f32(v) -> float:
    return float(np.float32(v))


def test_tensorboard_holds_the_metrics_rows(tmp_path):
    out = tmp_path / "run"
    assert train(QUICK + ["--max-steps", "3", "--output-dir", str(out), "--report-to", "tensorboard"]) == 0
    seen, values = events(out)
    want = expected(out, f32)
    assert ("eval/loss", 2) in want and ("rewards/margins", 1) in want  # the names of metrics.jsonl
    assert len(seen) == len(set(seen))  # each (metric, step) once
    assert values == want


def test_tensorboard_resume_continues_the_folder_with_each_step_once(tmp_path):
    # The first run ends at step 2 with an eval there; the resumed run evaluates step 2 again (and
    # metrics.jsonl drops the first one): the events must not hold eval/loss at step 2 twice.
    out = tmp_path / "run"
    args = QUICK + ["--output-dir", str(out), "--report-to", "tensorboard", "--save-steps", "2"]
    assert train(args + ["--max-steps", "2"]) == 0
    assert train(args + ["--max-steps", "4", "--resume"]) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder
    seen, values = events(out)
    assert sorted(s for tag, s in seen if tag == "loss") == [0, 1, 2, 3]
    assert sorted(s for tag, s in seen if tag == "eval/loss") == [0, 2, 4]
    assert len(seen) == len(set(seen))
    assert values == expected(out, f32)


def test_tensorboard_flags_are_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = DPOConfig(output_dir=str(tmp_path), report_to="tensorboard")
    t = trackers.open_tracker(cfg, tmp_path, 0, main=True)
    t.log({"step": 0, "loss": 0.5, "flags": []})
    t.log({"step": 1, "loss": 0.25, "flags": ["margin_explosion", "grad_spike"]})
    t.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (text,) = acc.Tensors("flags/text_summary")  # none for the step without flags
    assert text.step == 1
    assert text.tensor_proto.string_val == [b"margin_explosion, grad_spike"]


@pytest.mark.parametrize("report_to,main", [("none", True), ("tensorboard", False), ("trackio", False)],
                         ids=["none", "tensorboard-rank1", "trackio-rank1"])
def test_none_and_other_ranks_write_nothing(tmp_path, monkeypatch, report_to, main):
    if report_to == "trackio":
        import trackio

        def refuse(*a, **k):
            raise AssertionError("trackio called on a rank other than 0")

        for fn in ("init", "log", "alert", "finish"):
            monkeypatch.setattr(trackio, fn, refuse)
    cfg = DPOConfig(output_dir=str(tmp_path), report_to=report_to)
    t = trackers.open_tracker(cfg, tmp_path, 0, main=main)
    t.log({"step": 0, "loss": 0.5, "flags": ["margin_explosion"]})
    t.close()
    assert list(tmp_path.iterdir()) == []


def test_a_cli_run_without_report_to_has_no_tensorboard_folder(tmp_path):
    out = tmp_path / "run"
    assert train(QUICK + ["--max-steps", "1", "--output-dir", str(out)]) == 0
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists()


@pytest.mark.parametrize("report_to,modules", [
    ("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
    ("trackio", ["trackio"]),
])
def test_a_missing_library_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                 report_to, modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now fails as if not installed
    out = tmp_path / "run"
    assert train(QUICK + ["--max-steps", "1", "--output-dir", str(out), "--report-to", report_to]) == 2
    one_error_line(capsys, f"--report-to {report_to} needs `pip install {report_to}`")
    assert not out.exists()
    cfg = DPOConfig(output_dir=str(out), report_to=report_to)
    with pytest.raises(ValueError, match=f"--report-to {report_to} needs"):
        trackers.open_tracker(cfg, out, 0, main=True)


def test_overwrite_clears_the_tensorboard_folder_and_a_fresh_run_refuses_one(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.old").write_bytes(b"")
    assert train(QUICK + ["--max-steps", "1", "--output-dir", str(out)]) == 2
    one_error_line(capsys, "already holds a run (tensorboard)")
    assert train(QUICK + ["--max-steps", "1", "--output-dir", str(out), "--overwrite"]) == 0
    assert not (out / "tensorboard").exists()


# trackio reads TRACKIO_DIR when it is imported, and keeps its current run in module state: these
# runs go in a fresh interpreter, with every socket connection refused and recorded.
TRACKIO_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    from pathlib import Path
    attempts = []

    def refuse(self, address):
        attempts.append(repr(address))
        raise OSError("no network in this test")

    socket.socket.connect = refuse
    import torch
    torch.set_num_threads(1)
    from fused_dpo.train import rundir, trackers
    from fused_dpo.train.cli import main
    from fused_dpo.train.config import DPOConfig

    out, flagged = sys.argv[1], sys.argv[2]
    args = ["--data", "zen", "--eval-steps", "2", "--no-progress", "--output-dir", out,
            "--report-to", "trackio", "--save-steps", "2"]
    assert main(args + ["--max-steps", "2"]) == 0
    assert main(args + ["--max-steps", "4", "--resume"]) == 0
    # a run directory of its own for the flags, which a tiny run does not raise
    rundir.write_run_json(Path(flagged), {"run_id": "abc", "sources": {}, "reference": None,
                                         "resumes": []})
    t = trackers.open_tracker(DPOConfig(output_dir=flagged, report_to="trackio"),
                              Path(flagged), 0, main=True)
    t.log({"step": 0, "loss": 0.5, "flags": ["margin_explosion"]})
    t.close()
    print("ATTEMPTS " + json.dumps(attempts))
""")


def test_trackio_runs_offline_and_resume_sends_each_step_once(tmp_path):
    out, flagged, store = tmp_path / "run", tmp_path / "flagged", tmp_path / "trackio"
    flagged.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_WEBHOOK_URL")}
    env.update(TRACKIO_DIR=str(store), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(out), str(flagged)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ATTEMPTS []" in p.stdout  # no connection tried: no server, no network
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert f"trackio: run run-{run_id} sent again from metrics.jsonl (2 rows before step 2)" in p.stdout
    with sqlite3.connect(store / "fused-dpo.db") as db:
        logged = db.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
        alerts = db.execute("SELECT run_name, title, step FROM alerts").fetchall()
        (config,) = db.execute("SELECT config FROM configs WHERE run_name = ?",
                               (f"run-{run_id}",)).fetchone()
    mine = [(step, json.loads(m)) for name, step, m in logged if name == f"run-{run_id}"]
    assert sorted(step for step, _ in mine) == [0, 1, 2, 3, 4]  # the first run's step 2 replaced
    got = {(k, step): v for step, m in mine for k, v in m.items()}
    assert got == expected(out)  # float64 in trackio's JSON: exact
    assert json.loads(config)["report_to"] == "trackio" and json.loads(config)["max_steps"] == 4
    assert alerts == [("flagged-abc", "margin_explosion", 0)]
    assert not (out / "tensorboard").exists()
