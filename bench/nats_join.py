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
from pathlib import Path

import msgspec

from bench.common import cpu_seconds, machine, run
from bench.fleet import T0, broker_env, generate, node_id, serve, shared_key
from bench.scale import nats_server
from eventstore.codec import JsonRecord
from eventstore.events import NodeHeartbeat
from eventstore.nats import NatsStore

STREAM = "FLEET_JOIN"
GOAL = 5.0  # seconds (issue 16)


def add_heartbeats(path: Path, nodes: int, events: int) -> None:
    """Append heartbeats to the export at `path` (which holds `nodes` registrations)."""
    encode = msgspec.json.Encoder().encode
    versions = [1] * nodes
    with open(path, "ab") as f:
        lines = []
        for seq in range(nodes + 1, events + 1):
            i = seq % nodes
            versions[i] += 1
            data = {
                "node_id": node_id(i),
                "timestamp": T0 + seq * 0.01,
                "status": "online",
                "metrics": {"cpu": seq % 100, "mem": (seq * 7) % 100, "uptime": seq},
            }
            rec = JsonRecord(
                seq=seq,
                stream=node_id(i),
                stream_version=versions[i],
                ts=T0 + seq * 0.01,
                id=f"{seq:032x}",
                type="node.heartbeat",
                data=data,
            )
            lines.append(encode(rec))
            if len(lines) >= 10_000:
                f.write(b"\n".join(lines) + b"\n")
                lines = []
        if lines:
            f.write(b"\n".join(lines) + b"\n")


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


def start(data: Path, url: str, label: str, **extra: str) -> dict[str, object]:
    """`broker serve` on the stream: seconds to /health 200, CPU seconds, its start-up log."""
    env = nats_env(url, BROKER_LOG__LEVEL="info", BROKER_LOG__FORMAT="json", **extra)
    with serve(data, **env) as server:
        cpu = cpu_seconds(server.pid) or 0.0
        started = server.started
        lines = list(server.log)
    booted = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") in ("snapshot_loaded", "log_replayed"):
            booted = rec
    verdict = "goal met" if started <= GOAL else "goal missed"
    goal = f"  (goal <= {GOAL:g} s: {verdict})" if "snapshot" in label else ""
    print(f"{label:<26} {started:7.2f} s   cpu {cpu:6.2f} s{goal}", flush=True)
    return booted


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
            start(tmp / "a", url, "first instance")
            run(append_tail(url, args.nodes, args.tail))
            print(f"tail: {args.tail:,} heartbeats appended after the snapshot")
            booted = start(tmp / "b", url, "join from snapshot")
            print(
                f"  its start-up: snapshot at seq {booted.get('seq')}, log index at stream "
                f"message {booted.get('log_from')}, tail of {booted.get('tail')} events applied"
            )
            start(tmp / "c", url, "join from scratch", BROKER_SNAPSHOTS__ENABLED="false")


if __name__ == "__main__":
    main()
