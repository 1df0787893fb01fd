"""CPU benchmarks (pytest-benchmark): the chunked torch path against the eager reference, with
peak memory from the profiler. `make bench-cpu`; not part of `make test`'s pass/fail."""

import pytest
import torch

from fused_dpo import get_logps, get_logps_from_hidden
from fused_dpo.check import measure_peak_bytes
from fused_dpo.reference import get_logps_from_hidden_reference

SHAPES = [(4, 256, 32000), (2, 512, 128256)]


def _inputs(B, T, V):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, T, V, generator=g) * 2).bfloat16()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 4 :] = True
    return x, ids, mask


def _run(benchmark, step):
    peak = measure_peak_bytes(step) / 2**20
    benchmark.extra_info["peak_MiB"] = round(peak, 1)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    print(f"\n{benchmark.name}: peak {peak:.1f} MiB allocated above inputs")


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-V{}".format(*s))
def test_logits_fwd_bwd(benchmark, impl, shape):
    x, ids, mask = _inputs(*shape)

    def step():
        xx = x.detach().requires_grad_(True)
        get_logps(xx, ids, mask, impl=impl).sum().backward()

    _run(benchmark, step)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_hidden_fwd_bwd(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 256, 512, 32000
    h = torch.randn(B, T, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) / H**0.5).bfloat16()
    ids = torch.randint(0, V, (B, T), generator=g)
    fn = get_logps_from_hidden_reference if impl == "reference" else get_logps_from_hidden

    def step():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        fn(hh, ww, ids).sum().backward()

    _run(benchmark, step)
