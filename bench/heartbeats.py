"""Heartbeats as a fleet sends them: one op per frame over the node WebSocket, and over HTTP.

    python -m bench.heartbeats [--nodes 300] [--rates 2000,5000,10000,20000] [--seconds 5]

Starts `broker serve` on a temporary log (synchronous=FULL), registers and logs in `--nodes`
nodes, connects each one's WebSocket, then for each rate sends heartbeats round-robin over the
nodes, one `{"type": "heartbeat", "ref": n}` per frame, each answered `ok` once durable. Each
line gives the achieved rate, the server's CPU time per heartbeat (from /proc: the figure that
does not move with the load generator sharing the cores), and the send→ok latency p50/p99.
Then `POST /api/v1/nodes/{id}/heartbeat` with 32 requests in flight: requests/s and CPU each.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec

from bench.common import cpu_seconds, machine, per_item_us, run
from bench.e2e import onboard, pct, server
from bench.scale import free_port

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def masked_text_frame(payload: bytes) -> bytes:
    """A client's text frame (RFC 6455 §5.2), masked with a zero key: the payload as it is.
    Written straight to the socket, so the load generator spends little CPU per frame."""
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class Beater:
    """One node's socket: sends heartbeat frames, matches each `ok` to its send time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.transport = ws._writer.transport  # noqa: SLF001 - see masked_text_frame
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.answered = 0

    async def reader(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frame = _decode(msg.data)
            if frame.get("type") == "ok":
                t0 = self.sent.pop(frame["ref"], None)
                if t0 is not None:
                    self.latencies.append(time.perf_counter() - t0)
                    self.answered += 1
            elif frame.get("type") == "error":
                raise RuntimeError(frame)

    def beat(self, ref: int) -> None:
        self.sent[ref] = time.perf_counter()
        self.transport.write(masked_text_frame(_encode({"type": "heartbeat", "ref": ref})))


_refs = iter(range(1, 1 << 62))  # unique over every phase


async def ws_phase(beaters: list[Beater], rate: int, seconds: float, pid: int | None) -> str:
    for b in beaters:
        b.latencies.clear()
        b.answered = 0
    total = int(rate * seconds)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    sent, i = 0, 0
    while sent < total:  # at the rate: each tick sends what is due by now
        due = min(total, int((time.perf_counter() - t0) * rate) + 1)
        while sent < due:
            beaters[i].beat(next(_refs))
            sent += 1
            i = (i + 1) % len(beaters)
        await asyncio.sleep(0.001)
    deadline = time.perf_counter() + 30
    while sum(b.answered for b in beaters) < total and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    answered = sum(b.answered for b in beaters)
    cpu = per_item_us(cpu0, cpu_seconds(pid), answered)
    lat = sorted(x for b in beaters for x in b.latencies)
    return (
        f"ws heartbeats, one op a frame, offered {rate:,}/s: {answered / elapsed:,.0f}/s durable, "
        f"server {cpu:.1f} us CPU each, send->ok p50 {pct(lat, 0.5):.2f} ms "
        f"p99 {pct(lat, 0.99):.2f} ms"
    )


async def http_load(
    session: aiohttp.ClientSession,
    base: str,
    nodes: list[tuple[str, str]],
    seconds: float,
    pid: int | None,
) -> tuple[float, float]:
    """`POST /api/v1/nodes/{id}/heartbeat` with 32 requests in flight for `seconds`:
    (requests/s, the server's CPU µs per request)."""
    done = 0
    stop = time.perf_counter() + seconds
    body = _encode({"status": "healthy", "metrics": {"cpu": 12.5, "mem": 40}})

    async def worker(k: int) -> None:
        nonlocal done
        node, token = nodes[k % len(nodes)]
        url = f"{base}/api/v1/nodes/{node}/heartbeat"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        while time.perf_counter() < stop:
            async with session.post(url, data=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                await r.read()
            done += 1

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(32)))
    elapsed = time.perf_counter() - t0
    return done / elapsed, per_item_us(cpu0, cpu_seconds(pid), done)


async def http_phase(
    session: aiohttp.ClientSession,
    base: str,
    nodes: list[tuple[str, str]],
    seconds: float,
    pid: int | None,
) -> str:
    rate, cpu = await http_load(session, base, nodes, seconds, pid)
    return f"http heartbeats, 32 in flight: {rate:,.0f} requests/s, server {cpu:.1f} us CPU each"


async def main_async(args: argparse.Namespace) -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp), free_port()) as (base, pid):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            nodes = await onboard(session, base, args.nodes)
            beaters = []
            for _node, token in nodes:
                ws = await session.ws_connect(
                    f"{base}/api/v1/ws", headers={"Authorization": f"Bearer {token}"}
                )
                assert (await ws.receive_json())["type"] == "welcome"
                beaters.append(Beater(ws))
            readers = [asyncio.ensure_future(b.reader()) for b in beaters]
            for rate in [int(r) for r in args.rates.split(",") if r]:
                print(await ws_phase(beaters, rate, args.seconds, pid), flush=True)
            print(await http_phase(session, base, nodes, args.seconds, pid), flush=True)
            for b in beaters:
                await b.ws.close()
            await asyncio.gather(*readers, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--rates", default="2000,5000,10000,20000")
    parser.add_argument("--seconds", type=float, default=5.0)
    run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
