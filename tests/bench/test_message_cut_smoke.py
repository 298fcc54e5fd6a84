"""bench.message_cut builds a message backlog, snapshots it as a running server does and loads it
back: a small run must print every figure (it checks the backlog came back whole). No figure is
checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_run_prints_every_figure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.message_cut", "--pending", "300", "--completed", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for figure in ("the cut:", "longest step while writing:", "of CPU;", "loaded back in"):
        assert figure in out.stdout, out.stdout
    assert "replayed from the log instead: [])" in out.stdout, out.stdout
