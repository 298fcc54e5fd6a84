"""End to end through one `broker serve` process on the embedded log (synchronous=FULL).

    python -m bench.e2e [--nodes 100] [--messages 200000] [--rate 2000] [--seconds 10]

Starts a server on a temporary log, registers and logs in `--nodes` nodes, then prints:
- `ws throughput`: messages/s sent over the node WebSocket (batched `send` ops), pushed to their
  recipient and acknowledged (batched `ack` ops): each message is two durable events;
- `ws latency`: send→push latency p50/p99/p999 at a fixed `--rate` messages/s;
- `http send`: POST /api/v1/messages/send requests/s with the seed's request shape (durable).
The load generator runs in this process, on the same 2 cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench.common import cpu_seconds, machine, own_cpu_seconds, per_item_us, run

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
BODY = "x" * 200
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode  # ~300-byte messages with the envelope fields


@contextmanager
def server(
    data: Path, port: int, url: str | None = None, cwd: Path | None = None, **env: str
) -> Iterator[tuple[str, int | None]]:
    """(base URL, the server's pid when this started it). `cwd`: run the `broker` package of
    that checkout (e.g. the commit before a change, to measure both in one run)."""
    if url:  # a server started elsewhere (e.g. under a profiler)
        yield url.rstrip("/"), None
        return
    environ = {
        **os.environ,
        "BROKER_STORE__PATH": str(data / "events.db"),
        "BROKER_SERVER__DATA_DIR": str(data),
        "BROKER_SERVER__PORT": str(port),
        "BROKER_LOG__LEVEL": "warning",
        "BROKER_LIMITS__ENABLED": "false",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve"],
        env=environ,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Running on" in line:
            break
    else:
        raise RuntimeError("server did not start")
    # Keep draining the server's log, or it blocks once the pipe fills.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait()


async def onboard(session: aiohttp.ClientSession, base: str, n: int) -> list[tuple[str, str]]:
    """Register and log in `n` nodes; [(node_id, access_token)]."""
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(n)]
    out = []
    for i, key in enumerate(keys):
        node = f"bench-{i:04d}"
        pem = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        body = {
            "node_id": node,
            "name": node,
            "type": "bench",
            "capabilities": ["x"],
            "public_key": pem,
            "endpoint": "",
            "metadata": {},
        }
        async with session.post(f"{base}/api/v1/auth/register", json=body) as r:
            assert r.status == 201, await r.text()
        async with session.post(f"{base}/api/v1/auth/login", json={"node_id": node}) as r:
            challenge = (await r.json())["challenge"]
        sig = key.sign(challenge.encode(), PSS, hashes.SHA256()).hex()
        async with session.post(
            f"{base}/api/v1/auth/verify",
            json={"node_id": node, "challenge": challenge, "signature": sig},
        ) as r:
            out.append((node, (await r.json())["access_token"]))
    return out


class Peer:
    """One node's WebSocket: sends batches of ops, acks what is pushed, records latencies."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, node: str) -> None:
        self.ws = ws
        self.node = node
        self.received = 0
        self.acked = 0
        self.latencies: list[float] = []
        self.oks: asyncio.Queue[int] = asyncio.Queue()
        self.frames_sent = 0  # every frame sent is an array of ops, answered by one array
        self.frames_answered = 0
        self._acks: list[dict[str, Any]] = []
        self._flush_scheduled = False

    async def reader(self) -> None:
        loop = asyncio.get_running_loop()
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frame = _decode(msg.data)
            if isinstance(frame, list):
                self.frames_answered += 1
                self.oks.put_nowait(len(frame))
                continue
            kind = frame.get("type")
            if kind == "message":
                self.received += 1
                sent = frame["content"].get("t") if isinstance(frame["content"], dict) else None
                if sent is not None:
                    self.latencies.append(time.time() - sent)
                self._acks.append({"type": "ack", "message_id": frame["id"]})
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    loop.call_soon(self._flush)
            elif kind == "error":
                raise RuntimeError(f"{self.node}: {frame}")

    def _flush(self) -> None:
        self._flush_scheduled = False
        acks, self._acks = self._acks, []
        if acks:
            self.acked += len(acks)
            self.frames_sent += 1
            asyncio.ensure_future(self.ws.send_str(_encode(acks).decode()))

    async def send_batch(self, to: str, count: int, stamp: bool) -> None:
        ops = [
            {
                "type": "send",
                "to_nodes": [to],
                "message_type": "bench",
                "priority": ("critical", "high", "normal", "low")[i % 4],
                "ttl": 600,
                "content": {"body": BODY, "t": time.time()} if stamp else {"body": BODY},
            }
            for i in range(count)
        ]
        self.frames_sent += 1
        await self.ws.send_str(_encode(ops).decode())


async def connect_all(
    session: aiohttp.ClientSession, base: str, nodes: list[tuple[str, str]]
) -> list[Peer]:
    peers = []
    for node, token in nodes:
        ws = await session.ws_connect(
            f"{base}/api/v1/ws", headers={"Authorization": f"Bearer {token}"}, max_msg_size=0
        )
        welcome = await ws.receive_json()
        assert welcome["type"] == "welcome"
        peers.append(Peer(ws, node))
    return peers


async def throughput(peers: list[Peer], total: int, batch: int, inflight: int) -> float:
    n = len(peers)
    per_peer = total // n
    readers = [asyncio.create_task(p.reader()) for p in peers]
    t0 = time.perf_counter()

    async def produce(i: int) -> None:
        p, to = peers[i], peers[(i + 1) % n].node
        sent = 0
        pending = 0
        while sent < per_peer:
            while pending >= inflight:
                await p.oks.get()
                pending -= 1
            k = min(batch, per_peer - sent)
            await p.send_batch(to, k, stamp=False)
            sent += k
            pending += 1
        while pending:
            await p.oks.get()
            pending -= 1

    await asyncio.gather(*(produce(i) for i in range(n)))
    target = per_peer * n
    while sum(p.received for p in peers) < target:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    # Let the server finish: every ack frame answered, so the next phase starts on a quiet server.
    while any(p.frames_answered < p.frames_sent for p in peers):
        await asyncio.sleep(0.005)
    for r in readers:
        r.cancel()
    return target / elapsed


async def latency(peers: list[Peer], rate: int, seconds: float) -> list[float]:
    n = len(peers)
    for p in peers:
        p.latencies.clear()
        p.received = 0
    readers = [asyncio.create_task(p.reader()) for p in peers]
    tick = 0.005
    per_tick = max(1, round(rate * tick))
    t0 = time.perf_counter()
    sent = 0
    k = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(per_tick):
            p = peers[k % n]
            await p.send_batch(peers[(k + 1) % n].node, 1, stamp=True)
            k += 1
            sent += 1
        next_at = t0 + (sent / rate)
        delay = next_at - time.perf_counter()  # a wait is at least 1 ms: uvloop rounds a
        await asyncio.sleep(max(delay, 0.001) if delay > 0 else 0)  # shorter one to 0, spinning
    deadline = time.perf_counter() + 10
    while sum(p.received for p in peers) < sent and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for r in readers:
        r.cancel()
    return sorted(x for p in peers for x in p.latencies)


def seed_send(node: str, to: str) -> dict[str, Any]:
    """The body of a send in the seed 001 client's shape."""
    return {
        "from_node": node,
        "to_nodes": [to],
        "message_type": "data_sync",
        "content": {"action": "sync_request", "data_hash": "abc123", "body": BODY},
        "priority": "high",
        "ttl": 1800,
        "metadata": {"correlation_id": "sync-001", "retry_count": 0},
    }


async def http_send(
    session: aiohttp.ClientSession,
    base: str,
    nodes: list[tuple[str, str]],
    seconds: float,
    concurrency: int,
) -> tuple[float, int]:
    """(requests/s, requests made)."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        node, token = nodes[i % len(nodes)]
        to = nodes[(i + 1) % len(nodes)][0]
        headers = {"Authorization": f"Bearer {token}"}
        payload = seed_send(node, to)
        while time.perf_counter() < stop:
            async with session.post(
                f"{base}/api/v1/messages/send", json=payload, headers=headers
            ) as r:
                assert r.status == 200, await r.text()
                await r.read()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.perf_counter() - t0), done


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def http_send_wrk(
    base: str, nodes: list[tuple[str, str]], seconds: float, concurrency: int
) -> tuple[float, int]:
    """POST /messages/send with wrk (one node's token, the seed's request shape): a load
    generator in C, so the broker gets the CPU the Python client would take. (requests/s, n)"""
    (node, token), to = nodes[0], nodes[1 % len(nodes)][0]
    body = _encode(seed_send(node, to)).decode()
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT % (body, token))
        script.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{seconds:g}s",
                "-s",
                script.name,
                f"{base}/api/v1/messages/send",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(out.split("Requests/sec:")[1].split()[0])
    n = int(out.split(" requests in ")[0].split()[-1])
    return rps, n


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


async def ws_phases(peers: list[Peer], args: argparse.Namespace, pid: int | None) -> None:
    cpu, own = cpu_seconds(pid), own_cpu_seconds()
    rate = await throughput(peers, args.messages, args.batch, args.inflight)
    cpu = per_item_us(cpu, cpu_seconds(pid), args.messages)
    own = per_item_us(own, own_cpu_seconds(), args.messages)
    print(
        f"ws throughput: {rate:,.0f} messages/s sent, pushed and acked "
        f"({args.messages:,} messages, {args.nodes} nodes, batches of {args.batch}); "
        f"CPU per message: server {cpu:.0f} µs, load generator {own:.0f} µs"
    )
    # The load generator's own collector must not stall it mid-measurement: its pauses
    # would be counted as the broker's latency. (It allocates little; this is for minutes.)
    gc.collect()
    gc.disable()
    cpu = cpu_seconds(pid)
    try:
        lat = await latency(peers, args.rate, args.seconds)
    finally:
        gc.enable()
    cpu = per_item_us(cpu, cpu_seconds(pid), len(lat))
    print(
        f"ws latency at {args.rate:,} messages/s: p50 {pct(lat, 0.5):.2f} ms, "
        f"p99 {pct(lat, 0.99):.2f} ms, p999 {pct(lat, 0.999):.2f} ms "
        f"({len(lat):,} messages, median {statistics.median(lat) * 1000:.2f} ms); "
        f"CPU per message: server {cpu:.0f} µs"
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d, server(Path(d), args.port, args.url) as (base, pid):
        pid = pid or args.pid
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            nodes = await onboard(session, base, args.nodes)
            peers = await connect_all(session, base, nodes)
            if "ws" in args.phases:
                await ws_phases(peers, args, pid)
            for p in peers:
                await p.ws.close()
            if "http" not in args.phases:
                return
            if shutil.which("wrk"):
                cpu = cpu_seconds(pid)
                rps, n = await asyncio.to_thread(
                    http_send_wrk, base, nodes, args.seconds, args.concurrency
                )
                cpu = per_item_us(cpu, cpu_seconds(pid), n)
                print(
                    f"http send (wrk): {rps:,.0f} requests/s durable (seed request shape, "
                    f"{args.concurrency} connections); CPU per request: server {cpu:.0f} µs"
                )
            cpu, own = cpu_seconds(pid), own_cpu_seconds()
            rps, n = await http_send(session, base, nodes, args.seconds, args.concurrency)
            cpu = per_item_us(cpu, cpu_seconds(pid), n)
            own = per_item_us(own, own_cpu_seconds(), n)
            print(
                f"http send: {rps:,.0f} requests/s durable (seed request shape, "
                f"{args.concurrency} concurrent clients); "
                f"CPU per request: server {cpu:.0f} µs, load generator {own:.0f} µs"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for CPU figures")
    parser.add_argument(
        "--phases", default="ws,http", help="ws (throughput + latency) and/or http (sends)"
    )
    args = parser.parse_args()
    print(f"# {machine()}; SQLite synchronous=FULL")
    run(main_async(args))


if __name__ == "__main__":
    main()
