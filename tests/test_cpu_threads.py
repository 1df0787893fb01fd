"""The CPU torch path's own thread count (FUSED_DPO_TORCH_THREADS, default 1): set for its
launchers, restored afterwards, also after an exception."""

import pytest
import torch
from helpers import make_inputs

from fused_dpo import get_logps
from fused_dpo._common import _openmp_backend, intra_op_threads


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not _openmp_backend(), reason="the count is per thread under OpenMP only")
def test_thread_count_is_set_and_restored(two_threads):
    seen = []
    with intra_op_threads(1):
        seen.append(torch.get_num_threads())
    assert seen == [1] and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"), intra_op_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    logits, ids, mask = make_inputs(2, 5, 11, torch.float32, "cpu")
    logits.requires_grad_(True)
    get_logps(logits, ids, mask, impl="torch").sum().backward()
    assert torch.get_num_threads() == 2


def test_bad_thread_setting_is_named(monkeypatch):
    monkeypatch.setenv("FUSED_DPO_TORCH_THREADS", "two")
    logits, ids, mask = make_inputs(1, 4, 7, torch.float32, "cpu")
    with pytest.raises(ValueError, match="FUSED_DPO_TORCH_THREADS must be an integer >= 0"):
        get_logps(logits, ids, mask, impl="torch")
