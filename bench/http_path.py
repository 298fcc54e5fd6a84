"""The HTTP request path alone: seed 001's send and a node's heartbeat, requests/s and server CPU.

    python -m bench.http_path [--seconds 4] [--runs 3] [--concurrency 64] [--client raw,aiohttp]
                              [--base-tree DIR] [--limits] [--floor] [--front-off]

Starts `broker serve` on a temporary log (synchronous=FULL; `[limits]` off as in bench.peers
unless `--limits`), registers and logs in four nodes, then drives, with `--concurrency`
keep-alive connections:

- `send`: `POST /api/v1/messages/send` with seed 001's body (bench.e2e.seed_send), to a node
  that never connects (nothing is pushed);
- `heartbeat`: `POST /api/v1/nodes/{id}/heartbeat` with bench.fleet's body.

Two clients: `aiohttp` (the client bench.peers' "HTTP send" uses: its CPU per request is about
the server's, and both share this machine's two cores) and `raw` (prebuilt request bytes with
the headers aiohttp sends, one asyncio protocol per connection reading the status line and
Content-Length: a few µs per request, so the rate is the server's). Every answer's status is
checked. Each figure prints requests/s, the server's CPU per request (/proc/PID/stat, all its
threads) and the client's. With `--base-tree DIR` the broker of that checkout runs too, its
runs interleaved with this tree's, so before and after are measured in one sitting. With
`--floor`, a column "aiohttp alone": the same requests to a bare aiohttp application on uvloop
(one middleware passing through, the body read, a fixed 110-byte JSON answer): what the HTTP
machinery costs on this machine in this sitting, before any of the broker's work. With
`--front-off`, a column "this tree, lean front off": this tree with `[server] lean_front =
false`, every request through aiohttp's Request and Response (broker/http/lean.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack, ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench.common import cpu_seconds, machine, own_cpu_seconds, per_item_us, run
from bench.e2e import onboard, seed_send, server

HEARTBEAT_BODY = {"status": "healthy", "metrics": {"cpu": 12.5, "mem": 40}}
_encode = msgspec.json.Encoder().encode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Target:
    """One route as a request: its URL path, headers and body."""

    def __init__(self, name: str, path: str, token: str, body: bytes) -> None:
        self.name, self.path, self.token, self.body = name, path, token, body

    def raw(self, host: str) -> bytes:
        """The request as aiohttp's client writes it (same headers, same order)."""
        return (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "Authorization: Bearer " + self.token + "\r\n"
            "Content-Type: application/json\r\n"
            "Accept: */*\r\n"
            "Accept-Encoding: gzip, deflate\r\n"
            "User-Agent: Python/3.11 aiohttp/3.14.5\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode() + self.body


class _Conn(asyncio.Protocol):
    """One keep-alive connection sending `request` again as soon as each answer is complete."""

    def __init__(self, request: bytes, stop: float, done: asyncio.Future[int]) -> None:
        self.request, self.stop, self.done = request, stop, done
        self.buf = b""
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            i = head.find(b"\r\nContent-Length: ")
            if i < 0:
                i = head.lower().find(b"\r\ncontent-length: ")
            if i < 0:
                self._fail(f"no Content-Length: {head[:200]!r}")
                return
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 18 : j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                break
            if not head.startswith(b"HTTP/1.1 200 "):
                self._fail(f"answer {buf[:total][:400]!r}")
                return
            buf = buf[total:]
            self.count += 1
            if time.perf_counter() >= self.stop:
                if not self.done.done():
                    self.done.set_result(self.count)
                assert self.transport is not None
                self.transport.close()
                return
            assert self.transport is not None
            self.transport.write(self.request)
        self.buf = buf

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"connection lost: {exc}"))


async def raw_load(base: str, target: Target, seconds: float, concurrency: int) -> int:
    loop = asyncio.get_running_loop()
    host, port = base.removeprefix("http://").split(":")
    request = target.raw(f"{host}:{port}")
    stop = time.perf_counter() + seconds
    futures = []
    for _ in range(concurrency):
        done: asyncio.Future[int] = loop.create_future()
        await loop.create_connection(partial(_Conn, request, stop, done), host, int(port))
        futures.append(done)
    return sum(await asyncio.gather(*futures))


async def aiohttp_load(
    session: aiohttp.ClientSession, base: str, target: Target, seconds: float, concurrency: int
) -> int:
    done = 0
    stop = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            async with session.post(base + target.path, data=target.body, headers=headers) as r:
                assert r.status == 200, await r.text()
                await r.read()
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


class Broker:
    def __init__(self, label: str, base: str, pid: int | None, targets: list[Target]) -> None:
        self.label, self.base, self.pid, self.targets = label, base, pid, targets
        self.figures: dict[str, list[tuple[float, float, float]]] = {}


async def measure(
    broker: Broker,
    session: aiohttp.ClientSession,
    target: Target,
    client: str,
    args: argparse.Namespace,
) -> tuple[float, float, float]:
    """(requests/s, server CPU µs per request, client CPU µs per request)."""
    server0, own0, t0 = cpu_seconds(broker.pid), own_cpu_seconds(), time.perf_counter()
    if client == "raw":
        n = await raw_load(broker.base, target, args.seconds, args.concurrency)
    else:
        n = await aiohttp_load(session, broker.base, target, args.seconds, args.concurrency)
    elapsed = time.perf_counter() - t0
    return (
        n / elapsed,
        per_item_us(server0, cpu_seconds(broker.pid), n),
        per_item_us(own0, own_cpu_seconds(), n),
    )


async def open_broker(
    stack: AsyncExitStack,
    files: ExitStack,
    session: aiohttp.ClientSession,
    label: str,
    tree: Path | None,
    limits: bool,
    **env: str,
) -> Broker:
    data = Path(files.enter_context(tempfile.TemporaryDirectory(prefix="bench-http-")))
    if limits:
        env["BROKER_LIMITS__ENABLED"] = "true"
    base, pid = files.enter_context(server(data, free_port(), cwd=tree, **env))
    nodes = await onboard(session, base, 4)
    (sender, token), (sink, _) = nodes[0], nodes[1]
    send = Target("send", "/api/v1/messages/send", token, _encode(seed_send(sender, sink)))
    beat = Target("heartbeat", f"/api/v1/nodes/{sender}/heartbeat", token, _encode(HEARTBEAT_BODY))
    return Broker(label, base, pid, [send, beat])


FLOOR_ANSWER = (
    b'{"message_id":"m_0000000000000000","status":"queued","recipients":1,'
    b'"expires_at":"2026-12-06T10:00:00.000000Z"}'
)


def serve_floor(port: int) -> None:
    """The bare aiohttp application of `--floor` (run in a child process)."""
    from aiohttp import web

    @web.middleware
    async def passing(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request)  # type: ignore[no-any-return]

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=FLOOR_ANSWER, content_type="application/json")

    async def main() -> None:
        app = web.Application(middlewares=[passing])
        app.router.add_post("/api/v1/messages/send", answer)
        app.router.add_post("/api/v1/nodes/{node_id}/heartbeat", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("Running on", port, flush=True)
        await asyncio.Event().wait()

    run(main())


def open_floor(files: ExitStack, model: Broker) -> Broker:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.http_path", "--serve-floor", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    files.callback(proc.wait)
    files.callback(proc.terminate)
    assert proc.stdout is not None
    proc.stdout.readline()
    return Broker("aiohttp alone", f"http://127.0.0.1:{port}", proc.pid, model.targets)


def summary(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.0f}"
    return f"{med:,.0f} ({min(values):,.0f}-{max(values):,.0f})"


async def main_async(args: argparse.Namespace) -> None:
    print(f"{machine()}; load average {os.getloadavg()[0]:.2f} at the start")
    async with AsyncExitStack() as stack:
        files = stack.enter_context(ExitStack())
        conn = aiohttp.TCPConnector(limit=0)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=conn))
        brokers = [await open_broker(stack, files, session, "this tree", None, args.limits)]
        if args.base_tree:
            tree = Path(args.base_tree)
            brokers.append(
                await open_broker(stack, files, session, f"at {tree}", tree, args.limits)
            )
        if args.front_off:  # this tree with every request through aiohttp's objects
            off = {"BROKER_SERVER__LEAN_FRONT": "false"}
            label = "this tree, lean front off"
            brokers.append(
                await open_broker(stack, files, session, label, None, args.limits, **off)
            )
        if args.floor:
            brokers.append(open_floor(files, brokers[0]))
        for r in range(args.runs):
            for client in args.client:
                for i in range(len(brokers[0].targets)):
                    for b in brokers if r % 2 == 0 else brokers[::-1]:
                        target = b.targets[i]
                        fig = await measure(b, session, target, client, args)
                        b.figures.setdefault(f"{target.name} ({client})", []).append(fig)
                        print(
                            f"run {r + 1} {b.label:>24} {target.name:>9} {client:>7}: "
                            f"{fig[0]:8,.0f} requests/s, server {fig[1]:5.0f} µs, "
                            f"client {fig[2]:5.0f} µs per request",
                            flush=True,
                        )
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
        print()
        head = "| figure | " + " | ".join(b.label for b in brokers) + " |"
        print(head)
        print("|---|" + "---:|" * len(brokers))
        for key in brokers[0].figures:
            for k, what in enumerate(
                ("requests/s", "server CPU µs/request", "client CPU µs/request")
            ):
                row = [summary([f[k] for f in b.figures[key]]) for b in brokers]
                print(f"| {key} {what} | " + " | ".join(row) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.http_path", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seconds", type=float, default=4.0, help="per figure and run (4)")
    p.add_argument("--runs", type=int, default=3, help="runs, interleaved between trees (3)")
    p.add_argument("--concurrency", type=int, default=64, help="connections (64)")
    p.add_argument(
        "--client",
        default="raw,aiohttp",
        type=lambda s: s.split(","),
        help="raw,aiohttp (both)",
    )
    p.add_argument("--base-tree", help="also run the broker of this checkout, interleaved")
    p.add_argument("--limits", action="store_true", help="[limits] on (the default config's)")
    p.add_argument("--floor", action="store_true", help="also a bare aiohttp application")
    p.add_argument(
        "--front-off", action="store_true", help="also this tree with [server] lean_front off"
    )
    p.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for c in args.client:
        if c not in ("raw", "aiohttp"):
            p.error(f"unknown client {c}")
    return args


def main() -> None:
    args = parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor)
    else:
        run(main_async(args))


if __name__ == "__main__":
    main()
