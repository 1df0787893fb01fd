"""Compile, for Hopper (sm_90) and Ampere (sm_80) and without a GPU, exactly the kernel variants
the launchers launch: tests/launch_specs.py drives the public API over a grid of calls (B = 1 and
3, every reduction, statistics and the entropy gradient, four dtypes, packed rows of 1 and 2
sequences, vocab-padded and time-sliced views with odd V, the hidden path with odd V and chunk
sizes, the RL functions on one row, in-place backward, the last vocab-parallel shard, and the
GPU sweep's FUSED_DPO_STAGES / FUSED_DPO_ROWS settings) and records each launch through Triton's
own binder, as a GPU launch specialises it (ints equal to 1 become constexprs, multiples of 16 and
aligned pointers get hints). A hand-written signature sees neither: at 167238a it hid a compile
error on every launch with one output element.

Each recorded specialisation must compile with Triton's ptxas, with no register spills, and the
row kernels must read (and the gradient kernel write) aligned rows with vector accesses; the
interpreter forgives all of this. sm_80 compiles one specialisation of each class (kernel,
declared constexprs, pointer dtypes, warps): the integer hints were compiled for sm_90."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
# The launch binder the recording calls, create_function_from_signature(sig, params, backend) ->
# (params, specialization, options), as Triton 3.6 and 3.9 have it (run on both); Triton 3.2's
# returns another tuple. Older Triton: the kernels still compile, this test cannot record them.
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 3):
    pytest.skip(f"recording launch specialisations needs Triton >= 3.3, found {triton.__version__}",
                allow_module_level=True)

import launch_specs as L  # noqa: E402

HERE = Path(__file__).parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHES = L.record(DEVICE)
SPECS = L.unique(LAUNCHES)


def _ids(specs):
    seen, out = {}, []
    for s in specs:
        base = L.spec_id(s)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


IDS = _ids(SPECS)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # The real compiler needs real @triton.jit functions: the test session runs the interpreter,
    # so compile in a child process with TRITON_INTERPRET unset, and a fresh cache (a cached
    # kernel would skip ptxas, and with it the register report).
    tmp = tmp_path_factory.mktemp("compile")
    specs, out = tmp / "specs.json", tmp / "report.json"
    specs.write_text(json.dumps(list(zip(IDS, SPECS, strict=True))))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "cache"))
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import launch_specs; "
            f"launch_specs.compile_main({str(specs)!r}, {str(out)!r})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def _aligned_rows(spec, ptr, strides, unit):
    """The launch reads whole rows that start 16-byte aligned, with unit vocab stride."""
    sig, attrs, c = spec["signature"], spec["attrs"], spec["constexprs"]
    if attrs.get(ptr) != "D" or c.get(unit) != 1:
        return False
    return all(attrs.get(s) == "D" or c.get(s) in (0, 1) for s in strides if s in sig)


def _vector_width_possible(spec):
    # 16-byte accesses need at least 16 bytes of a block per thread
    c = spec["constexprs"]
    elem = {"*bf16": 2, "*fp16": 2, "*fp32": 4, "*fp64": 8}[spec["signature"]["x_ptr"]]
    per_thread = c["BLOCK_V"] * c.get("ROWS", 1) // (32 * spec["num_warps"])
    return per_thread * elem >= 16


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_recorded_launch_compiles_without_spills(spec, report):
    key = IDS[SPECS.index(spec)]
    for cc, r in report[key].items():
        where = f"sm_{cc} ({', '.join(spec['calls'][:3])})"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["cubin"], f"{where}: no cubin produced"
        assert r["spills"] == 0, f"{where}: {r['spills']} bytes of register spills ({r['regs']} regs)"
        assert r["regs"] <= 255, where
    r = report[key]["90"]
    if spec["kernel"] not in L.ROW_KERNELS or not _vector_width_possible(spec) or \
            not _aligned_rows(spec, "x_ptr", ("stride_xb", "stride_xr"), "stride_xv"):
        return
    if spec["constexprs"].get("NUM_STAGES", 1) > 1:
        # pipelined: the row loads become asynchronous copies into shared memory (one row a
        # program; the [ROWS, BLOCK_V] tile's row-masked loads Triton 3.9 keeps synchronous)
        if spec["kernel"] != "_row_stats_rows_kernel":
            assert r["cp_async"], "NUM_STAGES > 1 but the row loop is not pipelined"
    else:
        assert r["vector_load"], "aligned rows, but the row loads are not vectorised (sm_90 PTX)"
        if spec["kernel"] == "_row_grad_kernel" and \
                _aligned_rows(spec, "grad_ptr", ("stride_gb", "stride_gr"), "stride_gv"):
            assert r["vector_store"], "aligned rows, but the gradient stores are not vectorised"


def test_grid_reaches_the_variants_that_matter():
    """The grid keeps covering what the compile test exists for (a pruned grid fails here)."""
    by = {k: [s for s in SPECS if s["kernel"] == k] for k in L.KERNELS}
    assert all(by.values()), {k: len(v) for k, v in by.items()}
    reduce = by["_seq_reduce_kernel"]
    assert any(s["constexprs"].get("stride_ext") == 1 for s in reduce), "one output element"
    for flag, values in (("REDUCTION", {0, 1, 2}), ("STATS", {False, True}),
                         ("HAS_SEGMENTS", {False, True})):
        assert {s["constexprs"][flag] for s in reduce} == values, flag
    grad = by["_row_grad_kernel"]
    for flag, values in (("REDUCTION", {0, 1, 2}), ("ENT_GRAD", {False, True}),
                         ("HAS_SOFTCAP", {False, True}), ("HAS_ROW_INDEX", {False, True}),
                         ("NUM_STAGES", {1, 2, 3})):
        assert {s["constexprs"][flag] for s in grad} == values, flag
    stats = by["_row_stats_kernel"]
    for flag in ("HAS_MASK", "HAS_IGNORE", "HAS_SOFTCAP", "HAS_ROW_INDEX", "ACCUMULATE", "STATS"):
        assert {s["constexprs"][flag] for s in stats} == {False, True}, flag
    assert {s["constexprs"]["ROWS"] for s in by["_row_stats_rows_kernel"]} == {2, 4}
    assert {s["signature"]["x_ptr"] for s in stats} == {"*bf16", "*fp16", "*fp32", "*fp64"}
    # the aligned odd-V view: rows hinted, V not
    assert any(s["attrs"].get("stride_xr") == "D" and "V" not in s["attrs"] and
               s["constexprs"].get("BLOCK_V") == 4096 for s in stats)


def test_every_launch_is_guarded_to_its_tensors_device():
    """Triton launches on the current CUDA device: each launcher enters its tensors' device first
    (a reference model on cuda:1 with device 0 current would fault, or race its stream)."""
    unguarded = sorted({(ln["kernel"], ln["call"]) for ln in LAUNCHES if not ln["guarded"]})
    assert not unguarded, f"{len(unguarded)} launches outside the device guard, e.g. {unguarded[:3]}"


def test_hidden_path_chunks_have_aligned_rows():
    """The hidden path's logits chunks start every row 16-element aligned, whatever the chunk
    width (a chunk_size of 3000, V = 32001's last chunk), so the row kernels vectorise them."""
    odd = [ln for ln in LAUNCHES if ln["call"].startswith(("hidden-", "rl-hidden-", "grad_in_forward"))
           and ln["kernel"] in ("_row_stats_kernel", "_row_grad_kernel")
           and ln["attrs"].get("stride_xr") != "D"]
    assert not odd, [(ln["kernel"], ln["call"]) for ln in odd[:5]]


@pytest.mark.parametrize("env, message", [
    ({"FUSED_DPO_BLOCK_V": "3000"}, "FUSED_DPO_BLOCK_V must be a power of two >= 16, got 3000"),
    ({"FUSED_DPO_BLOCK_V": "8"}, "FUSED_DPO_BLOCK_V must be a power of two >= 16, got 8"),
    ({"FUSED_DPO_ROWS": "3"}, "FUSED_DPO_ROWS must be a power of two >= 1, got 3"),
    ({"FUSED_DPO_STAGES": "0"}, "FUSED_DPO_STAGES must be >= 1, got 0"),
], ids=["block3000", "block8", "rows3", "stages0"])
def test_sweep_variables_are_checked(env, message):
    res = subprocess.run([sys.executable, "-c", "import fused_dpo.kernels.logps"],
                         capture_output=True, text=True, env=dict(os.environ, **env))
    assert res.returncode != 0 and f"ValueError: {message}" in res.stderr, res.stderr[-500:]
