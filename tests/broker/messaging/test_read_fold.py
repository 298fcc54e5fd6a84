"""Acks of single pushes folded into the next send's append: one append for a send and the
reads waiting, each read answered only once that append is durable; without a send, or when
the send's append fails, the reads are recorded on their own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from broker.keys import RUNTIME
from broker.services.readfold import ReadFold
from eventstore.base import ConcurrencyError, ExpectedVersion, StoreUnavailable
from eventstore.events import BaseEvent, MessageRead, MessageSent, MessagesRead
from tests.broker.identity.helpers import node_session
from tests.helpers.messaging import Client, connect, receive, send


class FakeRuntime:
    def __init__(self) -> None:
        self.appends: list[tuple[list[BaseEvent], ExpectedVersion]] = []
        self.gate: asyncio.Future[None] | None = None
        self.entered = asyncio.Event()
        self.fail: list[Exception] = []  # raised by the next appends, in order

    async def record(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Any]:
        self.entered.set()
        if self.gate is not None:
            await self.gate
        if self.fail:
            raise self.fail.pop(0)
        self.appends.append((list(events), expected_version))
        return [("env", e) for e in events]


def sent(message_id: str) -> MessageSent:
    return MessageSent(message_id=message_id, from_node="a", to_nodes=("b",), message_type="t")


async def test_reads_go_with_the_next_send_and_are_answered_once_it_is_durable() -> None:
    runtime = FakeRuntime()
    fold = ReadFold(runtime, wait=3600)  # no fallback within the test: only the send records
    acks = [fold.read("b", "m1"), fold.read("b", "m2"), fold.read("c", "m1")]
    runtime.gate = asyncio.get_running_loop().create_future()
    send_task = asyncio.create_task(fold.append([sent("m3")], 0))
    await runtime.entered.wait()
    assert not any(a.done() for a in acks)  # the append is not durable yet: nobody answered
    runtime.gate.set_result(None)
    envs = await send_task
    await asyncio.gather(*acks)
    assert envs == [("env", sent("m3"))]  # the send's envelopes only
    ((events, expected),) = runtime.appends  # ONE append
    assert expected == 0 and events[0] == sent("m3")  # the send first: `0` is its stream's
    assert events[1:] == [
        MessagesRead(node_id="b", message_ids=["m1", "m2"]),
        MessageRead(message_id="m1", node_id="c", via="ws"),
    ]
    assert fold.folded == 3 and fold.alone == 0


async def test_without_a_send_the_reads_are_recorded_alone() -> None:
    runtime = FakeRuntime()
    fold = ReadFold(runtime, wait=0.001)
    await asyncio.wait_for(fold.read("b", "m1"), 10)  # returns once its own append is done
    assert runtime.appends == [([MessageRead(message_id="m1", node_id="b", via="ws")], None)]
    assert fold.alone == 1 and fold.folded == 0
    await fold.append([sent("m2")], 0)  # nothing waiting any more: the send alone
    assert runtime.appends[1] == ([sent("m2")], 0)


@pytest.mark.parametrize("error", [ConcurrencyError("m2", 0, 1), StoreUnavailable("gone")])
async def test_a_failed_send_leaves_its_reads_to_be_recorded_alone(error: Exception) -> None:
    runtime = FakeRuntime()
    fold = ReadFold(runtime, wait=3600)
    ack = fold.read("b", "m1")
    runtime.fail = [error]
    with pytest.raises(type(error)):
        await fold.append([sent("m2")], 0)
    await asyncio.wait_for(ack, 10)  # recorded on its own: the send's failure is not its own
    assert runtime.appends == [([MessageRead(message_id="m1", node_id="b", via="ws")], None)]


async def test_a_read_the_log_cannot_take_fails_with_the_logs_error() -> None:
    runtime = FakeRuntime()
    fold = ReadFold(runtime, wait=3600)
    ack = fold.read("b", "m1")
    runtime.fail = [StoreUnavailable("gone"), StoreUnavailable("still gone")]
    with pytest.raises(StoreUnavailable):
        await fold.append([sent("m2")], 0)
    with pytest.raises(StoreUnavailable, match="still gone"):
        await asyncio.wait_for(ack, 10)
    assert runtime.appends == []


async def test_drain_records_what_waits() -> None:
    runtime = FakeRuntime()
    fold = ReadFold(runtime, wait=3600)
    ack = fold.read("b", "m1")
    await fold.drain()
    assert ack.done() and runtime.appends[0][0][0].message_id == "m1"  # type: ignore[attr-defined]


async def test_a_single_ack_is_answered_only_once_its_read_is_in_the_log(
    client: Client,
) -> None:
    """Over the node WebSocket: each ack in a frame of its own, as seed-style nodes do; its ok
    comes once the read is durable, whether it went with a send or alone."""
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    a_ws = await connect(client, a)
    b_ws = await connect(client, b)
    await node_session(client, "node-c", 2)
    store = client.app[RUNTIME].store
    for i in range(5):
        await a_ws.send_json(
            {"type": "send", "ref": i, "to_nodes": ["node-b"], "message_type": "t", "content": i}
        )
        assert (await receive(a_ws))["type"] == "ok"
        pushed = await receive(b_ws)
        assert pushed["type"] == "message" and pushed["content"] == i
        await b_ws.send_json({"type": "ack", "ref": f"r{i}", "message_id": pushed["id"]})
        if i % 2:  # a send right behind the ack: the read may go with it
            await send(client, a, from_node="node-a", to_nodes=["node-c"], content=i)
        answer = await receive(b_ws)
        assert answer == {"type": "ok", "ref": f"r{i}", "message_id": pushed["id"]}
        read = [
            env
            async for env in store.read()
            if (type(env.event) is MessageRead and env.event.message_id == pushed["id"])
            or (type(env.event) is MessagesRead and pushed["id"] in env.event.message_ids)
        ]
        assert len(read) == 1 and read[0].event.node_id == "node-b"  # type: ignore[attr-defined]
    await a_ws.close()
    await b_ws.close()
