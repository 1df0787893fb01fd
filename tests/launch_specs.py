"""The kernel specialisations the launchers really produce, recorded through Triton's own binder.

On a GPU, Triton's launcher does not compile the signature a reader would write by hand: an int
argument equal to 1 becomes a `constexpr`, ints divisible by 16 and 16-byte-aligned pointers get
divisibility hints, Python floats become fp32. `record()` drives the public API over a grid of
calls (GRID) with every Triton kernel replaced by a recorder that binds the launch's arguments the
way `JITFunction.run` does for an sm_90 target (`create_function_from_signature` with the CUDA
backend) and keeps the result; the kernels themselves are not run, so the grid costs no
interpreter time. `compile_spec()` then compiles one recorded specialisation for a GPU
architecture exactly as `JITFunction._do_compile` would (`ASTSource` + `triton.compile`).

A spec is plain JSON: {"kernel", "signature" (name -> type), "constexprs" (name -> value),
"attrs" (name -> the binder's hint string, e.g. "D"), "num_warps", "calls" (the grid entries that
produced it)}.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import tempfile

import torch

KERNELS = ("_row_stats_kernel", "_row_stats_rows_kernel", "_seq_reduce_kernel", "_row_grad_kernel")
# Row kernels: these read whole logits rows, and must vectorise them where the rows are aligned.
ROW_KERNELS = ("_row_stats_kernel", "_row_stats_rows_kernel", "_row_grad_kernel")


def _binder(fn):
    """Triton's launch-time binder for `fn` (a JITFunction, or the InterpretedFunction the
    interpreter makes of it) against an sm_90 target, as JITFunction.create_binder builds it."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import KernelParam, create_function_from_signature

    raw = getattr(fn, "fn", fn)
    jit_params = getattr(fn, "params", None)  # a JITFunction's own (with do_not_specialize)
    sig = inspect.signature(raw)
    params = jit_params or [KernelParam(i, p, False, False) for i, p in enumerate(sig.parameters.values())]
    return create_function_from_signature(sig, params, CUDABackend(GPUTarget("cuda", 90, 32))), sig


def _plain(value):
    if hasattr(value, "primitive_bitwidth") or type(value).__name__ == "dtype":  # tl.float32 ...
        return {"tl_dtype": str(value)}
    if type(value).__name__ == "constexpr":
        return _plain(value.value)
    return value


class _Recorder:
    """Stands in for one kernel: `kernel[grid](*args, **kwargs)` records the specialisation."""

    def __init__(self, name, fn, sink, guard_state):
        self.name, self.fn, self.sink, self.guard_state = name, fn, sink, guard_state
        self.binder, self.sig = _binder(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _params, spec, options = self.binder(*args, **kwargs)
            names = list(self.sig.parameters)
            signature, constexprs, attrs = {}, {}, {}
            for name, (ty, val) in zip(names, spec, strict=True):
                signature[name] = ty
                if ty == "constexpr":
                    constexprs[name] = _plain(val)
                elif isinstance(val, str) and val:
                    attrs[name] = val
            first = next(a for a in args if isinstance(a, torch.Tensor))
            self.sink.append(dict(kernel=self.name, signature=signature, constexprs=constexprs,
                                  attrs=attrs, num_warps=options.get("num_warps", 4),
                                  guarded=self.guard_state.get("device") == first.device,
                                  call=self.guard_state.get("call")))

        return launch


@contextlib.contextmanager
def recording(sink):
    """Every kernel of fused_dpo.kernels.logps records into `sink` instead of launching; the
    launch also records whether it ran inside the launcher's device guard for its first tensor."""
    from fused_dpo.kernels import logps as K

    state = {}
    saved = {name: getattr(K, name) for name in KERNELS}
    real_guard = getattr(K, "_device_guard", None)  # (a launcher without one records unguarded)

    @contextlib.contextmanager
    def guard(t):
        prev = state.get("device")
        state["device"] = t.device
        try:
            with real_guard(t):
                yield
        finally:
            state["device"] = prev

    try:
        for name in KERNELS:
            setattr(K, name, _Recorder(name, saved[name], sink, state))
        if real_guard is not None:
            K._device_guard = guard
        yield state
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)
        if real_guard is not None:
            K._device_guard = real_guard


# ---- the grid ------------------------------------------------------------------------------------
# Sizes: V = 123 (one small block), 4099 = 4096 + 3 (one full 4096 block and a 3-column tail, as
# an odd vocabulary gets), 4112 (a multiple of 16, V gets the divisibility hint as 32000 / 128256
# do), and the aligned odd-V view [..., :4099] of a 4112-wide tensor (slicing logits to a
# tokenizer's true vocabulary). B = 1 (one output element: ints equal to 1 become constexprs) and
# 3; T = 5 and 17 (R = 16: strides divisible by 16).

def _ids(B, T, V, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g).to(device)


def _mask(B, T, device):
    m = torch.ones(B, T, dtype=torch.bool)
    m[:, : max(1, T // 3)] = False
    return m.to(device)


def _logits(B, T, V, dtype, device, layout="contiguous"):
    # (the views are taken after the cast: .to() of a view makes a contiguous copy)
    if layout == "contiguous":
        return torch.randn(B, T, V).to(device, dtype).requires_grad_(True)
    if layout == "vocab_view":  # [..., :V] of a vocab-padded tensor whose width is 16-aligned
        x = torch.randn(B, T, (V + 15) // 16 * 16 + 16).to(device, dtype)[..., :V]
    elif layout == "time_view":  # logits[:, :-1] with shift=False (TRL's contract)
        x = torch.randn(B, T + 1, V).to(device, dtype)[:, :-1]
    else:
        raise ValueError(layout)
    return x.detach().requires_grad_(True)


def _logps_call(B, T, V, dtype, *, layout="contiguous", weights="mask", reduction="sum", stats=None,
                entropy_grad=False, softcap=None, inplace=False, packed=None):
    def run(device):
        from fused_dpo import get_logps

        x = _logits(B, T, V, dtype, device, layout)
        ids = _ids(B, T, V, device)
        kw = dict(reduction=reduction, softcap=softcap, impl="triton", validate=False,
                  shift=layout != "time_view", inplace_backward=inplace)
        if stats:
            kw.update(stats=stats, entropy_grad=entropy_grad)
        if packed is not None:
            kw["cu_seqlens"] = torch.tensor(packed, dtype=torch.int32, device=device)
        if weights == "mask":
            out = get_logps(x if not inplace else x.clone(), ids, _mask(B, T, device), **kw)
        elif weights == "labels":  # ignore_index marks the prompt
            labels = ids.masked_fill(~_mask(B, T, device), -100)
            out = get_logps(x if not inplace else x.clone(), labels=labels, **kw)
        else:
            out = get_logps(x if not inplace else x.clone(), ids, **kw)
        loss = out.logps.sum() if stats else out.sum()
        if entropy_grad:
            loss = loss + out.entropy.sum()
        loss.backward()

    return run


def _hidden_call(B, T, V, dtype, *, chunk_size=None, compact=True, reduction="sum", stats=None,
                 entropy_grad=False, softcap=None, H=32):
    def run(device):
        from fused_dpo import get_logps_from_hidden

        h = torch.randn(B, T, H, dtype=torch.float32).to(device, dtype).requires_grad_(True)
        w = (torch.randn(V, H, dtype=torch.float32) / H**0.5).to(device, dtype).requires_grad_(True)
        kw = dict(reduction=reduction, softcap=softcap, impl="triton", validate=False,
                  chunk_size=chunk_size, compact=compact)
        if stats:
            kw.update(stats=stats, entropy_grad=entropy_grad)
        out = get_logps_from_hidden(h, w, _ids(B, T, V, device), _mask(B, T, device), **kw)
        loss = out.logps.sum() if stats else out.sum()
        if entropy_grad:
            loss = loss + out.entropy.sum()
        loss.backward()

    return run


def _fused_loss_call(V, dtype, *, pairs=2, pairs_per_group=None):
    """dpo_loss_from_hidden's 3-matmul pass (grad_in_forward): whole-V logits per group of pairs."""
    def run(device):
        from fused_dpo import dpo_loss_from_hidden

        B, T, H = 2 * pairs, 9, 32
        h = torch.randn(B, T, H).to(device, dtype).requires_grad_(True)
        w = (torch.randn(V, H) / H**0.5).to(device, dtype).requires_grad_(True)
        ref = torch.zeros(B, device=device)
        loss, _ = dpo_loss_from_hidden(h, w, _ids(B, T, V, device), _mask(B, T, device),
                                       ref_logps=ref, grad_in_forward=True, impl="triton",
                                       validate=False, pairs_per_group=pairs_per_group)
        loss.backward()

    return run


def _rl_call(V, dtype, *, hidden=False, rows=1):
    def run(device):
        from fused_dpo import token_logps_and_entropy, token_logps_and_entropy_from_hidden

        index = _ids(1, rows, V, device)
        if hidden:
            h = torch.randn(1, rows, 32).to(device, dtype).requires_grad_(True)
            w = torch.randn(V, 32).to(device, dtype).requires_grad_(True)
            lp, ent = token_logps_and_entropy_from_hidden(h, w, index, impl="triton", validate=False)
        else:
            x = _logits(1, rows, V, dtype, device)
            lp, ent = token_logps_and_entropy(x, index, impl="triton", validate=False)
        (lp.sum() + ent.sum()).backward()

    return run


@contextlib.contextmanager
def _kernel_setting(name, value):
    from fused_dpo.kernels import logps as K

    old = getattr(K, name)
    setattr(K, name, value)
    try:
        yield
    finally:
        setattr(K, name, old)


def _with_setting(call, name, value):
    def run(device):
        with _kernel_setting(name, value):
            call(device)

    return run


def _vocab_parallel_call(V_local, valid, dtype):
    """The last vocab-parallel shard of a padded layout (columns past `valid` are padding), in a
    group of one: V read = valid (odd) on a V_local-wide, aligned tensor."""

    def run(device):
        import torch.distributed as dist

        from fused_dpo import get_logps

        mine = not dist.is_initialized()
        if mine:
            fd, path = tempfile.mkstemp()
            os.close(fd)
            dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
        try:
            x = _logits(2, 5, V_local, dtype, device)
            ids = _ids(2, 5, valid, device)
            out = get_logps(x, ids, _mask(2, 5, device), impl="triton", validate=False,
                            process_group=dist.group.WORLD, vocab_start=0, vocab_size=valid)
            out.sum().backward()
        finally:
            if mine:
                dist.destroy_process_group()
                os.unlink(path)

    return run


def _short(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}[dtype]


def _grid():
    g = {}
    STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    for dt in (bf16, fp16, fp32, fp64):
        for B, T in ((1, 5), (3, 17)):
            for V, layout in ((4112, "contiguous"), (4099, "vocab_view"), (123, "contiguous")):
                g[f"logps-{_short(dt)}-B{B}-T{T}-V{V}-{layout}"] = _logps_call(B, T, V, dt, layout=layout)
    for dt in (bf16, fp32):
        for weights in ("mask", "labels", "none"):
            for softcap in (None, 30.0):
                for red in ("sum", "mean", "none"):
                    for B in (1, 3):
                        g[f"logps-{_short(dt)}-B{B}-{weights}-cap{softcap}-{red}"] = _logps_call(
                            B, 17, 4099, dt, layout="vocab_view", weights=weights, reduction=red,
                            softcap=softcap)
        g[f"logps-{_short(dt)}-time_view"] = _logps_call(3, 17, 4099, dt, layout="time_view")
        g[f"logps-{_short(dt)}-time_view-B1"] = _logps_call(1, 2, 4112, dt, layout="time_view",
                                                            reduction="none")
        g[f"logps-{_short(dt)}-inplace"] = _logps_call(3, 17, 4112, dt, inplace=True)
        for red in ("sum", "mean", "none"):
            for eg in (False, True):
                for softcap in (None, 30.0):
                    for B in (1, 3):
                        g[f"stats-{_short(dt)}-B{B}-{red}-eg{eg}-cap{softcap}"] = _logps_call(
                            B, 17, 4099, dt, layout="vocab_view", reduction=red, stats=STATS,
                            entropy_grad=eg, softcap=softcap)
        # packed: one and two sequences in one row, every reduction, with and without statistics
        for cu in ((0, 17), (0, 9, 17)):
            for red in ("sum", "mean", "none"):
                for st in (None, STATS):
                    g[f"packed-{_short(dt)}-S{len(cu) - 1}-{red}-stats{bool(st)}"] = _logps_call(
                        1, 17, 4112, dt, reduction=red, packed=cu, stats=st)
        # hidden path: odd V, odd and default chunk sizes, compacted or not, statistics
        for V, chunk in ((4099, None), (4099, 3000), (32001, None), (123, 50)):
            for compact in (True, False):
                for B in (1, 3):
                    g[f"hidden-{_short(dt)}-B{B}-V{V}-chunk{chunk}-compact{compact}"] = _hidden_call(
                        B, 17, V, dt, chunk_size=chunk, compact=compact)
        for red in ("sum", "mean", "none"):
            for eg in (False, True):
                for softcap in (None, 30.0):
                    g[f"hidden-stats-{_short(dt)}-{red}-eg{eg}-cap{softcap}"] = _hidden_call(
                        3, 17, 4099, dt, chunk_size=3000, reduction=red, stats=STATS,
                        entropy_grad=eg, softcap=softcap)
        # the RL per-token functions on one row, and on several
        for rows in (1, 7):
            g[f"rl-{_short(dt)}-rows{rows}"] = _rl_call(4099, dt, rows=rows)
            g[f"rl-hidden-{_short(dt)}-rows{rows}"] = _rl_call(4099, dt, hidden=True, rows=rows)
        for ppg in (1, None):
            g[f"grad_in_forward-{_short(dt)}-V4099-ppg{ppg}"] = _fused_loss_call(4099, dt,
                                                                               pairs_per_group=ppg)
        g[f"vocab_parallel-last_shard-{_short(dt)}"] = _vocab_parallel_call(4112, 4099, dt)
        # the GPU sweep's settings (FUSED_DPO_STAGES, FUSED_DPO_ROWS): what each can launch
        for stages in (2, 3):
            for V, layout in ((4112, "contiguous"), (4099, "vocab_view")):
                g[f"stages{stages}-{_short(dt)}-V{V}"] = _with_setting(
                    _logps_call(3, 17, V, dt, layout=layout), "_NUM_STAGES", stages)
        for rows in (2, 4):
            for weights in ("mask", "labels", "none"):
                for softcap in (None, 30.0):
                    g[f"rows{rows}-{_short(dt)}-{weights}-cap{softcap}"] = _with_setting(
                        _logps_call(3, 17, 4099, dt, layout="vocab_view", weights=weights,
                                    softcap=softcap), "_ROWS", rows)
            g[f"rows{rows}-{_short(dt)}-V123-stages2"] = _with_setting(_with_setting(
                _logps_call(3, 17, 123, dt), "_ROWS", rows), "_NUM_STAGES", 2)
    return g


GRID = _grid()


def record(device, names=None):
    """Run the grid (or the named entries) with the kernels replaced by recorders; the recorded
    launches, one dict each (see the module docstring), in call order."""
    sink = []
    with recording(sink) as state:
        for name in names or GRID:
            state["call"] = name
            GRID[name](device)
    return sink


def unique(launches):
    """The distinct specialisations (what the GPU compiles once each), each with the grid entries
    that launched it."""
    specs = {}
    for ln in launches:
        key = json.dumps([ln["kernel"], ln["signature"], ln["constexprs"], ln["attrs"],
                          ln["num_warps"]], sort_keys=True)
        spec = specs.setdefault(key, {k: ln[k] for k in ("kernel", "signature", "constexprs",
                                                         "attrs", "num_warps")} | {"calls": []})
        if ln["call"] not in spec["calls"]:
            spec["calls"].append(ln["call"])
    return list(specs.values())


def spec_id(spec):
    """A readable id: kernel, flags that are on, dtype, block/warps, and the constexpr-1 ints."""
    c = spec["constexprs"]
    on = [k.removeprefix("HAS_").lower() for k, v in c.items() if v is True]
    for k in ("REDUCTION",):
        if k in c:
            on.append(("sum", "mean", "none")[c[k]])
    if c.get("NUM_STAGES", 1) > 1:
        on.append(f"stages{c['NUM_STAGES']}")
    if "ROWS" in c:
        on.append(f"rows{c['ROWS']}")
    elem = spec["signature"].get("x_ptr") or spec["signature"].get("zy_ptr")
    block = c.get("BLOCK_V", c.get("BLOCK_R"))
    ones = [k for k, v in c.items() if v == 1 and k not in ("NUM_STAGES", "ROWS") and type(v) is int]
    hints = "".join("D" if spec["attrs"].get(k) == "D" else "-"
                    for k in ("V", "stride_xr") if k in spec["signature"])
    return "-".join([spec["kernel"].strip("_").removesuffix("_kernel"), *on, elem.lstrip("*"),
                     f"B{block}w{spec['num_warps']}", "one=" + ",".join(ones) if ones else "no1",
                     hints or "x"])


def compile_spec(spec, cc):
    """triton.compile the recorded specialisation for sm_`cc`, as the launcher would."""
    import triton
    import triton.language as tl
    from fused_dpo.kernels import logps as K
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = getattr(K, spec["kernel"])
    backend = CUDABackend(GPUTarget("cuda", cc, 32))
    names = fn.arg_names
    constexprs = {}
    for name, v in spec["constexprs"].items():
        if isinstance(v, dict):
            v = {"fp32": tl.float32, "fp64": tl.float64}[v["tl_dtype"]]
        constexprs[(names.index(name),)] = v
    attrs = {(names.index(n),): backend.parse_attr(a) for n, a in spec["attrs"].items()}
    return triton.compile(ASTSource(fn, dict(spec["signature"]), constexprs, attrs),
                          target=GPUTarget("cuda", cc, 32), options={"num_warps": spec["num_warps"]})


def _class_key(spec):
    """What changes the generated code beyond the integer hints: the kernel, its declared
    constexprs, the pointer dtypes and the warps (sm_80 compiles one spec of each class)."""
    from fused_dpo.kernels import logps as K

    fn = getattr(K, spec["kernel"])
    declared = {p.name for p in fn.params if p.is_constexpr}
    flags = {k: v for k, v in spec["constexprs"].items() if k in declared}
    ptrs = {k: v for k, v in spec["signature"].items() if v.startswith("*")}
    return json.dumps([spec["kernel"], flags, ptrs, spec["num_warps"]], sort_keys=True)


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill")


def _compile_one(job):
    """(key, cc, result): registers and spills from Triton's own ptxas run (the ptxas it picks for
    the architecture, its options), and what the PTX's global loads and stores look like."""
    key, spec, cc = job
    import io

    import triton

    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            k = compile_spec(spec, cc)
        ptx = k.asm["ptx"]
        text = log.getvalue()
        if not _USED.search(text):  # no log from this Triton: run its ptxas again, -v
            from triton.backends.nvidia.compiler import get_ptxas

            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.ptx")
                with open(src, "w") as f:
                    f.write(ptx)
                arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
                text = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o",
                                       os.path.join(tmp, "k.cubin")], capture_output=True,
                                      text=True, check=True).stderr
        return key, cc, dict(regs=int(_USED.search(text).group(1)),
                             spills=sum(int(n) for n in _SPILL.findall(text)),
                             cubin=bool(k.asm.get("cubin")),
                             vector_load=bool(re.search(r"ld\.global(\.\w+)*\.v[24]", ptx)),
                             vector_store=bool(re.search(r"st\.global(\.\w+)*\.v[24]", ptx)),
                             cp_async="cp.async" in ptx, triton=triton.__version__)
    except Exception as e:  # reported per spec by the test
        return key, cc, dict(error=f"{type(e).__name__}: {str(e)[-2000:]}")


def compile_main(specs_path, out_path):
    """Compile every spec of specs_path (a JSON list of [id, spec]) for sm_90, and one spec of each
    class (see _class_key) for sm_80, in parallel; write {id: {cc: result}} to out_path."""
    from concurrent.futures import ProcessPoolExecutor

    import triton

    if hasattr(triton, "knobs"):  # Triton >= 3.4: print ptxas's -v log (captured per compile)
        triton.knobs.nvidia.dump_ptxas_log = True
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with open(specs_path) as f:
        specs = json.load(f)
    jobs, classes = [], set()
    for key, spec in specs:
        jobs.append((key, spec, 90))
        c = _class_key(spec)
        if c not in classes:
            classes.add(c)
            jobs.append((key, spec, 80))
    report = {}
    with ProcessPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for key, cc, res in pool.map(_compile_one, jobs, chunksize=4):
            report.setdefault(key, {})[str(cc)] = res
    with open(out_path, "w") as f:
        json.dump(report, f)
