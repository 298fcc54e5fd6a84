"""Replay speed: rebuilding the projections from the log, and cold start of `broker serve`.

    python -m bench.replay [--events 1000000] [--keep PATH]

Builds a log of `--events` events (a mix of operator and system events), then prints:
- `replay rebuild`: events/s read from SQLite and applied to every projection (what
  `broker replay --rebuild` and start-up do);
- `verify`: events/s through the full checksum + hash-chain check (`broker verify`);
- `cold start`: seconds from launching `broker serve` until /health answers 200 (verify + replay).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import machine, run
from broker.runtime import build_projections
from eventstore.events import BaseEvent, LogNote, UserCreated, UserRoleGranted
from eventstore.sqlite import SqliteStore, verify_file


def sample(i: int) -> BaseEvent:
    if i % 10 == 0:
        return UserCreated(user_id=f"usr_{i}", username=f"user{i}", password_hash="x" * 40)
    if i % 10 == 1:
        return UserRoleGranted(user_id=f"usr_{i - 1}", role="viewer")
    return LogNote(stream_id=f"node-{i % 500}", text="heartbeat", data={"cpu": 0.5, "mem": 0.25})


async def build(path: Path, events: int) -> None:
    store = SqliteStore(path, synchronous="NORMAL")
    await store.open()
    for i in range(0, events, 5000):
        await store.append([sample(j) for j in range(i, min(events, i + 5000))])
    await store.close()


async def rebuild(path: Path) -> tuple[int, float]:
    store = SqliteStore(path, readonly=True)
    await store.open()
    projections = build_projections()
    t0 = time.perf_counter()
    async for env in store.read(1):
        projections.apply(env)
    elapsed = time.perf_counter() - t0
    await store.close()
    return projections.applied, elapsed


def cold_start(path: Path) -> float:
    port = 18000 + os.getpid() % 1000
    env = {
        **os.environ,
        "BROKER_STORE__PATH": str(path),
        "BROKER_SERVER__PORT": str(port),
        "BROKER_SERVER__DATA_DIR": str(path.parent),
        "BROKER_LOG__LEVEL": "warning",
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("broker serve exited") from None
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"# {machine()}")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.db"
        run(build(path, args.events))
        n, elapsed = run(rebuild(path))
        print(f"replay rebuild: {n / elapsed:,.0f} events/s ({n:,} events in {elapsed:.2f} s)")
        t0 = time.perf_counter()
        verify_file(path)
        elapsed = time.perf_counter() - t0
        print(f"verify: {args.events / elapsed:,.0f} events/s ({elapsed:.2f} s)")
        print(
            f"cold start: {cold_start(path):.2f} s to /health 200 on {args.events:,} events "
            "(hash-chain verify + replay)"
        )


if __name__ == "__main__":
    main()
