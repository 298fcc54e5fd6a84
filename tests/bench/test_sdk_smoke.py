"""bench.sdk (one SDK producer to one SDK consumer through `broker serve`) runs and prints its
figure line; every message sent reaches the consumer (the benchmark waits for all of them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sdk_prints_its_figure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.sdk", "--messages", "60", "--concurrency", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("sdk producer -> sdk consumer:")]
    assert "(60 messages, 4 sends in flight)" in line
