"""bench.retention generates a fleet's history, loads it with `broker import`, compacts it and
starts and verifies the log: a quick run on a tiny fleet must still print every figure (the
benchmark breaks silently otherwise). No figure is checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIGURES = [
    "history:",
    "import:",
    "disk before:",
    "verify before compaction (full):",
    "compaction:",
    "append p99 during compaction:",
    "disk after:",
    "8 days of heartbeats of the same fleet",
    "cold start after compaction:",
    "verify after compaction (full):",
    "background verification",
    "verify from the last checkpoint,",
    "extrapolated disk after:",
    "extrapolated compaction:",
    "extrapolated verify from the last checkpoint",
]


@pytest.mark.parametrize("mix", [[], ["--issue-rates", "--days", "3"]], ids=["default", "issue"])
def test_a_quick_run_prints_every_figure(tmp_path: Path, mix: list[str]) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.retention",
            "--quick",
            "--nodes",
            "20",
            "--tmp",
            str(tmp_path),
            *mix,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for figure in FIGURES:
        found = [line for line in lines if line.startswith(figure)]
        assert len(found) == 1, f"{figure!r} not printed once in:\n{out.stdout}"
