"""The heartbeat batch: every connection's heartbeat frames of a tick in one append, answered
per connection in one write, and only once durable; a failing batch is retried frame by frame
so one bad frame fails alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from aiohttp.test_utils import TestClient

from broker.keys import HEARTBEATS, RUNTIME
from broker.ws.heartbeats import HeartbeatBatch
from eventstore.base import StoreError
from eventstore.events import BaseEvent, NodeHeartbeat
from tests.broker.identity.helpers import bearer, node_session


class FakeConn:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.closed = False
        self.writes: list[list[bytes]] = []

    async def send_many(self, frames: Sequence[bytes]) -> bool:
        self.writes.append(list(frames))
        return True


class FakeRuntime:
    def __init__(self) -> None:
        self.appends: list[list[BaseEvent]] = []
        self.gate: asyncio.Future[None] | None = None
        self.refuse: str | None = None  # a node id whose events the log refuses

    async def record(self, events: Sequence[BaseEvent]) -> list[Any]:
        if self.gate is not None:
            await self.gate
        if self.refuse is not None and any(
            getattr(e, "node_id", None) == self.refuse for e in events
        ):
            raise StoreError(f"cannot store {self.refuse}'s heartbeat")
        self.appends.append(list(events))
        return []


def beat(node: str) -> list[BaseEvent]:
    return [NodeHeartbeat(node_id=node)]


async def test_frames_of_a_tick_are_one_append_and_one_write_per_connection() -> None:
    runtime = FakeRuntime()
    runtime.gate = asyncio.get_running_loop().create_future()
    batch = HeartbeatBatch(runtime.record)
    a, b = FakeConn("a"), FakeConn("b")
    freed: list[str] = []
    batch.add(a, beat("a"), b'{"type":"ok","ref":1}', [1], True, lambda: freed.append("a1"))  # type: ignore[arg-type]
    batch.add(b, beat("b"), b'{"type":"ok","ref":2}', [2], True, lambda: freed.append("b"))  # type: ignore[arg-type]
    batch.add(a, beat("a"), b'{"type":"ok","ref":3}', [3], True, lambda: freed.append("a2"))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the tick ends: the batch's task starts and waits for the log
    await asyncio.sleep(0)
    assert a.writes == [] and b.writes == [] and freed == []  # nothing answered before durable
    runtime.gate.set_result(None)
    await batch.drain()
    assert [[e.node_id for e in append] for append in runtime.appends] == [["a", "b", "a"]]  # type: ignore[attr-defined]
    assert a.writes == [[b'{"type":"ok","ref":1}', b'{"type":"ok","ref":3}']]
    assert b.writes == [[b'{"type":"ok","ref":2}']]
    assert sorted(freed) == ["a1", "a2", "b"]
    assert batch.batches == 1


async def test_a_frame_the_log_refuses_fails_alone() -> None:
    runtime = FakeRuntime()
    runtime.refuse = "bad"
    batch = HeartbeatBatch(runtime.record)
    good, bad = FakeConn("good"), FakeConn("bad")
    batch.add(good, beat("good"), b"OK", [1], True, lambda: None)  # type: ignore[arg-type]
    batch.add(bad, beat("bad") * 2, b"OK", [7, 8], False, lambda: None)  # type: ignore[arg-type]
    await batch.drain()
    assert good.writes == [[b"OK"]]
    (answer,) = [json.loads(x) for x in bad.writes[0]]
    assert [a["ref"] for a in answer] == [7, 8]
    assert {a["error"]["code"] for a in answer} == {"VALIDATION_ERROR"}


async def test_heartbeat_frames_over_the_socket(client: TestClient) -> None:  # type: ignore[type-arg]
    token = (await node_session(client, "node-a"))["access_token"]
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(token))
    assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    before = client.app[HEARTBEATS].batches
    await ws.send_str(json.dumps({"type": "heartbeat", "ref": "x", "metrics": {"cpu": 1}}))
    assert await ws.receive_json(timeout=10) == {"type": "ok", "ref": "x"}
    await ws.send_str(json.dumps([{"type": "heartbeat", "ref": 1}, {"type": "heartbeat"}]))
    assert await ws.receive_json(timeout=10) == [
        {"type": "ok", "ref": 1},
        {"type": "ok", "ref": None},
    ]
    assert client.app[HEARTBEATS].batches == before + 2
    node = client.app[RUNTIME].nodes.get("node-a")
    assert node is not None and node.heartbeats == 3 and node.metrics == {"cpu": 1}
    await ws.close()
