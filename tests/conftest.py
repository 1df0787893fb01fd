"""Test setup: Triton's interpreter on CPU, NaN-poisoned allocations, a device fixture."""

import os

import torch
import torch.utils._device as torch_device

if not torch.cuda.is_available():
    # Must happen before triton is imported anywhere: kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


_empty, _empty_like = torch.empty, torch.empty_like
# torch.device("meta") recognises factory functions by identity, from a set cached at its first use:
# filled now, with the real torch.empty, it is not poisoned by the wrapper below (under which the
# plan's meta skeletons would allocate their weights for real: 32 GB for llama3-8b).
torch_device._device_constructors()


def _poison(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(-(2**30))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every torch.empty / empty_like result starts as NaN, so an element no kernel wrote fails."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model training runs: a second intra-op thread only adds overhead (4x
    slower when the cores are busy), so they run on one, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
