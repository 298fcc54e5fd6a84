"""The workload every system runs, and the bits the drivers share.

One message: a ~300-byte JSON body carrying its send time (`t`, `time.time()`), one of four
priorities in turn, a TTL of `TTL` seconds. The consumer decodes the body, records
`time.time() - t` when asked to, and acknowledges the message.

Two client styles. Batched: msgspec, and on this broker's WebSocket frames of up to 100 `send`
ops and one frame of acks per loop turn. Seed-style, as the seed nodes are written: stdlib
`json`, one op a frame, each push acked in a frame of its own as it arrives (on RabbitMQ and
JetStream, whose clients publish and ack one message at a time anyway, only the codec differs).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlparse

import msgspec

PRIORITIES = ("critical", "high", "normal", "low")
TTL = 600  # seconds
WINDOW = 100  # unacknowledged deliveries per consumer: this broker's `[delivery] window`
CONFIRM_WINDOW = 1000  # unconfirmed sends a producer keeps in flight
TICK = 0.001  # pacing step of the fixed-rate latency runs
_PAD = "x" * 200

encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder().decode


def content(seq: int) -> dict[str, Any]:
    """The message body as a dict (~300 bytes of JSON), stamped with the current time."""
    return {
        "action": "sync_request",
        "seq": seq,
        "data_hash": "9f86d081884c7d659a2feaa0c55ad015",
        "body": _PAD,
        "t": time.time(),
    }


def body(seq: int, seed: bool = False) -> bytes:
    """The message body as JSON bytes (stdlib `json` for a seed-style client)."""
    return json.dumps(content(seq)).encode() if seed else encode(content(seq))


def decoder(seed: bool) -> Callable[[str | bytes], Any]:
    """The JSON decoder of a client of that style."""
    return json.loads if seed else decode


class Progress:
    """A count that a task can wait on until it reaches a target."""

    __slots__ = ("n", "_target", "_waiter")

    def __init__(self) -> None:
        self.n = 0
        self._target = 0
        self._waiter: asyncio.Future[None] | None = None

    def add(self, k: int = 1) -> None:
        self.n += k
        w = self._waiter
        if w is not None and self.n >= self._target and not w.done():
            w.set_result(None)

    async def reach(self, target: int, timeout: float) -> None:
        """Return once the count is at least `target`; TimeoutError after `timeout` s."""
        if self.n >= target:
            return
        self._target = target
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        finally:
            self._waiter = None


@dataclass
class Latencies:
    """What a fixed-rate run measured: send→deliver latencies (s) and how many were sent."""

    sent: int
    seconds: float
    values: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        """Percentile `q` (0..1) in milliseconds."""
        v = sorted(self.values)
        return v[min(len(v) - 1, int(q * len(v)))] * 1000 if v else float("nan")


async def paced(rate: int, seconds: float, send: Callable[[int], Awaitable[None]]) -> int:
    """Call `send(k)` with the number of messages due every TICK, `rate` per second for
    `seconds`; return how many were sent. Messages are stamped when sent, so pacing jitter
    does not count as latency. Each wait is a whole TICK: uvloop rounds a timer to the
    nearest millisecond, so waiting out the rest of a tick (< 0.5 ms) spun the load
    generator at 100 % of a core, which the systems under test then competed with."""
    t0 = time.perf_counter()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        elapsed = time.perf_counter() - t0
        due = min(total, int(elapsed * rate) + 1) - sent
        if due > 0:
            await send(due)
            sent += due
        await asyncio.sleep(TICK)
    return sent


def drain_timeout(n: int) -> float:
    """How long to wait for `n` messages before calling a run failed."""
    return 30.0 + n / 500


class System(Protocol):
    """One system under test, connected and ready; phases may run many times."""

    key: str  # broker | rabbitmq | nats
    label: str  # column heading, with the server's version
    durability: str  # what a confirmed send means on this system, as configured

    async def end_to_end(self, n: int, seed: bool = False) -> float:
        """Producer and consumer together: messages/s until all `n` are received and acked
        (`seed`: by seed-style clients, see the module doc)."""
        ...

    async def publish_confirm(self, n: int) -> float:
        """Producer alone: messages/s until all `n` sends are confirmed."""
        ...

    async def latency(self, rate: int, seconds: float, seed: bool = False) -> Latencies:
        """Send at `rate`/s for `seconds` while the consumer acks; send→deliver latencies."""
        ...


class Unreachable(Exception):
    """A peer that does not answer: the harness skips it, saying why."""


async def probe(url: str, default_port: int, timeout: float = 2.0) -> None:
    """Raise Unreachable unless something accepts TCP connections at `url`'s host and port."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError) as e:
        raise Unreachable(f"nothing answers at {host}:{port} ({e!r:.100})") from e
    writer.close()
