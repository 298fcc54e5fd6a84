"""bench.console (what the Fleet page's refresh and search cost) runs on a small registry and
prints a figure line per operation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_console_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.console", "--nodes", "500", "--reps", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(x.startswith("first search, its orders not built yet") for x in lines)
    figures = [x for x in lines if "p50" in x and "cpu" in x]
    assert len(figures) == 8, out.stdout
    assert figures[0].startswith("fleet refresh (page of 50 + 3 counts)")
