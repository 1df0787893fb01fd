"""The trainer on several processes (issue 13): torchrun, gloo, the CPU, 2 ranks, a tiny model.

- DDP and FSDP2 on 2 ranks of batch 2 give the run of one process of batch 4, 2 accumulation
  steps each: the same losses, gradient norms, metrics and final weights (fp32 sums in another
  order: relative 1e-5);
- a rank killed with SIGKILL ends the job, torchrun's summary names it, the previous checkpoint is
  complete, one process reads it, and --resume then finishes the run exactly as if it had not
  been interrupted;
- FSDP2 keeps a tied embedding tied; a NaN loss on one rank skips the step on every rank;
- what cannot work is refused with the reason (a resume on another number of ranks, torchrun
  without --parallel, a model FSDP2 cannot split).

Every launch costs a few seconds of imports per rank: the runs are few and short.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fused_dpo.train import distributed, sharded
from fused_dpo.train.cli import main as train
from fused_dpo.train.data import synthetic_sorting
from fused_dpo.train.models import tiny_llama, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ROWS = synthetic_sorting(40, seed=0)
# fp32 sums over another split of the batch: the ranks' means averaged instead of one mean.
RTOL, ATOL = 1e-5, 1e-6
# Timing and process numbers, which differ between any two runs.
VOLATILE = ("tokens_per_s", "peak_mem_MiB")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # 32 train, 8 held-out pairs
    return path


def common(data):
    # two micro-batches a step: the ranks' gradients are reduced on the second only
    return ["--data", str(data), "--eval-steps", "2", "--no-progress", "--lr-scheduler", "constant",
            "--warmup-steps", "0", "--max-steps", "4", "--gradient-accumulation-steps", "2"]


def child_env():
    # The children run on the CPU with gloo even on a GPU machine (2 ranks, maybe 1 GPU).
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def torchrun(n, *args, module=True, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--standalone", *(["-m", "fused_dpo", "train"] if module else []), *map(str, args)]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, **kw)


def one_process(*args):
    """`python -m fused_dpo train ...` in a child on the CPU, like the ranks (on a GPU machine this
    process would train on the GPU, another kernel than the ranks')."""
    cmd = [sys.executable, "-m", "fused_dpo", "train", *map(str, args)]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)


def finished(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in VOLATILE}
            for ln in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: list[dict], want: list[dict], exact=False):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), (g, w)
        for k, v in w.items():
            if isinstance(v, float) and not exact:
                assert g[k] == pytest.approx(v, rel=RTOL, abs=ATOL), (g["step"], k, g[k], v)
            else:
                assert g[k] == v, (g["step"], k, g[k], v)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The reference: one process, batch 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    code, log = finished(one_process(*common(data), "--batch-size", "4", "--save-steps", "4",
                                     "--output-dir", out))
    assert code == 0, log
    return out


@pytest.fixture(scope="module")
def fsdp2_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    code, log = finished(torchrun(2, *common(data), "--batch-size", "2", "--save-steps", "4",
                                  "--parallel", "fsdp2", "--output-dir", out))
    assert code == 0, log
    return out, log


def fresh_model():
    return tiny_llama(len(train_tokenizer(r[k] for r in ROWS for k in ("prompt", "chosen", "rejected"))))


def final_weights(run: Path | None) -> dict[str, torch.Tensor]:
    """The run's last checkpoint, read into a fresh model in this one process (None: the initial
    weights)."""
    model = fresh_model()
    if run is None:
        pass
    elif (run / "checkpoint.pt").exists():
        model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    else:
        sharded.load_model_state(run, model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(run: Path, single: Path):
    """Per tensor, the difference is under 1e-3 of the training's update. Not elementwise: AdamW
    moves an element whose gradient is near 0 by about +-lr whatever that gradient's size, so a
    gradient of fp32 noise (another summation order) can move it differently."""
    want, got, init = final_weights(single), final_weights(run), final_weights(None)
    assert set(got) == set(want)
    for k in want:
        assert (got[k] - want[k]).norm() <= 1e-3 * (want[k] - init[k]).norm(), k


def test_fsdp2_on_two_ranks_is_the_single_process_run(single, fsdp2_run):
    out, log = fsdp2_run
    assert "global batch 8 pairs per step = 2 per rank x 2 ranks x 2 accumulation steps" in log
    assert_same_run(rows(out), rows(single))
    assert_same_weights(out, single)
    # rank 0 alone wrote the run files, once; the checkpoint is sharded over both ranks
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint.dcp", "metrics.jsonl", "config.json", "run.json", "health.md", "curves.png"])
    step = sharded.latest(out)
    assert step.name == "step-000004"
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    run = json.loads((out / "run.json").read_text())
    assert (run["parallel"], run["world_size"]) == ("fsdp2", 2)
    # FSDP2 shards the parameters, gradients and optimizer moments: each rank holds about half
    health = (out / "health.md").read_text()
    per_rank = [float(x) for x in re.findall(r"rank \d: total ([\d.]+) MiB", health)]
    whole = float(re.search(r"Model state held: .*total ([\d.]+) MiB",
                            (single / "health.md").read_text()).group(1))
    assert len(per_rank) == 2 and all(0.45 * whole < b < 0.6 * whole for b in per_rank), (per_rank, whole)


def test_ddp_on_two_ranks_is_the_single_process_run(single, data, tmp_path):
    out = tmp_path / "run"
    code, log = finished(torchrun(2, *common(data), "--batch-size", "2", "--save-steps", "4",
                                  "--parallel", "ddp", "--output-dir", out))
    assert code == 0, log
    assert_same_run(rows(out), rows(single))
    assert_same_weights(out, single)


def run_here(*args) -> int:
    return train([str(a) for a in args])


def test_fsdp2_in_one_process_without_torchrun_is_the_plain_run(single, data, tmp_path):
    """--parallel fsdp2 started as one process: a group of one, the sharded code path throughout
    (the CPU twin of the GPU script's world-size-1 check)."""
    out = tmp_path / "run"
    code, log = finished(one_process(*common(data), "--batch-size", "4", "--save-steps", "4",
                                     "--parallel", "fsdp2", "--output-dir", out))
    assert code == 0, log
    assert_same_run(rows(out), rows(single))
    assert sharded.latest(out).name == "step-000004"


def wait_for_checkpoint(out: Path, proc, timeout=180) -> str:
    pointer = out / "checkpoint.dcp" / "LATEST"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pointer.is_file() and pointer.read_text().strip():
            return pointer.read_text().strip()
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (read from /proc)."""
    for _ in range(500):
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                    continue
                env = (p / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(p.name)
        time.sleep(0.01)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid in /proc")
def test_killed_rank_stops_the_job_and_resume_finishes_the_run_exactly(fsdp2_run, data, tmp_path):
    out = tmp_path / "run"
    args = [*common(data), "--batch-size", "2", "--save-steps", "1", "--parallel", "fsdp2",
            "--output-dir", out]
    proc = torchrun(2, *args)
    victim = rank_pid(proc.pid, rank=1)
    seen = wait_for_checkpoint(out, proc)
    os.kill(victim, signal.SIGKILL)
    assert seen in ("step-000001", "step-000002", "step-000003"), f"killed too late, at {seen}"
    code, log = finished(proc)
    assert code != 0, log
    # torchrun's failure summary lists the rank that died, and how. (Which failure it calls the
    # root cause depends on timing: rank 0, which loses its peer mid-collective, can fail within
    # the same second. In 2 of about 30 runs here the summary was missing from the output
    # altogether; the job still stopped, and the rest of this test held.)
    if "Root Cause" in log or "Failures:" in log:
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", log) \
            and "SIGKILL" in log, log
    # the job stopped before its end; the checkpoint LATEST names is complete and readable by one
    # process, whatever save the kill interrupted
    step = sharded.latest(out)
    assert step is not None and int(step.name.split("-")[1]) < 4, log
    assert sharded.load_model_state(out, fresh_model()) == int(step.name.split("-")[1])
    code, log = finished(torchrun(2, "--output-dir", out, "--resume", "--no-progress"))
    assert code == 0, log
    assert sharded.leftovers(out) == []
    # the same rows, bit for bit, as the run that was never interrupted (save_steps does not
    # shape a run)
    assert_same_run(rows(out), rows(fsdp2_run[0]), exact=True)


def test_tied_embedding_and_lora_under_fsdp2(data, tmp_path):
    """A tied lm_head stays the input embedding through sharding and training; LoRA's reference
    (the policy with its adapters off) goes through the same sharded root. Both runs equal one
    process's."""
    from dist_worker import config, setup, tied_llama

    from fused_dpo.train.trainer import DPOTrainer

    code, log = finished(torchrun(2, ROOT / "tests" / "dist_worker.py", "tied,lora", tmp_path,
                                  module=False))
    assert code == 0, log
    tok, train_rows, held = setup()
    for name, model, kw in (("tied", tied_llama(len(tok)), {}),
                            ("lora", tiny_llama(len(tok)), dict(lora_r=4, learning_rate=1e-2))):
        res = json.loads((tmp_path / f"result-{name}.json").read_text())
        if name == "tied":
            assert res["tied_after_wrap"] and res["tied_after_training"]
        DPOTrainer(model, None, tok, train_rows, held,
                   config(tmp_path / f"single-{name}", batch_size=4, **kw)).train(progress=False)
        assert_same_run([{k: v for k, v in r.items() if k not in VOLATILE} for r in res["rows"]],
                        rows(tmp_path / f"single-{name}"))


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    from dist_worker import nanacc

    code, log = finished(torchrun(2, ROOT / "tests" / "dist_worker.py", "nan,nanacc", tmp_path,
                                  module=False))
    assert code == 0, log
    # FSDP2 with accumulation: the micro-batch before the NaN one leaves nothing behind
    got = json.loads((tmp_path / "result-nanacc.json").read_text())
    want = nanacc(tmp_path, parallel="none", batch_size=4, rank=-1)  # one process, the same skip
    assert got["flags"].count("nonfinite_loss") == 1 and want["flags"] == got["flags"]
    assert_same_run([{k: v for k, v in r.items() if k not in VOLATILE} for r in got["rows"]],
                    [{k: v for k, v in r.items() if k not in VOLATILE} for r in want["rows"]])
    res = json.loads((tmp_path / "result-nan.json").read_text())
    assert res["steps"] == 3 and res["flags"].count("nonfinite_loss") == 1
    assert [r["step"] for r in res["rows"] if "loss" in r] == [0, 2]  # step 1 had no update
    d0, d1 = res["digests"]
    assert d0 == d1  # both ranks applied the same updates: none at step 1


def test_refusals(tmp_path, fsdp2_run, monkeypatch, capsys):
    # resuming a 2-rank run in one process names the command that resumes it
    assert run_here("--output-dir", fsdp2_run[0], "--resume", "--max-steps", "5", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "trained on 2 ranks, this job has 1" in err and "torchrun --nproc-per-node 2" in err, err
    assert not torch.distributed.is_initialized()  # the command tears its group down
    # torchrun without --parallel; an unknown parallel; a model with no decoder layers to shard
    with pytest.raises(ValueError, match="with parallel none: pass --parallel ddp"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        distributed.setup("none")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="parallel must be one of"):
        distributed.setup("zero3")

    class Flat(torch.nn.Module):  # no transformers blocks to shard one at a time
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="found no decoder layers in Flat"):
        distributed.decoder_layers(Flat())
