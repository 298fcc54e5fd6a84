"""Compaction of a NATS JetStream log: time, messages purged, stream size, and a join after it.

    python -m bench.nats_compact [--nodes 10000] [--days 30] [--beats-per-day 4]

Starts a private nats-server (JetStream, a temporary store directory) and builds the log through
the product's own paths: a `broker export` of `--nodes` registrations followed by heartbeats
spread evenly over the last `--days` days (past timestamps), loaded with `broker import`
(removable events go to their own subject, a message per hour of heartbeats at most). Then, in
this process, an instance opens the stream (no snapshot: the whole stream) and:

1. appends heartbeats one at a time, back to back, for 2 s: the append latency before;
2. compacts (`[retention]` defaults: heartbeats older than 7 days go) while the same appends go
   on: the compaction's wall and CPU time (this process, /proc), the events removed, the stream
   messages purged, the stream's messages and bytes before and after (NATS' stream info), and
   the append latency during the compaction (p50/p99);
3. stops (a snapshot at its shutdown).

Then `broker verify` (a process: seconds, CPU) and `broker serve` on a fresh data directory
(`join after compaction`: seconds to /health 200 and CPU, from the snapshot plus the tail).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import cpu_seconds, machine, run
from bench.fleet import broker_env, generate, node_id, shared_key, write_records
from bench.nats_join import STREAM, broker_import, nats_env, start
from bench.scale import nats_server
from broker.config import Config, SnapshotsConfig, StoreConfig
from eventstore.codec import JsonRecord
from eventstore.events import NodeHeartbeat

DAY = 86400.0


def add_heartbeats(path: Path, nodes: int, days: float, per_day: int) -> int:
    """Append heartbeats over the last `days` days to the export at `path` (which holds `nodes`
    registrations, seqs 1..nodes); the number of events."""
    total = int(nodes * days * per_day)
    start_ts = time.time() - days * DAY
    step = days * DAY / max(1, total)
    versions = [1] * nodes

    def records() -> Iterator[JsonRecord]:
        for k in range(total):
            i = k % nodes
            versions[i] += 1
            ts = start_ts + k * step
            yield JsonRecord(
                seq=nodes + 1 + k,
                stream=node_id(i),
                stream_version=versions[i],
                ts=ts,
                id=f"{nodes + 1 + k:032x}",
                type="node.heartbeat",
                data={"node_id": node_id(i), "timestamp": ts, "status": "online", "metrics": {}},
            )

    write_records(path, records(), "ab")
    return nodes + total


def quantiles(samples: list[float]) -> str:
    if not samples:
        return "no appends"
    s = sorted(samples)
    p50, p99 = s[len(s) // 2] * 1e3, s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3
    return f"{len(s):,} appends, p50 {p50:.2f} ms, p99 {p99:.2f} ms"


async def compact(url: str, data: Path) -> None:
    from broker.upkeep.compaction import offline

    config = Config(store=StoreConfig(backend="nats", url=url, stream=STREAM))
    config.server.data_dir = str(data)
    config.snapshots = SnapshotsConfig(directory=str(data / "snapshots"), keep=2)
    t0 = time.perf_counter()
    async with offline(config) as compactor:
        print(f"instance opened (whole stream, no snapshot) in {time.perf_counter() - t0:.1f} s")
        runtime, pid = compactor.runtime, os.getpid()
        samples: list[float] = []
        stop = asyncio.Event()

        async def appends() -> None:
            k = 0
            while not stop.is_set():
                t = time.perf_counter()
                await runtime.record([NodeHeartbeat(node_id=node_id(k % 100), status="online")])
                samples.append(time.perf_counter() - t)
                k += 1

        task = asyncio.create_task(appends())
        await asyncio.sleep(2.0)
        before, samples[:] = list(samples), []
        print(f"appends before:  {quantiles(before)}")
        cpu0, t0 = cpu_seconds(pid) or 0.0, time.perf_counter()
        report = await compactor.compact()
        wall, cpu = time.perf_counter() - t0, (cpu_seconds(pid) or 0.0) - cpu0
        during = list(samples)
        stop.set()
        await task
        print(f"appends during:  {quantiles(during)}")
        _allowed, messages, _bytes = await runtime.store.stream_size()  # type: ignore[attr-defined]
        purged = next((n for n in report.notes if "messages purged" in n), "")
        print(
            f"compaction: {wall:.2f} s, cpu {cpu:.2f} s (this process: the appends too), "
            f"{report.removed_total:,} events removed ({report.removed}), {purged.split(': ')[-1]}"
        )
        print(
            f"  stream: {report.log_bytes_before:,} -> {report.log_bytes_after:,} bytes, "
            f"{messages:,} messages left; snapshot at seq {report.snapshot_seq:,}, "
            f"recorded as log.compacted at seq {report.compaction_seq}"
        )


def verify(data: Path, url: str) -> None:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "verify"],
        env=broker_env(data, 0, **nats_env(url)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    took, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    code = os.waitstatus_to_exitcode(status)
    print(f"broker verify:   {took:.2f} s, cpu {cpu:.2f} s, exit {code}")
    print(f"  {out.strip()[:400]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--beats-per-day", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="nats-compact-") as tmp_name:
        tmp = Path(tmp_name)
        with nats_server(tmp / "nats") as (url, _port):
            export = tmp / "export.jsonl"
            _key, pem = shared_key()
            generate(export, args.nodes, pem)
            events = add_heartbeats(export, args.nodes, args.days, args.beats_per_day)
            t0 = time.perf_counter()
            broker_import(tmp / "import", export, url)
            print(
                f"stream built: {events:,} events ({args.nodes:,} nodes, heartbeats over "
                f"{args.days:g} days) by `broker import` in {time.perf_counter() - t0:.1f} s"
            )
            run(compact(url, tmp / "a"))
            verify(tmp / "v", url)
            start(tmp / "b", url, "join after compaction")


if __name__ == "__main__":
    main()
