"""A new instance joining a NATS JetStream log: from a snapshot plus the tail, and from scratch.

    python -m bench.nats_join [--nodes 10000] [--events 2000000] [--tail 20000]

Starts a private nats-server (JetStream, a temporary store directory), then builds the log
through the product's own paths: a `broker export` of `--nodes` registrations followed by
heartbeats up to `--events` events (every event its own time, so a message of the stream holds
64 events, as `broker import` groups them), loaded with `broker import` into the stream. Then:

1. `first instance`: `broker serve` on the stream with no snapshot anywhere (it reads the whole
   stream), stopped with SIGTERM: its shutdown writes a snapshot and uploads it to the stream's
   object store bucket;
2. `--tail` more heartbeats are appended by this process through the store (`NatsStore.append`,
   200 at a time in flight: the group commit of a live instance);
3. `join from snapshot`: `broker serve` on a fresh data directory: it downloads the snapshot,
   loads the log's index and the projections from it and consumes only the tail;
4. `join from scratch`: the same with `[snapshots] enabled = false`: the whole stream.

Each line gives the seconds from launch to /health 200 and the CPU time of the server process
(/proc/<pid>/stat) over that time; the join from a snapshot also prints what its start-up log
says it did (the snapshot's seq, the stream message its index was at, the tail applied).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import cpu_seconds, machine, run
from bench.fleet import T0, broker_env, generate, node_id, serve, shared_key, write_records
from bench.scale import nats_server
from eventstore.codec import JsonRecord
from eventstore.events import NodeHeartbeat
from eventstore.nats import NatsStore

STREAM = "FLEET_JOIN"
GOAL = 5.0  # seconds (issue 16)


def add_heartbeats(path: Path, nodes: int, events: int) -> None:
    """Append heartbeats to the export at `path` (which holds `nodes` registrations)."""
    versions = [1] * nodes

    def records() -> Iterator[JsonRecord]:
        for seq in range(nodes + 1, events + 1):
            i = seq % nodes
            versions[i] += 1
            data = {
                "node_id": node_id(i),
                "timestamp": T0 + seq * 0.01,
                "status": "online",
                "metrics": {"cpu": seq % 100, "mem": (seq * 7) % 100, "uptime": seq},
            }
            yield JsonRecord(
                seq=seq,
                stream=node_id(i),
                stream_version=versions[i],
                ts=T0 + seq * 0.01,
                id=f"{seq:032x}",
                type="node.heartbeat",
                data=data,
            )

    write_records(path, records(), "ab")


def nats_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "BROKER_STORE__BACKEND": "nats",
        "BROKER_STORE__URL": url,
        "BROKER_STORE__STREAM": STREAM,
        **extra,
    }


def broker_import(data: Path, export: Path, url: str) -> None:
    import subprocess

    subprocess.run(
        [sys.executable, "-m", "broker", "import", str(export)],
        env=broker_env(data, 0, **nats_env(url)),
        check=True,
        stdout=subprocess.DEVNULL,
    )


async def append_tail(url: str, nodes: int, count: int) -> None:
    store = NatsStore(url, STREAM)
    await store.open()
    try:
        sem = asyncio.Semaphore(200)

        async def one(k: int) -> None:
            async with sem:
                await store.append([NodeHeartbeat(node_id=node_id(k % nodes), status="online")])

        await asyncio.gather(*(one(k) for k in range(count)))
    finally:
        await store.close()


def records(lines: list[str]) -> dict[str, dict[str, object]]:
    """The server's JSON log lines, the last of each event name."""
    out = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            out[str(rec["event"])] = rec
    return out


def start(data: Path, url: str, label: str, **extra: str) -> dict[str, dict[str, object]]:
    """`broker serve` on the stream, stopped with SIGTERM: prints seconds to /health 200 and CPU
    seconds over them; returns its log (start-up, and the snapshot its shutdown wrote)."""
    env = nats_env(url, BROKER_LOG__LEVEL="info", BROKER_LOG__FORMAT="json", **extra)
    with serve(data, **env) as server:
        cpu = cpu_seconds(server.pid) or 0.0
        started = server.started
    deadline = time.monotonic() + 10  # the reader thread drains the rest of its stderr
    while time.monotonic() < deadline and not any("snapshot_" in x for x in server.log[-5:]):
        time.sleep(0.05)
    verdict = "goal met" if started <= GOAL else "goal missed"
    goal = f"  (goal <= {GOAL:g} s: {verdict})" if "snapshot" in label else ""
    print(f"{label:<26} {started:7.2f} s   cpu {cpu:6.2f} s{goal}", flush=True)
    return records(server.log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--tail", type=int, default=20_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="nats-join-") as tmp_name:
        tmp = Path(tmp_name)
        with nats_server(tmp / "nats") as (url, _port):
            export = tmp / "export.jsonl"
            _key, pem = shared_key()
            generate(export, args.nodes, pem)
            add_heartbeats(export, args.nodes, args.events)
            t0 = time.perf_counter()
            broker_import(tmp / "import", export, url)
            took = time.perf_counter() - t0
            print(f"stream built: {args.events:,} events by `broker import` in {took:.1f} s")
            written = start(tmp / "a", url, "first instance").get("snapshot_written", {})
            print(
                f"  its shutdown snapshot: {written.get('bytes', 0):,} bytes, cut "
                f"{written.get('cut_ms')} ms, written and uploaded in {written.get('total_ms')} ms"
            )
            run(append_tail(url, args.nodes, args.tail))
            print(f"tail: {args.tail:,} heartbeats appended after the snapshot")
            booted = start(tmp / "b", url, "join from snapshot").get("snapshot_loaded", {})
            print(
                f"  its start-up: snapshot at seq {booted.get('seq')}, log index at stream "
                f"message {booted.get('log_from')}, tail of {booted.get('tail')} events applied, "
                f"open_log {booted.get('seconds')} s (download, load, tail)"
            )
            start(tmp / "c", url, "join from scratch", BROKER_SNAPSHOTS__ENABLED="false")


if __name__ == "__main__":
    main()
