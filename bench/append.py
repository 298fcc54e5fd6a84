"""Append throughput of the SQLite log (synchronous=FULL by default).

    python -m bench.append [--events N] [--appenders 256] [--batch 1000] [--commits 2000]
                           [--synchronous FULL] [--large-log PATH]

Prints one line per scenario: group commit with many concurrent single-event appenders,
batched appends (one call records `--batch` events), and single-event commits (one appender,
one event per call, so every event is a commit of its own: the fsync-bound latency). Each line
gives the CPU time of this process per event (user + system, all threads, from /proc), and the
event loop thread's own CPU time (`time.thread_time`): the commit's loop side, which a server's
requests and frames share, where the writer thread's statements and fsync are not.

`--large-log PATH` adds a group commit on a copy of that log (e.g. `bench.fleet`'s 1M-node
registry, `DIR/fleet/events.db`): 32 appenders, each event on a stream picked at random among a
million (as message sends and a large fleet's heartbeats touch streams all over the index).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
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


async def scattered(path: Path, events: int, sync: str) -> float:
    store = SqliteStore(path, synchronous=sync)
    store.verify_on_open = False  # a copy of a log verified elsewhere
    await store.open()
    rng = random.Random(1)
    streams = [f"{rng.getrandbits(64):016x}" for _ in range(1_000_000)]
    per = events // 32

    async def appender() -> None:
        for _ in range(per):
            await store.append([LogNote(stream_id=rng.choice(streams), text="hb", data=BODY)])

    t0, c0, p0 = time.perf_counter(), time.thread_time(), own_cpu_seconds()
    await asyncio.gather(*(appender() for _ in range(32)))
    elapsed, LOOP_CPU["scattered"] = time.perf_counter() - t0, time.thread_time() - c0
    LOOP_CPU["scattered, all threads"] = own_cpu_seconds() - p0
    await store.close()
    return per * 32 / elapsed


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
    parser.add_argument("--large-log", help="an existing SQLite log to copy and append to")
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
        if args.large_log:
            copy = Path(d) / "large.db"
            shutil.copyfile(args.large_log, copy)
            n = min(args.events, 20_000)
            rate = run(scattered(copy, n, args.synchronous))
            used = LOOP_CPU["scattered, all threads"]  # without the set-up's
            print(
                f"append group-commit on {args.large_log}: {rate:,.0f} events/s durable, "
                f"{used / n * 1e6:.2f} µs CPU/event, "
                f"{LOOP_CPU['scattered'] / n * 1e6:.2f} µs on the loop thread "
                f"(32 concurrent single-event appenders, streams at random among 1M, {n:,} events)"
            )


if __name__ == "__main__":
    main()
