"""The dispatcher and the messages projection with an injected clock: TTL expiry, ack timeouts,
dead letters and redrive, without waiting for real time to pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType

from broker.config import DeliveryConfig
from broker.principal import Principal
from broker.runtime import Runtime
from broker.services.delivery import Dispatcher
from broker.services.messaging import Messaging, SendRequest
from broker.ws.wire import NodeConnection, text_frames
from eventstore.events import MessageDeadLettered, MessageExpired, NodeRegistered
from eventstore.memory import MemoryStore
from projections.base import Projections
from projections.messages import MessagesProjection
from projections.nodes import NodesProjection


@dataclass
class Clock:
    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class FakeWS:
    frames: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    compress: bool = False

    async def send_frame(self, data: bytes, opcode: WSMsgType) -> None:
        assert opcode == WSMsgType.TEXT
        self.frames.append(data.decode())
        self.arrived.set()

    async def close(self, **_: Any) -> None:
        pass


@dataclass
class World:
    runtime: Runtime
    messaging: Messaging
    dispatcher: Dispatcher
    clock: Clock
    sender: Principal


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = Clock()
    config = DeliveryConfig(ack_timeout=30, max_attempts=2, window=10)
    messages = MessagesProjection(now=clock, ack_timeout=30, max_attempts=2)
    store = MemoryStore()
    await store.open()
    runtime = Runtime(store, Projections([NodesProjection(), messages]))
    await runtime.start()
    await runtime.record(
        [NodeRegistered(node_id=n, name=n, node_type="t", public_key="k") for n in "abc"]
    )
    messaging = Messaging(runtime, config)
    dispatcher = Dispatcher(runtime, messaging, config)
    await dispatcher.start()
    yield World(runtime, messaging, dispatcher, clock, Principal("node", "a", "a"))
    await dispatcher.stop()


async def send(w: World, to: list[str], ttl: float = 60, prio: str = "normal") -> str:
    req = SendRequest(to_nodes=to, message_type="t", content=1, ttl=ttl, priority=prio)  # type: ignore[arg-type]
    return (await w.messaging.send(w.sender, req)).message_id


def types_in(w: World) -> list[str]:
    store: MemoryStore = w.runtime.store  # type: ignore[assignment]
    return [e.type for e in store._log]


async def test_expired_messages_are_never_listed_and_become_dead_letters(world: World) -> None:
    w = world
    short = await send(w, ["b", "c"], ttl=5)
    long = await send(w, ["b"], ttl=500)
    assert [m.id for m in w.runtime.messages.pending("b")] == [short, long]
    w.clock.offset = 10  # the short one's TTL has passed
    assert [m.id for m in w.runtime.messages.pending("b")] == [long]
    assert w.runtime.messages.queue.take("c", 10) == []
    await w.dispatcher.sweep()
    assert "message.expired" in types_in(w)
    expired = [e.event for e in w.runtime.store._log if isinstance(e.event, MessageExpired)]  # type: ignore[attr-defined]
    assert expired[0].message_id == short and sorted(expired[0].node_ids) == ["b", "c"]
    dead = w.messaging.dead_letters()
    assert sorted((d.node_id, d.reason) for d in dead) == [("b", "expired"), ("c", "expired")]
    assert w.runtime.messages.get(short).recipients["b"].status == "expired"  # type: ignore[union-attr]
    # Redrive gives it a fresh TTL for that node only.
    await w.messaging.redrive(Principal("user", "u", "ops"), short, "b", 100)
    assert [m.id for m in w.runtime.messages.pending("b")] == [long, short]
    assert [d.node_id for d in w.messaging.dead_letters()] == ["c"]


async def test_ack_timeout_redelivers_then_dead_letters(world: World) -> None:
    w = world
    mid = await send(w, ["b"], ttl=500)
    ws = FakeWS()
    conn = NodeConnection("b", ws, send_timeout=5)  # type: ignore[arg-type]
    w.dispatcher.connect(conn)
    w.dispatcher.open(conn)
    await asyncio.wait_for(ws.arrived.wait(), 10)
    assert len(ws.frames) == 1 and mid in ws.frames[0]
    ws.arrived.clear()
    w.clock.offset = 31  # past the ack timeout: redelivered on the same connection
    await w.dispatcher.sweep()
    await asyncio.wait_for(ws.arrived.wait(), 10)
    assert len(ws.frames) == 2 and mid in ws.frames[1]
    w.clock.offset = 62  # second attempt timed out too: max_attempts = 2
    await w.dispatcher.sweep()
    dead = [e.event for e in w.runtime.store._log if isinstance(e.event, MessageDeadLettered)]  # type: ignore[attr-defined]
    assert len(dead) == 1 and dead[0].node_id == "b" and dead[0].attempts == 2
    assert w.runtime.messages.pending("b") == []
    assert w.runtime.messages.get(mid).recipients["b"].status == "dead"  # type: ignore[union-attr]
    w.dispatcher.disconnect(conn)


async def test_replay_rebuilds_the_same_mailboxes(world: World) -> None:
    w = world
    ids = [await send(w, ["b"], prio=p) for p in ("low", "critical", "normal")]
    await w.messaging.read(Principal("node", "b", "b"), ids[1])
    rebuilt = MessagesProjection(now=w.clock)
    replayed = Projections([NodesProjection(), rebuilt])
    replayed.apply_many([e async for e in w.runtime.store.read()])
    assert rebuilt.state() == w.runtime.messages.state()
    assert [m.id for m in rebuilt.pending("b")] == [ids[2], ids[0]]


@pytest.mark.parametrize("sizes", [[0], [125, 126], [65535, 65536, 3], [200] * 50])
def test_text_frames_follow_rfc6455(sizes: list[int]) -> None:
    payloads = [bytes([65 + i % 26]) * n for i, n in enumerate(sizes)]
    data = text_frames(payloads)
    parsed, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0x81  # FIN, text
        n = data[pos + 1]
        assert not n & 0x80  # server frames are not masked
        pos += 2
        if n == 126:
            n, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        parsed.append(data[pos : pos + n])
        pos += n
    assert parsed == payloads
