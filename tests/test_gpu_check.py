"""bench/gpu_check.sh without a GPU: its argument handling, and every group inside the 300 s that
leaves room to rerun within the device budget (its --dry-run sums the timeouts, setup included)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
GROUPS = ("correct", "perf", "ops", "train", "fit", "plan")
LIMIT_S = 300

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [(), ("nonsense",), ("--dry-run",), ("perf", "train")],
                         ids=["none", "unknown", "dry-run-alone", "two"])
def test_usage_and_exit_2(args):
    r = _run(*args)
    assert r.returncode == 2, r
    assert "usage: bash bench/gpu_check.sh" in r.stderr


@pytest.mark.parametrize("group", GROUPS)
def test_group_fits_its_budget(group):
    r = _run("--dry-run", group)
    assert r.returncode == 0, r
    stages = [int(t) for t in re.findall(r"^\s+(\d+) s  ", r.stdout, flags=re.M)]
    setup = int(re.search(r"setup (\d+) s", r.stdout).group(1))
    total = int(re.search(r"total (\d+) s", r.stdout).group(1))
    assert stages and all(t > 5 for t in stages), r.stdout  # each stage keeps 5 s to end after its signal
    assert total == setup + sum(stages) <= LIMIT_S, r.stdout


def test_header_names_every_group():
    head = SCRIPT.read_text().split("set -uo pipefail")[0]
    for group in GROUPS:
        assert re.search(rf"^#\s+\d\. {group}\b", head, flags=re.M), group
