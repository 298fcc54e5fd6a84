"""bench.hotpath drives the server's per-message code through fake sockets: a short run must
still send, push and ack every message exactly once (the benchmark breaks silently otherwise)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.hotpath import one_run


async def test_a_short_run_sends_pushes_and_acks_everything(tmp_path: Path) -> None:
    args = argparse.Namespace(messages=230, batch=50, repeat=1, sync="OFF")
    run = await one_run(args, tmp_path)
    assert (run.sent, run.pushed, run.acked) == (230, 230, 230)
    assert run.cpu_us > 0
