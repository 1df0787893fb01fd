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


def _compile(fn, elem, constexprs, cc, warps):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"x_ptr": ELEM[elem], "grad_ptr": ELEM[elem], "labels_ptr": "*i64",
                         "weights_ptr": "*u8"}.get(name, "*fp64" if elem == "fp64" else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("inv_temp", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = dict(constexprs)
    constexprs.setdefault("stride_xv", 1)  # specialised by the launcher for unit stride
    if "stride_gv" in fn.arg_names:
        constexprs.setdefault("stride_gv", 1)
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
STATS = [
    dict(HAS_WEIGHTS=w, HAS_IGNORE=i, HAS_SOFTCAP=c, LANE_MAX=lane)
    for (w, i), c, lane in itertools.product([(True, False), (False, True), (False, False)],
                                             [False, True], [False, True])
]
GRAD = [dict(HAS_SOFTCAP=c) for c in (False, True)]
CASES = [
    (fn, flags, elem, block, cc)
    for fn, flag_list in ((K._row_stats_kernel, STATS), (K._row_grad_kernel, GRAD))
    for flags in flag_list
    for elem in ("bf16", "fp16", "fp32", "fp64")
    for block in BLOCKS
    for cc in (90, 80)
]


def _id(case):
    fn, flags, elem, (block, warps), cc = case
    on = "-".join(k.removeprefix("HAS_").lower() for k, v in flags.items() if v) or "plain"
    return f"{fn.__name__.strip('_')}-{on}-{elem}-B{block}w{warps}-sm{cc}"


def compile_all(tmp):
    """Compile every case; {id: {"regs", "spills", "vector", "cubin"} or {"error"}}."""
    from pathlib import Path

    report = {}
    for case in CASES:
        fn, flags, elem, (block, warps), cc = case
        acc = tl.float64 if elem == "fp64" else tl.float32
        try:
            k = _compile(fn, elem, dict(flags, ACC=acc, BLOCK_V=block), cc, warps)
            regs, spills = _ptxas_report(k.asm["ptx"], cc, Path(tmp))
            ptx = k.asm["ptx"]
            report[_id(case)] = dict(regs=regs, spills=spills, cubin=bool(k.asm.get("cubin")),
                                     vector="ld.global.v4" in ptx or "ld.global.v2" in ptx)
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
    if elem != "fp64" and block >= 1024:
        assert r["vector"], "row loads are not vectorised"
