"""The GPU benchmark's code paths on tiny shapes (timings meaningless): a GPU session has minutes,
not hours, so its script must not die on a Python error there.

The bench runs on the device that is present (conftest's `device` fixture): without CUDA, conftest
turns Triton's interpreter on and `fused_triton` runs on CPU tensors; with CUDA the interpreter is
off, so `fused_triton` needs CUDA tensors and a `--device cpu` run would lose its rows."""

import csv

import pytest
import torch

from bench.__main__ import main


def test_bench_runs_and_writes_csv(tmp_path, device):
    rc = main(["all", "--device", device, "--quick", "--shapes", "2x16x64,2x16x8x64",
               "--providers", "fused_triton,fused_torch,eager,trl_row_loop", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    got = {(r["path"], r["provider"], r["mode"]) for r in rows}
    for path, provs in (("logits", ("fused_triton", "fused_torch", "eager", "trl_row_loop")),
                        ("hidden", ("fused_triton", "fused_torch", "eager"))):
        for p in provs:
            for mode in ("forward", "fwd+bwd"):
                assert (path, p, mode) in got
    for r in rows:
        # every provider agrees with float64; the hidden path's bf16 logits carry bf16 rounding
        assert float(r["rel_err"]) < (1e-5 if r["path"] == "logits" else 1e-3), r
        assert r["commit"] and r["torch"] and r["gpu"]
    assert (tmp_path / "logits.png").stat().st_size > 0


def test_train_step_bench_smoke(capsys):
    from bench.train_step import main as train_step

    # CPU even on a GPU machine: train_step's CUDA mode is the full Qwen2-0.5B-shaped measurement
    # (about a minute), not a smoke run, and on CPU tensors "auto" takes the torch path, which needs
    # no interpreter.
    assert train_step(["--device", "cpu", "--profile", "--profile-steps", "1"]) == 0
    out = capsys.readouterr().out
    line = out.split("loss agreement: eager ")[1].splitlines()[0]  # "<e> fused <f> fused3mm <g>"
    eager, rest = line.split(" fused ")
    fused, fused3 = rest.split(" fused3mm ")
    assert abs(float(eager) - float(fused)) < 1e-5
    assert abs(float(eager) - float(fused3)) < 1e-5
    assert "host syncs per step" in out


def test_small_shapes_table(tmp_path, device, capsys):
    from bench.small_shapes import main as small_shapes

    assert small_shapes(["--device", device, "--shapes", "2x16x64", "--reps", "2",
                         "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "small_shapes.csv").open()))
    got = {(r["provider"], r["mode"]) for r in rows}
    for p in ("fused validate=False", "fused validate=True", "eager"):
        for mode in ("forward", "fwd+bwd"):
            assert (p, mode) in got
    for r in rows:
        assert float(r["host_ms"]) > 0 and float(r["wall_ms"]) > 0, r


def test_op_checks_smoke(device, capsys):
    from bench.op_checks import main as op_checks

    rc = op_checks(["--device", device, "--tiny"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "op checks: all passed" in out
    assert "get_logps_from_hidden: weight grad" in out
    assert "(grads bfloat16/float32)" in out  # the fp32 master weight's gradient comes back fp32
    if device == "cpu":
        assert "CUDA graphs need a CUDA device" in out


def test_cpu_proxies_counts(capsys):
    import bench.cpu_proxies as proxies

    # The launchers are stubbed, so this runs on CPU tensors on any machine (impl="torch").
    r = proxies.measure("torch", False, (2, 16, 64), reps=2)
    # One call: two launches forward (row statistics, per-sequence reduction), one backward.
    assert (r["fwd_launches"], r["bwd_launches"]) == (2, 1), r
    assert r["fwd_ops"] > 0 and r["bwd_ops"] > 0
    assert "_local_scalar_dense" not in r["fwd_op_names"]  # validate=False: no host sync
    assert proxies.main(["--shape", "2x16x64", "--reps", "2", "--impls", "torch"]) == 0


def test_bench_entropy_rows_and_goals(tmp_path, device, capsys):
    """Issue 11's rows: ours with stats / with the entropy's gradient beside TRL's kernels, the
    entropy error column, extra memory, and the goal ratios printed at the end."""
    pytest.importorskip("trl")  # in the test extra; the guard only serves a checkout without it
    from bench.__main__ import ENTROPY_GOALS

    ours = ("fused_triton", "fused_triton+stats", "fused_triton+entropy_grad")
    trl = {"logits": ("trl_kernel", "trl_kernel+entropy_grad"),
           "hidden": ("trl_chunked+stats", "trl_chunked+entropy_grad")}
    rc = main(["all", "--device", device, "--quick", "--shapes", "2x16x64,2x16x8x64", "--providers",
               ",".join(ours + trl["logits"] + trl["hidden"]), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    got = {(r["path"], r["provider"], r["mode"]): r for r in rows}
    for path in ("logits", "hidden"):
        for p in ours + trl[path]:
            for mode in ("forward", "fwd+bwd"):
                r = got[(path, p, mode)]
                assert float(r["rel_err"]) < (1e-5 if path == "logits" else 1e-3), r
                assert r["extra_GiB"] != "", r
                if p != "fused_triton":  # every row that computes an entropy checks it
                    assert float(r["ent_rel_err"]) < (1e-5 if path == "logits" else 1e-3), r
    assert got[("logits", "fused_triton", "forward")]["ent_rel_err"] == ""
    # one ratio line per goal, in order (one shape per path here)
    goals = out.split("issue 11 (entropy, GRPO/PPO): ratios of the rows above\n")[1]
    lines = [line for line in goals.splitlines() if line.startswith("  ")]
    assert len(lines) == len(ENTROPY_GOALS), goals
    for line, (path, _num, _den, _mode, _col, _goal, _op, what) in zip(lines, ENTROPY_GOALS, strict=True):
        assert line.startswith(f"  {path} 2x16x") and what in line, line


def test_bench_stopped_by_sigterm_writes_rows(tmp_path, monkeypatch, capsys):
    """gpu_check.sh's `timeout` sends SIGTERM: the rows measured before it still land in the CSV."""
    import os
    import signal

    import bench.__main__ as bm

    time_row, calls = bm._time, []

    def killed_at_third(*args, **kwargs):  # inside the second provider's try block
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return time_row(*args, **kwargs)

    monkeypatch.setattr(bm, "_time", killed_at_third)
    handler = signal.getsignal(signal.SIGTERM)
    rc = main(["all", "--device", "cpu", "--quick", "--shapes", "2x16x64,2x16x8x64", "--providers",
               "fused_torch,eager", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "stopped by SIGTERM" in out and "FAILED" not in out, out
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["path"], r["provider"], r["mode"]) for r in rows] == [
        ("logits", "fused_torch", "forward"), ("logits", "fused_torch", "fwd+bwd")]
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_rows_land_in_the_csv_as_they_are_measured(tmp_path, monkeypatch, capsys):
    """A stage killed outright (SIGKILL, the device call's limit) keeps its rows: each is on disk
    before the next measurement starts, in the bench tables and in the small-shape table."""
    import bench.__main__ as bm
    import bench.small_shapes as ss

    def rows_on_disk_at_each(module, name, csv_name):
        seen, timer, path = [], getattr(module, name), tmp_path / csv_name

        def counting(*args, **kwargs):
            seen.append(len(list(csv.DictReader(path.open()))) if path.exists() else 0)
            return timer(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return seen

    seen = rows_on_disk_at_each(bm, "_time", "results.csv")
    assert main(["logits", "--device", "cpu", "--quick", "--shapes", "2x16x64", "--providers",
                 "fused_torch,eager", "--out", str(tmp_path)]) == 0
    assert seen == [0, 1, 2, 3], seen  # forward and fwd+bwd of two providers
    seen = rows_on_disk_at_each(ss, "time_calls", "small_shapes.csv")
    assert ss.main(["--device", "cpu", "--shapes", "2x16x64", "--reps", "2", "--out", str(tmp_path)]) == 0
    assert seen == list(range(len(seen))) and len(seen) >= 6, seen


def test_torch_linear_cross_entropy_row(tmp_path, capsys):
    """PyTorch's own linear_cross_entropy (torch >= 2.13) as a hidden-path provider: its sums
    match float64 truth; on older torch the row is skipped with a note."""
    rc = main(["hidden", "--device", "cpu", "--quick", "--shapes", "2x16x8x64", "--providers",
               "torch_linear_ce", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    if getattr(torch.nn, "LinearCrossEntropyOptions", None) is None:
        assert "needs torch >= 2.13" in out
        return
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["mode"] for r in rows} == {"forward", "fwd+bwd"}
    for r in rows:
        assert r["provider"] == "torch_linear_ce" and float(r["rel_err"]) < 1e-3, r


# CUDA runs these scripts for real in gpu_check.sh; their CPU smoke runs would set up a NCCL group.
@pytest.mark.skipif(torch.cuda.is_available(), reason="gpu_check.sh runs it on the GPU")
def test_dist_step_bench_smoke(capsys):
    from bench.dist_step import main as dist_step

    assert dist_step(["--device", "cpu", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "largest relative difference of the logged metrics" in out and "FSDP2 world-size-1 step" in out
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="gpu_check.sh runs it on the GPU")
def test_packed_vp_bench_smoke(capsys):
    from bench.packed_vp import main as packed_vp

    assert packed_vp(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    agree = float(out.split("log-probs agree to ")[1].split()[0])
    assert agree < 1e-5, out  # packed and padded model passes give the same per-sequence log-probs
    assert "process_group" in out and not torch.distributed.is_initialized()


@pytest.mark.parametrize("mode", ["qlora", "full_8bit", "trl_lora"])
def test_fit_bench_smoke(tmp_path, mode, capsys, monkeypatch):
    """bench/fit.py's code paths on the tiny shape (CPU): the row is measured and written, with the
    plan's prediction beside ours."""
    pytest.importorskip("bitsandbytes")
    from conftest import _empty, _empty_like

    from bench.fit import main as fit

    # conftest's NaN poisoning off: the plan's torch.device("meta") context does not see through
    # its wrapper of torch.empty (tests/test_plan.py says why)
    monkeypatch.setattr(torch, "empty", _empty)
    monkeypatch.setattr(torch, "empty_like", _empty_like)

    assert fit(["--shape", "tiny", "--device", "cpu", "--mode", mode, "--max-length", "32",
                "--steps", "1", "--out", str(tmp_path)]) == 0
    (row,) = csv.DictReader((tmp_path / "fit.csv").open())
    assert row["mode"] == mode and row["status"] == "ok", row
    assert float(row["step_s"]) > 0 and float(row["tokens_per_s"]) > 0
    if not mode.startswith("trl"):
        assert float(row["predicted_MiB"]) > 0
