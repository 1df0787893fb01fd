"""Compile every kernel configuration the launchers can pick for Hopper (sm_90) and Ampere
(sm_80) without a GPU. The interpreter forgives what the compiler rejects (non-constexpr globals,
type mismatches across branches, unsupported ops); this does not. Also checks ptxas's report: no
register spills, and 16-byte vector loads on the aligned path."""

import itertools
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from fused_dpo.kernels import logps as K  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
ELEM = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}
# Integer arguments Triton's launcher specialises as divisible by 16 for realistic vocabularies.
ALIGNED_INTS = {"V", "stride_xb", "stride_xr", "stride_gb", "stride_gr"}


POINTERS = {"labels_ptr": "*i64", "mask_ptr": "*u8", "idx_ptr": "*i64", "bad_ptr": "*i32",
            "cu_ptr": "*i32"}


def _compile(fn, elem, constexprs, cc, warps):
    acc = "*fp64" if elem == "fp64" else "*fp32"
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ELEM[elem] if name in ("x_ptr", "grad_ptr") else POINTERS.get(name, acc)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("inv_temp", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = dict(constexprs)
    for unit in ("stride_xv", "stride_gv"):  # specialised by the launcher for unit stride
        if unit in fn.arg_names:
            constexprs.setdefault(unit, 1)
    sig.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn, sig, constexprs, attrs),
                          target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": warps})


def _ptxas_report(ptx, cc, tmp_path):
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    out = subprocess.run([PTXAS, "-v", "--gpu-name", arch, str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", out))
    return regs, spills


BLOCKS = sorted({K.launch_config(V) for V in (123, 32000, 128256, 151936, 256000)})
WEIGHTS = [dict(HAS_MASK=True, HAS_IGNORE=False), dict(HAS_MASK=False, HAS_IGNORE=True),
           dict(HAS_MASK=False, HAS_IGNORE=False)]
# (HAS_ROW_INDEX, ACCUMULATE): the logits path; the hidden path's first and later vocab chunks,
# compacted; its later chunks under CUDA graph capture (no compaction).
HIDDEN = [(False, False), (True, False), (True, True), (False, True)]
# STATS: entropy, sum p^2, mean logit and top-1 accumulated beside the log-sum-exp (one weight
# convention suffices: the weights are scalar code before the loop).
ROW_STATS = [dict(w, HAS_SOFTCAP=c, HAS_ROW_INDEX=ri, ACCUMULATE=a, STATS=st)
             for w, c, (ri, a), st in itertools.product(WEIGHTS, [False, True], HIDDEN, [False, True])
             if not st or w is WEIGHTS[0]]
GRAD = [dict(HAS_SOFTCAP=c, HAS_ROW_INDEX=ri, REDUCTION=red, ENT_GRAD=eg)
        for c, ri, red, eg in itertools.product([False, True], [False, True],
                                                [K.SUM, K.MEAN, K.NONE], [False, True])]
# HAS_SEGMENTS: packed sequences (cu_seqlens), one program per segment of a single row.
REDUCE = [dict(REDUCTION=red, STATS=st, HAS_SEGMENTS=seg) for red in (K.SUM, K.MEAN, K.NONE)
          for st in (False, True) for seg in (False, True)]


def _cases():
    cases = []
    for fn, flag_list in ((K._row_stats_kernel, ROW_STATS), (K._row_grad_kernel, GRAD)):
        for flags, elem, block, cc in itertools.product(flag_list, ("bf16", "fp16", "fp32", "fp64"),
                                                        BLOCKS, (90, 80)):
            # sm_80 and the small block: the plain variants only (the flags change scalar code,
            # not the row loop, which the sm_90 / 4096 cases cover for every flag).
            plain = not flags.get("HAS_ROW_INDEX") and flags.get("REDUCTION", K.SUM) == K.SUM
            plain = plain and not flags.get("STATS") and not flags.get("ENT_GRAD")
            if (cc == 80 or block[0] < 1024) and not plain:
                continue
            if flags.get("STATS"):
                block = (block[0], K.stats_warps(*block))
            cases.append((fn, flags, elem, block, cc))
    for flags, elem, cc in itertools.product(REDUCE, ("fp32", "fp64"), (90, 80)):
        cases.append((K._seq_reduce_kernel, flags, elem, (K._BLOCK_R, K.REDUCE_WARPS[flags["STATS"]]),
                      cc))
    # Several rows per program (FUSED_DPO_ROWS, the logits forward for V <= 32768).
    for flags, rows, elem, cc in itertools.product(
            [dict(w, HAS_SOFTCAP=c) for w, c in itertools.product(WEIGHTS, [False, True])],
            (2, 4), ("bf16", "fp32"), (90, 80)):
        block, _ = max(BLOCKS)
        cases.append((K._row_stats_rows_kernel, dict(flags, ROWS=rows), elem,
                      (block // rows, K.ROWS_WARPS), cc))
    # Software-pipelined row loops (FUSED_DPO_STAGES, swept on the GPU): the plain configurations.
    for fn, flags in ((K._row_stats_kernel, ROW_STATS[0]), (K._row_grad_kernel, GRAD[0])):
        for stages, elem, cc in itertools.product((2, 3), ("bf16", "fp32"), (90, 80)):
            cases.append((fn, dict(flags, NUM_STAGES=stages), elem, max(BLOCKS), cc))
    return cases


CASES = _cases()


def _id(case):
    fn, flags, elem, (block, warps), cc = case
    on = "-".join(k.removeprefix("HAS_").lower() for k, v in flags.items() if v is True)
    if flags.get("NUM_STAGES", 1) > 1:
        on = "-".join(filter(None, [on, f"stages{flags['NUM_STAGES']}"]))
    if "ROWS" in flags:
        on = "-".join(filter(None, [on, f"rows{flags['ROWS']}"]))
    if "REDUCTION" in flags:
        on = "-".join(filter(None, [on, ("sum", "mean", "none")[flags["REDUCTION"]]]))
    on = on or "plain"
    return f"{fn.__name__.strip('_')}-{on}-{elem}-B{block}w{warps}-sm{cc}"


def compile_all(tmp):
    """Compile every case; {id: {"regs", "spills", "vector", "cubin"} or {"error"}}."""
    from pathlib import Path

    report = {}
    for case in CASES:
        fn, flags, elem, (block, warps), cc = case
        acc = tl.float64 if elem == "fp64" else tl.float32
        size = {"BLOCK_R": block} if fn is K._seq_reduce_kernel else {"BLOCK_V": block,
                                                                     "NUM_STAGES": 1}
        try:
            k = _compile(fn, elem, dict(dict(size, ACC=acc), **flags), cc, warps)
            regs, spills = _ptxas_report(k.asm["ptx"], cc, Path(tmp))
            ptx = k.asm["ptx"]
            report[_id(case)] = dict(regs=regs, spills=spills, cubin=bool(k.asm.get("cubin")),
                                     vector="ld.global.v4" in ptx or "ld.global.v2" in ptx,
                                     cp_async="cp.async" in ptx)
        except Exception as e:  # reported per case by the test below
            report[_id(case)] = dict(error=f"{type(e).__name__}: {e}")
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # The real compiler needs real @triton.jit functions: the test session runs the interpreter,
    # so compile in a child process with TRITON_INTERPRET unset.
    env = dict(os.environ, TRITON_INTERPRET="0")
    tmp = tmp_path_factory.mktemp("ptx")
    out = subprocess.run(
        [sys.executable, "-c", f"import json,sys; sys.path.insert(0, {os.path.dirname(__file__)!r});"
         f"import test_compile as t; print(json.dumps(t.compile_all({str(tmp)!r})))"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_compiles_without_spills(case, report):
    fn, flags, elem, (block, warps), cc = case
    r = report[_id(case)]
    assert "error" not in r, r.get("error")
    assert r["cubin"], "no cubin produced"
    assert r["spills"] == 0, f"{r['spills']} bytes of register spills ({r['regs']} registers)"
    assert r["regs"] <= 255
    if flags.get("NUM_STAGES", 1) > 1:
        # pipelined: the row loads become asynchronous copies into shared memory
        assert r["cp_async"], "NUM_STAGES > 1 but the row loop is not pipelined"
    elif elem != "fp64" and block >= 1024 and fn is not K._seq_reduce_kernel:
        assert r["vector"], "row loads are not vectorised"
