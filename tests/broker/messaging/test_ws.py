"""The node WebSocket: auth, push order, batching, acks, redelivery, bounds."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.broker.identity.helpers import bearer, node_session, operator_token
from tests.helpers.messaging import WS, Client, connect, pending, receive, send


async def until(ws: WS, kind: str) -> Any:
    """The next frame of type `kind` (other frames in between are returned in a list too)."""
    while True:
        frame = await receive(ws)
        if isinstance(frame, dict) and frame.get("type") == kind:
            return frame


async def test_backlog_is_pushed_in_priority_order_then_live(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    for prio in ("low", "high", "normal", "critical"):
        await send(
            client, a, from_node="node-a", to_nodes=["node-b"], priority=prio, content={"p": prio}
        )
    ws = await connect(client, b)
    pushed = [await receive(ws) for _ in range(4)]
    assert [m["type"] for m in pushed] == ["message"] * 4
    assert [m["priority"] for m in pushed] == ["critical", "high", "normal", "low"]
    assert pushed[0]["content"] == {"p": "critical"} and pushed[0]["from_node"] == "node-a"
    resp = await send(client, a, from_node="node-a", to_nodes=["node-b"], content={"live": 1})
    live = await receive(ws)
    assert live["id"] == (await resp.json())["message_id"] and live["content"] == {"live": 1}
    await ws.close()


async def test_ops_batching_ack_equals_http_read(client: Client) -> None:
    await node_session(client, "node-a", 0)
    b = (await node_session(client, "node-b", 1))["access_token"]
    a_ws = await connect(client, (await node_session(client, "node-c", 2))["access_token"])
    b_ws = await connect(client, b)
    await a_ws.send_json(
        [
            {
                "type": "send",
                "ref": 1,
                "to_nodes": ["node-b"],
                "message_type": "t",
                "content": 1,
                "priority": "high",
            },
            {"type": "heartbeat", "ref": 2, "status": "healthy", "metrics": {"cpu": 1}},
            {"type": "status", "ref": 3, "status": "active", "load": 0.5},
            {"type": "telemetry", "ref": 4, "metrics": {"temp": 40}},
            {"type": "bogus", "ref": 5},
            {
                "type": "send",
                "ref": 6,
                "from_node": "node-a",
                "to_nodes": ["node-b"],
                "message_type": "t",
            },
        ]
    )
    answers = await receive(a_ws)
    assert [x["type"] for x in answers] == ["ok", "ok", "ok", "ok", "error", "error"]
    assert [x["ref"] for x in answers] == [1, 2, 3, 4, 5, 6]
    assert answers[0]["message_id"].startswith("msg_")
    assert answers[4]["error"]["code"] == "VALIDATION_ERROR"
    assert answers[5]["error"]["code"] == "AUTHORIZATION_ERROR"  # spoofed sender
    pushed = await until(b_ws, "message")
    assert pushed["id"] == answers[0]["message_id"]
    await b_ws.send_json({"type": "ack", "message_id": pushed["id"], "ref": "x"})
    ok = await until(b_ws, "ok")
    assert ok["ref"] == "x"
    assert (await pending(client, b, "node-b"))["messages"] == []  # the same read as HTTP
    # A bad frame never closes the socket.
    await b_ws.send_str("{not json")
    assert (await receive(b_ws))["type"] == "error"
    await b_ws.send_json({"type": "ack", "message_id": "msg_nope", "ref": 9})
    err = await receive(b_ws)
    assert err["type"] == "error" and err["error"]["code"] == "NOT_FOUND"
    await b_ws.send_json({"type": "heartbeat", "ref": 10})
    assert (await receive(b_ws))["type"] == "ok"
    await a_ws.close()
    await b_ws.close()


async def test_unacked_delivery_is_redelivered_on_reconnect(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    mid = (await (await send(client, a, from_node="node-a", to_nodes=["node-b"])).json())[
        "message_id"
    ]
    first = await connect(client, b)
    assert (await receive(first))["id"] == mid  # pushed, never acked
    second = await connect(client, b)  # a new connection replaces the old one
    closed = await first.receive(timeout=10)
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert first.close_code == 4000
    again = await receive(second)
    assert again["id"] == mid
    state = await (await client.get(f"/api/v1/messages/{mid}", headers=bearer(a))).json()
    assert state["recipients"][0]["status"] == "delivered"
    assert state["recipients"][0]["attempts"] == 2
    await second.send_json({"type": "ack", "message_id": mid})
    await until(second, "ok")
    await second.close()
    third = await connect(client, b)
    await third.send_json({"type": "heartbeat", "ref": "hb"})
    frame = await receive(third)  # nothing acked is pushed again: the first frame is the ok
    assert frame == {"type": "ok", "ref": "hb"}
    await third.close()


async def test_window_bounds_in_flight(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    for i in range(105):
        await send(client, a, from_node="node-a", to_nodes=["node-b"], content=i)
    ws = await connect(client, b)
    got = [await receive(ws) for _ in range(100)]
    assert [m["content"] for m in got] == list(range(100))
    # Nothing more until an ack frees the window.
    await ws.send_json({"type": "heartbeat", "ref": "probe"})
    assert await receive(ws) == {"type": "ok", "ref": "probe"}
    await ws.send_json({"type": "ack", "message_id": got[0]["id"]})
    frames = [await receive(ws) for _ in range(2)]
    kinds = sorted(f["type"] for f in frames)
    assert kinds == ["message", "ok"]
    assert next(f for f in frames if f["type"] == "message")["content"] == 100
    await ws.close()


async def test_an_ack_makes_room_before_its_read_is_durable(
    client: Client, monkeypatch: Any
) -> None:
    """The window counts pushes the node has not acked: an ack frees its slot when it arrives,
    while its `ok` waits for the read to be durable; if recording fails, the slot is taken
    back until the node acks again."""
    import asyncio

    from broker.keys import DISPATCHER, RUNTIME
    from eventstore.base import StoreUnavailable
    from eventstore.events import MessageRead, MessagesRead

    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    for i in range(103):
        await send(client, a, from_node="node-a", to_nodes=["node-b"], content=i)
    ws = await connect(client, b)
    got = [await receive(ws) for _ in range(100)]
    runtime, queue = client.app[RUNTIME], client.app[DISPATCHER].queue
    real, gate, failures = runtime.record, asyncio.Event(), [StoreUnavailable("disk gone")]

    async def gated(events: Any, expected_version: Any = None) -> Any:
        if any(type(e) in (MessageRead, MessagesRead) for e in events):
            await gate.wait()
            if failures:
                raise failures.pop()
        return await real(events, expected_version)

    monkeypatch.setattr(runtime, "record", gated)
    await ws.send_json([{"type": "ack", "message_id": m["id"]} for m in got[:2]])
    await ws.send_json({"type": "ack", "message_id": got[2]["id"]})
    await ws.send_json({"type": "ack", "message_id": got[2]["id"]})  # once only
    early = [await receive(ws) for _ in range(3)]  # no read is durable yet: no ok before these
    assert [m["type"] for m in early] == ["message"] * 3
    assert sorted(m["content"] for m in early) == [100, 101, 102]
    failures.clear()
    gate.set()
    oks = [await receive(ws) for _ in range(3)]  # the array's answer and the two single ones
    flat = [x for answer in oks for x in (answer if isinstance(answer, list) else [answer])]
    assert [x["type"] for x in flat] == ["ok"] * 4
    assert sorted(x["message_id"] for x in flat) == sorted(
        [*(m["id"] for m in got[:3]), got[2]["id"]]
    )
    assert queue.in_flight("node-b") == 100
    assert not client.app[DISPATCHER].credit("node-b")

    failures.append(StoreUnavailable("disk gone"))  # the next read fails: its slot comes back
    await ws.send_json({"type": "ack", "message_id": got[3]["id"]})
    answer = await receive(ws)
    assert answer["type"] == "error" and answer["error"]["code"] == "SERVICE_UNAVAILABLE"
    await send(client, a, from_node="node-a", to_nodes=["node-b"], content=103)
    await ws.send_json({"type": "heartbeat", "ref": "probe"})
    assert await receive(ws) == {"type": "ok", "ref": "probe"}  # the window is full again
    await ws.send_json({"type": "ack", "message_id": got[3]["id"]})
    frames = [await receive(ws) for _ in range(2)]
    assert sorted(f["type"] for f in frames) == ["message", "ok"]
    assert next(f for f in frames if f["type"] == "message")["content"] == 103
    await ws.close()


async def test_auth_by_first_frame_and_refusals(client: Client) -> None:
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await client.ws_connect("/api/v1/ws")
    await ws.send_json({"type": "auth", "token": f"Bearer {b}"})
    assert (await receive(ws))["type"] == "welcome"
    await ws.close()

    ws = await client.ws_connect("/api/v1/ws")
    await ws.send_json({"type": "auth", "token": "Bearer garbage"})
    err = await receive(ws)
    assert err["type"] == "error" and err["error"]["code"] == "AUTHENTICATION_ERROR"
    msg = await ws.receive(timeout=10)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == 1008

    resp = await client.get(
        "/api/v1/ws", headers={**bearer("garbage"), "Upgrade": "websocket", "Connection": "Upgrade"}
    )
    assert resp.status == 401
    op = await operator_token(client, "ops", ["operator"])
    resp = await client.get(
        "/api/v1/ws", headers={**bearer(op), "Upgrade": "websocket", "Connection": "Upgrade"}
    )
    assert resp.status == 403
    resp = await client.get(
        "/api/v1/ws",
        headers={
            **bearer(b),
            "Origin": "https://evil.example",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
        },
    )
    assert resp.status == 403


async def test_oversized_frame_closes_only_that_connection(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    wa = await connect(client, a)
    wb = await connect(client, b)
    await wa.send_str(json.dumps({"type": "heartbeat", "pad": "x" * (2 * 1024 * 1024)}))
    msg = await wa.receive(timeout=10)
    while msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
        msg = await wa.receive(timeout=10)
    assert wa.close_code == 1009  # message too big
    await wb.send_json({"type": "heartbeat", "ref": 1})
    assert await receive(wb) == {"type": "ok", "ref": 1}
    await wb.close()


async def test_slow_consumer_is_disconnected_others_unaffected(tmp_path: Any) -> None:
    import asyncio

    import msgspec
    from aiohttp.test_utils import TestServer

    from broker.app import create_app
    from broker.config import DeliveryConfig, LimitsConfig
    from broker.keys import DISPATCHER
    from tests.conftest import make_config

    config = msgspec.structs.replace(
        make_config(tmp_path),
        delivery=DeliveryConfig(window=1000, ws_send_timeout=0.5, max_content_bytes=100_000),
        limits=LimitsConfig(enabled=False),
    )
    async with TestClient(TestServer(create_app(config))) as c:
        a = (await node_session(c, "node-a", 0))["access_token"]
        b = (await node_session(c, "node-b", 1))["access_token"]
        cc = (await node_session(c, "node-c", 2))["access_token"]
        dispatcher = c.app[DISPATCHER]
        gone = asyncio.Event()
        disconnect = dispatcher.disconnect

        def disconnecting(conn: Any) -> None:
            disconnect(conn)
            if conn.node_id == "node-b":
                gone.set()

        dispatcher.disconnect = disconnecting  # type: ignore[method-assign]
        slow = await connect(c, b)  # never reads again
        fine = await connect(c, cc)
        blob = "x" * 90_000
        for _ in range(300):  # ~27 MB towards a reader that does not read
            await send(c, a, from_node="node-a", to_nodes=["node-b"], content=blob)
        await send(c, a, from_node="node-a", to_nodes=["node-c"], content="hello")
        assert (await receive(fine))["content"] == "hello"
        await asyncio.wait_for(gone.wait(), 30)  # the server gives up on node-b
        assert "node-b" not in dispatcher.connections
        assert "node-c" in dispatcher.connections
        await fine.send_json({"type": "heartbeat", "ref": 1})
        assert await receive(fine) == {"type": "ok", "ref": 1}
        await fine.close()
        assert not slow.closed  # left unread on purpose: the client never saw its end


async def test_deregistration_closes_the_node_connection(client: Client) -> None:
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await connect(client, b)
    admin = await operator_token(client, "root", ["admin"])
    resp = await client.delete("/api/v1/nodes/node-b", headers=bearer(admin))
    assert resp.status == 204, await resp.text()
    msg = await ws.receive(timeout=10)
    while msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
        msg = await ws.receive(timeout=10)
    assert ws.close_code == 4003


async def test_batched_frame_is_answered_when_its_append_fails(
    client: Client, monkeypatch: Any
) -> None:
    from broker.keys import RUNTIME
    from eventstore.base import ConcurrencyError, StoreUnavailable

    await node_session(client, "node-b", 1)
    a = (await node_session(client, "node-a", 0))["access_token"]
    ws = await connect(client, a)
    runtime = client.app[RUNTIME]
    real = runtime.record
    failures: list[BaseException] = [StoreUnavailable("disk gone"), ConcurrencyError("x", 0, 1)]

    async def flaky(events: Any, expected_version: Any = None) -> Any:
        if failures and len(events) > 1:
            raise failures.pop(0)
        return await real(events, expected_version)

    monkeypatch.setattr(runtime, "record", flaky)
    ops = [
        {"type": "send", "ref": 1, "to_nodes": ["node-b"], "message_type": "t"},
        {"type": "send", "ref": 2, "to_nodes": ["node-b"], "message_type": "t"},
        {"type": "ack", "ref": 3, "message_id": "msg_unknown"},
    ]
    await ws.send_json(ops)
    answers = await receive(ws)
    assert [(x["ref"], x["type"]) for x in answers] == [(1, "error"), (2, "error"), (3, "error")]
    assert answers[0]["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert answers[2]["error"]["code"] == "NOT_FOUND"
    await ws.send_json(ops)  # a conflict on the shared append: each op is settled on its own
    answers = await receive(ws)
    assert [(x["ref"], x["type"]) for x in answers] == [(1, "ok"), (2, "ok"), (3, "error")], answers
    await ws.close()


async def test_a_frame_of_acks_is_one_read_event(client: Client) -> None:
    from broker.keys import RUNTIME

    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    for i in range(3):
        await send(client, a, from_node="node-a", to_nodes=["node-b"], content=i)
    ws = await connect(client, b)
    ids = [(await receive(ws))["id"] for _ in range(3)]
    await ws.send_json(
        [{"type": "ack", "message_id": m, "ref": n} for n, m in enumerate(ids)]
        + [{"type": "ack", "message_id": ids[0], "ref": "again"}]
    )
    answers = await receive(ws)
    assert [(x["type"], x["ref"]) for x in answers] == [
        ("ok", 0),
        ("ok", 1),
        ("ok", 2),
        ("ok", "again"),
    ]
    store = client.app[RUNTIME].store
    batches = [e async for e in store.read(types=["message.read*"])]
    assert [e.type for e in batches] == ["message.read_batch"]
    assert batches[0].event.message_ids == ids  # type: ignore[attr-defined]
    assert batches[0].stream == "node-b"
    assert (await pending(client, b, "node-b"))["messages"] == []
    state = await (await client.get(f"/api/v1/messages/{ids[1]}", headers=bearer(a))).json()
    assert state["recipients"][0]["status"] == "read"
    await ws.close()


@pytest.mark.parametrize("compress", [0, 15])
async def test_pushes_of_every_frame_size_arrive(client: Client, compress: int) -> None:
    """Frames with a 7-bit, 16-bit and 64-bit length, written by the single-write path, or by
    aiohttp's compressing writer when the client negotiated permessage-deflate (browsers and many
    libraries offer it)."""
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    bodies = ["x" * 10, "y" * 300, "z" * 65_500]  # the last push frame is over 65,535 bytes
    for body in bodies:
        resp = await send(
            client, a, from_node="node-a", to_nodes=["node-b"], content={"body": body}
        )
        assert resp.status == 200, await resp.text()
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(b), compress=compress)
    assert (await receive(ws))["type"] == "welcome"
    assert ws.compress == compress
    pushed = [await receive(ws) for _ in bodies]
    assert [m["content"]["body"] for m in pushed] == bodies
    await ws.send_str(json.dumps([{"type": "ack", "message_id": m["id"]} for m in pushed]))
    answers = await receive(ws)
    assert [x["type"] for x in answers] == ["ok"] * 3
    await ws.close()


async def test_send_op_is_validated_like_the_http_send(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    ws = await connect(client, a)
    bad = [
        {"type": "send", "ref": 1, "to_nodes": [], "message_type": "t"},
        {"type": "send", "ref": 2, "to_nodes": [""], "message_type": "t"},
        {"type": "send", "ref": 3, "to_nodes": ["node-a"], "message_type": ""},
        {"type": "send", "ref": 4, "to_nodes": ["node-a"], "message_type": "t", "ttl": 0},
        {"type": "send", "ref": 5, "to_nodes": ["node-a"], "message_type": "t", "priority": "x"},
    ]
    await ws.send_json(bad)
    answers = await receive(ws)
    assert [(x["ref"], x["type"]) for x in answers] == [(i, "error") for i in range(1, 6)]
    assert {x["error"]["code"] for x in answers} == {"VALIDATION_ERROR"}
    await ws.close()


async def test_heartbeat_and_status_ops_are_validated_like_http(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    ws = await connect(client, a)
    await ws.send_json(
        [
            {"type": "heartbeat", "ref": 1, "status": "x" * 65},
            {"type": "status", "ref": 2, "status": ""},
            {"type": "status", "ref": 3, "last_seen": "y" * 65},
            {"type": "heartbeat", "ref": 4, "status": "healthy", "timestamp": 1.5},
        ]
    )
    answers = await receive(ws)
    assert [(x["ref"], x["type"]) for x in answers] == [
        (1, "error"),
        (2, "error"),
        (3, "error"),
        (4, "ok"),
    ]
    await ws.close()


async def test_send_ops_with_an_idempotency_key_are_sent_once(client: Client) -> None:
    """A retried send (same key) answers with the first one's id, in a later frame or twice
    in the same frame; the recipient gets one message."""
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await connect(client, a)
    op = {"type": "send", "to_nodes": ["node-b"], "message_type": "t", "idempotency_key": "k1"}
    await ws.send_json([{**op, "ref": 1}])
    (first,) = await receive(ws)
    await ws.send_json([{**op, "ref": 2}, {**op, "ref": 3}])
    again = await receive(ws)
    assert first["type"] == "ok" and [x["type"] for x in again] == ["ok", "ok"]
    assert {x["message_id"] for x in again} == {first["message_id"]}
    assert [x["ref"] for x in again] == [2, 3]
    await ws.send_json([{**op, "idempotency_key": "k2", "ref": 4}] * 2)
    twice = await receive(ws)
    assert [x["type"] for x in twice] == ["ok", "ok"]
    assert twice[0]["message_id"] == twice[1]["message_id"] != first["message_id"]
    listed = (await pending(client, b, "node-b"))["messages"]
    assert sorted(m["id"] for m in listed) == sorted({first["message_id"], twice[0]["message_id"]})
    await ws.close()
