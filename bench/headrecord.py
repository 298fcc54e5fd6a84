"""What the SQLite log's head record (`<log>.head`, eventstore/sqlite_head.py) costs a commit.

    python -m bench.headrecord [--commits 500] [--rounds 10] [--synchronous FULL]

Single-event commits (one appender, one event a call: nothing shares a commit's fsync), in
rounds that take the variants in turn so that a noisy machine affects them alike; prints the
median and minimum wall time and CPU time (this process, all threads, from /proc) per commit:

- `no record`: the log as it was before the record (the writer's handle removed);
- `pwrite only`: the record written after each commit, never synced;
- `inline fdatasync`: written and fdatasync'ed after each commit, before the append returns;
- `shipped`: what the store does: written after each commit, synced by its own thread at most
  every `SYNC_INTERVAL`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds, machine, run
from eventstore.events import LogNote
from eventstore.sqlite import SqliteStore

BODY = {"payload": "x" * 200}
VARIANTS = ("no record", "pwrite only", "inline fdatasync", "shipped")


async def commits(path: Path, n: int, variant: str, sync: str) -> tuple[float, float]:
    store = SqliteStore(path, synchronous=sync)
    await store.open()
    writer = store._head_writer
    assert writer is not None
    if variant == "no record":
        store._head_writer = None
    elif variant == "pwrite only":
        store._head_sync = False
    elif variant == "inline fdatasync":
        writer.sync_soon = writer.sync  # type: ignore[method-assign]
    cpu0, t0 = cpu_seconds(os.getpid()) or 0.0, time.perf_counter()
    for _ in range(n):
        await store.append([LogNote(stream_id="s", text="one", data=BODY)])
    wall, cpu = time.perf_counter() - t0, (cpu_seconds(os.getpid()) or 0.0) - cpu0
    store._head_writer = writer  # closed with the store
    await store.close()
    return wall / n * 1e6, cpu / n * 1e6


async def main(n: int, rounds: int, sync: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            for i, variant in enumerate(VARIANTS):
                out[variant].append(await commits(Path(d) / f"{r}-{i}.db", n, variant, sync))
    return out


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--synchronous", default="FULL")
    args = parser.parse_args()
    print(f"# {machine()}; SQLite synchronous={args.synchronous}")
    results = run(main(args.commits, args.rounds, args.synchronous))
    for variant, runs in results.items():
        wall, cpu = [w for w, _ in runs], [c for _, c in runs]
        print(
            f"head record, {variant}: {statistics.median(wall):,.0f} µs wall per commit "
            f"(min {min(wall):,.0f}), {statistics.median(cpu):,.0f} µs CPU per commit "
            f"(min {min(cpu):,.0f}); single-event commits, {args.rounds} rounds of "
            f"{args.commits:,}"
        )


if __name__ == "__main__":
    cli()
