"""bench.retention generates a fleet's history, loads it with `broker import`, compacts it and
starts and verifies the log: a quick run on a tiny fleet must still print every figure (the
benchmark breaks silently otherwise). No figure is checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FIGURES = [
    "history:",
    "import:",
    "disk before:",
    "verify before compaction (full):",
    "compaction:",
    "append p99 during compaction:",
    "disk after:",
    "cold start after compaction:",
    "verify after compaction (full):",
    "verify from the last checkpoint,",
    "extrapolated disk after:",
    "extrapolated compaction:",
    "extrapolated verify from the last checkpoint",
]


def test_a_quick_run_prints_every_figure(tmp_path: Path) -> None:
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
