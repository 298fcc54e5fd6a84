"""bench.http_path drives seed 001's send and a node's heartbeat against `broker serve` (and a bare
aiohttp application, `--floor`) with two clients: a short run must still print every figure (its
clients check each answer's status, so a refused request fails the run). No figure is checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_run_prints_every_figure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.http_path", "--seconds", "0.3", "--runs", "1", "--floor"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| figure | this tree | aiohttp alone |" in out.stdout, out.stdout
    for target in ("send", "heartbeat"):
        for client in ("raw", "aiohttp"):
            for what in ("requests/s", "server CPU µs/request", "client CPU µs/request"):
                assert f"| {target} ({client}) {what} |" in out.stdout, out.stdout
