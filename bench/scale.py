"""Scale-out: end-to-end messages/s with 1, 2 and 3 broker instances on one NATS JetStream
stream (nodes spread over them), and one instance on the embedded SQLite log beside them.

    python -m bench.scale [--nodes 60] [--messages 60000] [--instances 1,2,3] [--no-sqlite]

Starts a private nats-server (JetStream, a temporary store directory, default durability), then
for each configuration starts the broker processes (one shared signing key), registers and logs
in `--nodes` nodes through the first instance, connects node i's WebSocket to instance i mod N
(node i sends to node i+1: with N > 1, always a node on another instance) and runs the load of
`bench.e2e` (batched `send` ops, pushes, batched `ack` ops: two durable events per message).
Each line gives messages/s and the CPU time per message of each process, in µs (from
/proc/<pid>/stat): what bounds the figure on this machine, and what more cores would give.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp

from bench.common import cpu_seconds, machine, own_cpu_seconds, per_item_us, run
from bench.e2e import Peer, onboard, throughput


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def nats_server(store_dir: Path) -> Iterator[tuple[str, int]]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("nats-server did not start") from None
            time.sleep(0.05)
    try:
        yield f"nats://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def broker(data: Path, **env: str) -> Iterator[tuple[str, int]]:
    """One `broker serve` process; (base URL, pid)."""
    port = free_port()
    data.mkdir(parents=True, exist_ok=True)
    environ = {
        **os.environ,
        "BROKER_STORE__PATH": str(data / "events.db"),
        "BROKER_SERVER__DATA_DIR": str(data),
        "BROKER_SERVER__PORT": str(port),
        "BROKER_LOG__LEVEL": "warning",
        "BROKER_LIMITS__ENABLED": "false",
        **env,
    }
    log_path = data / "broker.log"  # a file, not a pipe: a full pipe would stall the server
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve"], env=environ, stderr=log_file
        )
    deadline = time.monotonic() + 60
    while "Running on" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("broker serve did not start:\n" + log_path.read_text())
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait()


async def heads(session: aiohttp.ClientSession, bases: list[str]) -> list[int]:
    out = []
    for base in bases:
        async with session.get(f"{base}/health") as r:
            out.append(int((await r.json())["checks"]["projections"]["seq"]))
    return out


async def measure(
    bases: list[str], pids: dict[str, int], args: argparse.Namespace
) -> tuple[float, dict[str, float]]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        nodes = await onboard(session, bases[0], args.nodes)
        while len(set(await heads(session, bases))) > 1:  # every instance has every login
            await asyncio.sleep(0.05)
        peers = []
        for i, (node, token) in enumerate(nodes):
            ws = await session.ws_connect(
                f"{bases[i % len(bases)]}/api/v1/ws",
                headers={"Authorization": f"Bearer {token}"},
                max_msg_size=0,
            )
            assert (await ws.receive_json())["type"] == "welcome"
            peers.append(Peer(ws, node))
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own = own_cpu_seconds()
        rate = await throughput(peers, args.messages, args.batch, args.inflight)
        total = args.messages // len(nodes) * len(nodes)
        cpu = {
            name: per_item_us(before[name], cpu_seconds(pid), total) for name, pid in pids.items()
        }
        cpu["load generator"] = per_item_us(own, own_cpu_seconds(), total)
        for p in peers:
            await p.ws.close()
    return rate, cpu


def line(label: str, rate: float, per_message: dict[str, float]) -> str:
    costs = ", ".join(f"{name} {us:.0f}" for name, us in per_message.items())
    return f"{label}: {rate:,.0f} messages/s; CPU µs per message: {costs}"


async def main_async(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.instances.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with nats_server(root / "nats") as (url, nats_pid):
            for n in counts:
                stream = f"BENCH{n}"
                with ExitStack() as stack:
                    bases, pids = [], {"nats-server": nats_pid}
                    for i in range(n):
                        base, pid = stack.enter_context(
                            broker(
                                root / f"n{n}-{i}",
                                BROKER_STORE__BACKEND="nats",
                                BROKER_STORE__URL=url,
                                BROKER_STORE__STREAM=stream,
                                BROKER_AUTH__KEY_FILE=str(root / f"key{n}.pem"),
                            )
                        )
                        bases.append(base)
                        pids[f"broker {i + 1}"] = pid
                    rate, per_message = await measure(bases, pids, args)
                print(
                    line(f"nats, {n} instance{'s' if n > 1 else ''}", rate, per_message), flush=True
                )
        if not args.no_sqlite:
            with broker(root / "sqlite") as (base, pid):
                rate, per_message = await measure([base], {"broker 1": pid}, args)
            print(line("sqlite, 1 instance (synchronous=FULL)", rate, per_message), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=60)
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--instances", default="1,2,3")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    print(f"# {machine()}; NATS JetStream R1 file storage (default sync), loopback")
    run(main_async(args))


if __name__ == "__main__":
    main()
