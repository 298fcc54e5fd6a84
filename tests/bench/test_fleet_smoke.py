"""bench.fleet builds its registry with `broker import`, then starts `broker serve` on it several
times: a quick run on a tiny registry must still print every figure with its verdict (the
benchmark breaks silently otherwise). No figure is checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FIGURES = [
    "cold start without a snapshot:",
    "cold start with a snapshot:",
    "rss per node:",
    "rss per node after a start with a snapshot:",
    "discovery by type:",
    "discovery by capability:",
    "discovery by region:",
    "discovery combined:",
    "discovery no filter:",
    "discovery deep page skip=",
    "discovery online=true:",
    "http heartbeats,",
    "ws heartbeats, one op a frame,",
    "ws heartbeats durable rate:",
    "idle connections:",
    "snapshot pause:",
    "snapshot rss peak:",
]


def test_a_quick_run_prints_every_figure(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--quick", "--nodes", "300", "--idle", "20"]
        + ["--tmp", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for figure in FIGURES:
        found = [line for line in lines if line.startswith(figure)]
        assert len(found) == 1, f"{figure!r} not printed once in:\n{out.stdout}"
        assert found[0].endswith(("goal met", "goal missed")), found[0]
