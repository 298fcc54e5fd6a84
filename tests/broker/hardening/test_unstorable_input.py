"""Input the log cannot store is refused at the edge, naming the field, and hurts nobody else:
integers outside msgpack's range (-2^63 .. 2^64-1) and JSON nested past what the decoder
follows, over HTTP and the node WebSocket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from broker.http.middleware import request_context
from broker.jsonlimits import INT_MAX, INT_MIN, find_out_of_range, storable
from broker.keys import METRICS
from broker.metrics import Metrics
from eventstore.base import EventNotEncodable
from tests.broker.identity.helpers import bearer, node_body, node_session, rsa_key
from tests.broker.tenancy.conftest import Admin, auth

Client = TestClient  # type: ignore[type-arg]
BIG = 10**30


async def expect_422(resp: aiohttp.ClientResponse, field: str) -> None:
    assert resp.status == 422, await resp.text()
    body = await resp.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert field in body["message"], body["message"]


@pytest.mark.parametrize("value", [INT_MAX + 1, INT_MIN - 1, BIG, -BIG])
async def test_node_routes_refuse_unstorable_integers_naming_the_field(
    client: Client, value: int
) -> None:
    token = (await node_session(client, "node-a", 0))["access_token"]
    await node_session(client, "node-b", 1)
    h = bearer(token)
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/api/v1/nodes/node-a/heartbeat", {"metrics": {"cpu": value}}, "$.metrics.cpu"),
        ("PUT", "/api/v1/nodes/node-a", {"metadata": {"a": [1, value]}}, "$.metadata.a[1]"),
        (
            "PUT",
            "/api/v1/nodes/node-a",
            {"available_resources": {"gpu": {"n": value}}},
            "$.available_resources.gpu.n",
        ),
        (
            "POST",
            "/api/v1/messages/send",
            {"to_nodes": ["node-b"], "message_type": "t", "content": {"x": value}},
            "$.content.x",
        ),
        (
            "POST",
            "/api/v1/messages/send",
            {"to_nodes": ["node-b"], "message_type": "t", "content": 1, "metadata": {"m": value}},
            "$.metadata.m",
        ),
        (  # a whole float for an int field takes a second decoding: checked as well
            "POST",
            "/api/v1/messages/send",
            {"to_nodes": ["node-b"], "message_type": "t", "ttl": 60.0, "content": [value]},
            "$.content[0]",
        ),
    ]
    for method, path, body, field in cases:
        resp = await client.request(method, path, json=body, headers=h)
        await expect_422(resp, field)
    resp = await client.post(
        "/api/v1/auth/register",
        json=node_body("node-c", rsa_key(2), metadata={"region": "x", "n": value}),
    )
    await expect_422(resp, "$.metadata.n")
    # the largest storable values are fine
    resp = await client.post(
        "/api/v1/nodes/node-a/heartbeat", json={"metrics": {"a": INT_MAX, "b": INT_MIN}}, headers=h
    )
    assert resp.status == 200, await resp.text()


async def test_tenancy_routes_refuse_unstorable_integers(api: Client, admin: Admin) -> None:
    tenant = await admin.tenant()
    resp = await api.post(
        "/telemetry",
        json={
            "tenantId": tenant["id"],
            "uptime": 1,
            "activeUsers": 1,
            "exercisesCompletedToday": 1,
            "aiLatency": 1.0,
            "version": "1.0.0",
            "additionalData": {"cpu": BIG},
        },
    )
    await expect_422(resp, "$.additionalData.cpu")
    resp = await api.post(
        "/api/v1/admin/licenses",
        json={"tenant_id": tenant["id"], "expires_at": "2099-01-01", "max_usage_count": BIG},
        headers=auth(),
    )
    assert resp.status == 422, await resp.text()
    assert "max_usage_count" in (await resp.json())["message"]


async def test_an_unstorable_heartbeat_never_fails_a_bystanders_send(client: Client) -> None:
    """Before, the bad event failed the whole group commit: every concurrent send got 503."""
    a = (await node_session(client, "node-a", 0))["access_token"]
    await node_session(client, "node-b", 1)
    bad = [
        client.post(
            "/api/v1/nodes/node-a/heartbeat", json={"metrics": {"cpu": BIG}}, headers=bearer(a)
        )
        for _ in range(20)
    ]
    good = [
        client.post(
            "/api/v1/messages/send",
            json={"to_nodes": ["node-b"], "message_type": "t", "content": i},
            headers=bearer(a),
        )
        for i in range(40)
    ]
    answers = await asyncio.gather(*bad, *good)
    assert [r.status for r in answers[:20]] == [422] * 20
    assert [r.status for r in answers[20:]] == [200] * 40


async def test_node_websocket_answers_each_unstorable_op_with_an_error(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    await node_session(client, "node-b", 1)
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(a))
    assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    frame = [
        {"type": "heartbeat", "ref": 1, "metrics": {"cpu": BIG}},
        {"type": "send", "ref": 2, "to_nodes": ["node-b"], "message_type": "t", "content": 1},
        {"type": "status", "ref": 3, "metadata": {"deep": [{"x": -BIG}]}},
        {"type": "telemetry", "ref": 4, "metrics": {"ok": 1}},
    ]
    await ws.send_str(json.dumps(frame))
    answers = await ws.receive_json(timeout=10)
    assert [a["type"] for a in answers] == ["error", "ok", "error", "ok"], answers
    assert "$[0].metrics.cpu" in answers[0]["error"]["message"]
    assert "$[2].metadata.deep[0].x" in answers[2]["error"]["message"]
    # one op on its own, and a ref that is itself out of range
    await ws.send_str(json.dumps({"type": "heartbeat", "ref": BIG, "metrics": {}}))
    answer = await ws.receive_json(timeout=10)
    assert answer["type"] == "error" and answer["ref"] is None
    assert "$.ref" in answer["error"]["message"]
    await ws.close()


async def test_deeply_nested_json_is_an_error_not_silence(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    deep = "[" * 5000 + "]" * 5000
    resp = await client.post(
        "/api/v1/nodes/node-a/heartbeat",
        data='{"metrics": {"x": ' + deep + "}}",
        headers={**bearer(a), "Content-Type": "application/json"},
    )
    assert resp.status == 422, await resp.text()
    assert "nested too deeply" in (await resp.json())["message"]
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(a))
    assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    await ws.send_str('{"type": "heartbeat", "ref": 7, "metrics": {"x": ' + deep + "}}")
    answer = await ws.receive_json(timeout=10)
    assert answer["type"] == "error" and "nested too deeply" in answer["error"]["message"]
    await ws.send_str(json.dumps({"type": "heartbeat", "ref": 8}))
    assert (await ws.receive_json(timeout=10)) == {"type": "ok", "ref": 8}
    await ws.close()


def test_find_out_of_range_walks_iteratively() -> None:
    value: Any = INT_MAX + 1
    for _ in range(5000):  # deeper than the interpreter's recursion limit
        value = [value]
    assert find_out_of_range(value) == "$" + "[0]" * 5000
    assert find_out_of_range({"a": [True, 1.5, INT_MIN, "9" * 40]}) is None
    assert not storable(value)  # deeper than the msgpack encoder follows: walked


# Decoded JSON, with integers on both sides of the log's range and right at its edges.
_ints = st.one_of(
    st.integers(INT_MIN - 2, INT_MIN + 2),
    st.integers(INT_MAX - 2, INT_MAX + 2),
    st.integers(-(10**30), 10**30),
    st.integers(-5, 5),
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5) | _ints,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(_json_values)
def test_storable_is_exactly_no_integer_out_of_range(value: Any) -> None:
    """The msgpack screen (one C encoding) agrees with the walk, on every decoded document."""
    assert storable(value) == (find_out_of_range(value) is None)
    text = json.dumps(value)
    assert storable(json.loads(text)) == storable(value)  # as decoded from its text


async def test_an_event_the_log_refuses_is_a_422_naming_the_field() -> None:
    """Behind the edge's check, the store's own refusal (EventNotEncodable) is the sender's
    422 too, never a 500 or a 503."""
    app = web.Application()
    app[METRICS] = Metrics()
    request = make_mocked_request("POST", "/api/v1/nodes/n/heartbeat", app=app)

    async def handler(request: web.Request) -> web.StreamResponse:
        raise EventNotEncodable("node.heartbeat", "integer out of range", "metrics.cpu")

    resp = await request_context(request, handler)
    assert resp.status == 422
    body = json.loads(resp.body)  # type: ignore[arg-type]
    assert body["error"]["code"] == "VALIDATION_ERROR" and "metrics.cpu" in body["message"]
