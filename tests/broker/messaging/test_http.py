"""Messaging over HTTP: send, pending, mark read, state, idempotency, dead letters."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from tests.broker.identity.helpers import assert_error, bearer, node_session, operator_token
from tests.helpers.messaging import pending, send

Client = TestClient  # type: ignore[type-arg]


async def test_send_pending_read_in_priority_order(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    ids = {}
    for prio in ("low", "normal", "critical", "high", "normal"):
        resp = await send(
            client,
            a,
            from_node="node-a",
            to_nodes=["node-b"],
            priority=prio,
            ttl=600,
            content={"p": prio},
            metadata={"correlation_id": prio},
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["status"] == "queued" and body["recipients"] == 1
        assert body["expires_at"].endswith("Z")
        ids.setdefault(prio, []).append(body["message_id"])
    got = await pending(client, b, "node-b")
    order = [m["priority"] for m in got["messages"]]
    assert order == ["critical", "high", "normal", "normal", "low"]
    assert [m["id"] for m in got["messages"] if m["priority"] == "normal"] == ids["normal"]
    assert got["total"] == 5
    first = got["messages"][0]
    assert first["from_node"] == "node-a" and first["message_type"] == "data_sync"
    assert first["content"] == {"p": "critical"}
    assert first["metadata"] == {"correlation_id": "critical"}
    assert set(first) >= {
        "id",
        "from_node",
        "message_type",
        "content",
        "priority",
        "metadata",
        "sent_at",
        "expires_at",
    }
    limited = await pending(client, b, "node-b", limit=2)
    assert len(limited["messages"]) == 2 and limited["total"] == 5
    assert (await pending(client, b, "node-b", message_type="other")) == {
        "messages": [],
        "total": 0,
    }

    resp = await client.put(f"/api/v1/messages/{first['id']}/read", headers=bearer(b))
    assert resp.status == 200
    resp = await client.put(f"/api/v1/messages/{first['id']}/read", headers=bearer(b))
    assert resp.status == 200  # idempotent
    after = await pending(client, b, "node-b")
    assert first["id"] not in [m["id"] for m in after["messages"]]
    assert after["total"] == 4
    # The sender sees per-recipient state.
    resp = await client.get(f"/api/v1/messages/{first['id']}", headers=bearer(a))
    state = await resp.json()
    assert state["recipients"] == [
        {"node_id": "node-b", "status": "read", "attempts": 0, "at": state["recipients"][0]["at"]}
    ]


async def test_one_message_many_recipients_read_separately(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    c = (await node_session(client, "node-c", 2))["access_token"]
    resp = await send(client, a, from_node="node-a", to_nodes=["node-b", "node-c"])
    mid = (await resp.json())["message_id"]
    assert (await client.put(f"/api/v1/messages/{mid}/read", headers=bearer(b))).status == 200
    assert (await pending(client, b, "node-b"))["messages"] == []
    assert [m["id"] for m in (await pending(client, c, "node-c"))["messages"]] == [mid]


async def test_send_refusals(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    resp = await send(client, a, from_node="node-b", to_nodes=["node-a"])  # spoofed sender
    assert resp.status == 403
    assert_error(await resp.json(), 403, "AUTHORIZATION_ERROR")
    resp = await send(client, a, from_node="node-a", to_nodes=["node-b", "ghost-1", "ghost-2"])
    assert resp.status == 404
    body = await resp.json()
    assert "ghost-1" in body["message"] and "ghost-2" in body["message"]
    for bad in (
        {"to_nodes": []},
        {"to_nodes": ["node-b"], "priority": "urgent"},
        {"to_nodes": ["node-b"], "ttl": 0},
        {"to_nodes": ["node-b"], "ttl": 999999},
        {"to_nodes": ["node-b"], "content": "x" * 70_000},
        {"to_nodes": "node-b"},
    ):
        resp = await send(client, a, from_node="node-a", **bad)
        assert resp.status == 422, (bad, await resp.text())
        assert_error(await resp.json(), 422, "VALIDATION_ERROR")
    resp = await client.post(
        "/api/v1/messages/send",
        data=b"{not json",
        headers={**bearer(a), "Content-Type": "application/json"},
    )
    assert resp.status == 422
    resp = await client.post("/api/v1/messages/send", json={"to_nodes": ["node-b"]})
    assert resp.status == 401
    # Node B can't read node A's mailbox; nobody but a recipient can mark read.
    resp = await client.get("/api/v1/messages/pending/node-a", headers=bearer(b))
    assert resp.status == 403
    mid = (await (await send(client, a, from_node="node-a", to_nodes=["node-b"])).json())[
        "message_id"
    ]
    resp = await client.put(f"/api/v1/messages/{mid}/read", headers=bearer(a))
    assert resp.status == 404
    resp = await client.put("/api/v1/messages/msg_nope/read", headers=bearer(b))
    assert resp.status == 404
    resp = await client.get(
        f"/api/v1/messages/{mid}",
        headers=bearer((await node_session(client, "node-x", 3))["access_token"]),
    )
    assert resp.status == 404


async def test_idempotency_key_returns_the_first_message(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    headers = {**bearer(a), "Idempotency-Key": "retry-1"}
    body = {"from_node": "node-a", "to_nodes": ["node-b"], "message_type": "t", "content": 1}
    first = await (await client.post("/api/v1/messages/send", json=body, headers=headers)).json()
    again = await (await client.post("/api/v1/messages/send", json=body, headers=headers)).json()
    assert first["message_id"] == again["message_id"]
    via_meta = {**body, "metadata": {"idempotency_key": "retry-2"}}
    m1 = await (await send(client, a, **via_meta)).json()
    m2 = await (await send(client, a, **via_meta)).json()
    assert m1["message_id"] == m2["message_id"] != first["message_id"]
    assert (await pending(client, b, "node-b"))["total"] == 2


async def test_operators_send_as_broker_and_read_any(client: Client) -> None:
    await node_session(client, "node-b", 1)
    op = await operator_token(client, "ops", ["operator"])
    viewer = await operator_token(client, "watcher", ["viewer"])
    resp = await send(client, op, to_nodes=["node-b"], message_type="command")
    assert resp.status == 200, await resp.text()
    listed = await pending(client, op, "node-b")
    assert listed["messages"][0]["from_node"] == "broker"
    resp = await send(client, viewer, to_nodes=["node-b"])
    assert resp.status == 403
    resp = await client.get("/api/v1/messages/pending/node-b", headers=bearer(viewer))
    assert resp.status == 403
    resp = await client.get("/api/v1/messages/dead-letters", headers=bearer(op))
    assert resp.status == 200 and (await resp.json())["total"] == 0
