"""What a wheel holds: every subpackage of fused_dpo is listed in setup.py (an editable install
finds them anyway, so only this test notices one left out)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_packages() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no packages= list")


def test_every_subpackage_is_packaged():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fused_dpo").rglob("__init__.py")}
    found.add("fused_dpo.kernels")  # installed from the top-level kernels/ folder
    assert found <= _setup_packages(), f"missing from setup.py: {sorted(found - _setup_packages())}"
