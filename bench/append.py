"""Append throughput of the SQLite log (synchronous=FULL by default).

    python -m bench.append [--events N] [--appenders 256] [--batch 1000] [--commits 2000]
                           [--synchronous FULL]

Prints one line per scenario: group commit with many concurrent single-event appenders,
batched appends (one call records `--batch` events), and single-event commits (one appender,
one event per call, so every event is a commit of its own: the fsync-bound latency). Each line
gives the CPU time of this process per event (user + system, all threads, from /proc), and the
event loop thread's own CPU time (`time.thread_time`): the commit's loop side, which a server's
requests and frames share, where the writer thread's statements and fsync are not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds, machine, run
from eventstore.events import LogNote
from eventstore.sqlite import SqliteStore

BODY = {"payload": "x" * 200}


LOOP_CPU: dict[str, float] = {}  # scenario -> the loop thread's CPU seconds


async def group_commit(path: Path, events: int, appenders: int, sync: str) -> float:
    store = SqliteStore(path, synchronous=sync)
    await store.open()
    per = events // appenders

    async def appender(i: int) -> None:
        stream = f"node-{i}"
        for _ in range(per):
            await store.append([LogNote(stream_id=stream, text="hb", data=BODY)])

    t0, c0 = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(appender(i) for i in range(appenders)))
    elapsed, LOOP_CPU["group"] = time.perf_counter() - t0, time.thread_time() - c0
    await store.close()
    return per * appenders / elapsed


async def batched(path: Path, events: int, batch: int, sync: str) -> float:
    store = SqliteStore(path, synchronous=sync)
    await store.open()
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(0, events, batch):
        await store.append(
            [LogNote(stream_id=f"s{j % 100}", text="b", data=BODY) for j in range(i, i + batch)]
        )
    elapsed, LOOP_CPU["batched"] = time.perf_counter() - t0, time.thread_time() - c0
    await store.close()
    return events / elapsed


async def single(path: Path, commits: int, sync: str) -> float:
    store = SqliteStore(path, synchronous=sync)
    await store.open()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(commits):
        await store.append([LogNote(stream_id="s", text="one", data=BODY)])
    elapsed, LOOP_CPU["single"] = time.perf_counter() - t0, time.thread_time() - c0
    await store.close()
    return commits / elapsed


def own_cpu_seconds() -> float:
    return cpu_seconds(os.getpid()) or 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--appenders", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--synchronous", default="FULL")
    args = parser.parse_args()
    print(f"# {machine()}; SQLite synchronous={args.synchronous}")
    with tempfile.TemporaryDirectory() as d:
        cpu = own_cpu_seconds()
        rate = run(group_commit(Path(d) / "gc.db", args.events, args.appenders, args.synchronous))
        cpu, used = own_cpu_seconds(), own_cpu_seconds() - cpu
        print(
            f"append group-commit: {rate:,.0f} events/s durable, "
            f"{used / args.events * 1e6:.2f} µs CPU/event, "
            f"{LOOP_CPU['group'] / args.events * 1e6:.2f} µs on the loop thread "
            f"({args.appenders} concurrent single-event appenders, {args.events:,} events)"
        )
        rate = run(batched(Path(d) / "b.db", args.events * 2, args.batch, args.synchronous))
        cpu, used = own_cpu_seconds(), own_cpu_seconds() - cpu
        print(
            f"append batched: {rate:,.0f} events/s durable, "
            f"{used / (args.events * 2) * 1e6:.2f} µs CPU/event, "
            f"{LOOP_CPU['batched'] / (args.events * 2) * 1e6:.2f} µs on the loop thread "
            f"({args.batch} events per call, {args.events * 2:,} events)"
        )
        rate = run(single(Path(d) / "s.db", args.commits, args.synchronous))
        used = own_cpu_seconds() - cpu
        print(
            f"append single-event commits: {rate:,.0f} commits/s durable, "
            f"{used / args.commits * 1e6:.1f} µs CPU/commit, "
            f"{LOOP_CPU['single'] / args.commits * 1e6:.1f} µs on the loop thread "
            f"(one appender, one event per call, {args.commits:,} commits)"
        )


if __name__ == "__main__":
    main()
