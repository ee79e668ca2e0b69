"""The suite itself: every xdist worker must collect the same test names, or the run stops before a test runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from etl_support import ROOT

SHIFTED = """\
import random, time
_real_time, _real_time_ns = time.time, time.time_ns
time.time = lambda: _real_time() + {shift}
time.time_ns = lambda: _real_time_ns() + {shift} * 1_000_000_000
random.seed({shift})
"""


def collected(tmp_path: Path, shift: int, hash_seed: str) -> list[str]:
    """The test ids pytest collects with the clock moved `shift` seconds on and the module RNG seeded with it."""
    site = tmp_path / f"shift-{shift}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SHIFTED.format(shift=shift))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "PYTHONHASHSEED": hash_seed,
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_the_same_tests_are_collected_whatever_the_clock_rng_and_hash_seed(tmp_path: Path) -> None:
    """A parameter made at collection (a gzip body stamped with the time, say) named in an id gave the two
    workers different names once a second ticked between them: CI failed before running a test."""
    first = collected(tmp_path, 0, "1")
    later = collected(tmp_path, 86_461, "2")
    assert len(first) > 1000
    assert [name for name in first if name not in set(later)] == []
    assert first == later
