"""The declared minimum torch: pyproject.toml and the import-time check agree, and an older torch
gets a clear ImportError instead of torch.library's schema error. `make compat` (.ci/compat)
installs the declared minimums themselves and runs a subset of the suite there."""

import importlib
import re
from pathlib import Path

import pytest
import torch

import fused_dpo._requires as requires

ROOT = Path(__file__).resolve().parents[1]


def _declared(name: str) -> tuple[int, ...]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for v in project["optional-dependencies"].values() for r in v]
    found = [m.group(1) for r in reqs if (m := re.fullmatch(rf"{name}\s*>=\s*([0-9.]+)", r))]
    assert len(found) == 1, (name, found)  # .ci/compat reads the one minimum the same way
    return tuple(int(p) for p in found[0].split("."))


def test_min_torch_is_the_declared_one():
    assert requires.MIN_TORCH == _declared("torch")[:2]


@pytest.mark.parametrize("version", ["2.4.1", "2.5.1+cu124"])
def test_older_torch_is_refused_at_import(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ImportError, match=rf"needs torch >= 2\.6; this is torch {re.escape(version)}"):
        importlib.reload(requires)
    monkeypatch.undo()
    importlib.reload(requires)  # the module as it was, for the rest of the session


def test_declared_minimums_exist():
    # the floor `make compat` installs: one `>=` minimum each for torch, triton and transformers
    for name in ("torch", "triton", "transformers"):
        assert _declared(name)
