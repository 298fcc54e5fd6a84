"""A login revoked as stolen (refresh-token reuse) or logged out closes the node's open
WebSocket with 4401 at once, as HTTP refuses its token; other logins' sockets stay open."""

from __future__ import annotations

import json

import aiohttp
from aiohttp.test_utils import TestClient

from tests.broker.identity.helpers import bearer, login, node_session

Client = TestClient  # type: ignore[type-arg]


async def connect(client: Client, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(token))
    assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    return ws


async def test_refresh_token_reuse_closes_the_open_socket_with_4401(client: Client) -> None:
    stolen = await node_session(client, "node-a", 0)
    other = await node_session(client, "node-b", 1)
    ws = await connect(client, stolen["access_token"])
    bystander = await connect(client, other["access_token"])
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(stolen["refresh_token"]))
    assert resp.status == 200, await resp.text()
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(stolen["refresh_token"]))
    assert resp.status == 401  # reuse: the whole login is revoked
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401, msg
    resp = await client.get("/api/v1/nodes", headers=bearer(stolen["access_token"]))
    assert resp.status == 401
    await bystander.send_str(json.dumps({"type": "heartbeat", "ref": 1}))
    assert await bystander.receive_json(timeout=10) == {"type": "ok", "ref": 1}
    await bystander.close()


async def test_a_newer_login_of_the_node_leaves_its_socket_alone(client: Client) -> None:
    first = await node_session(client, "node-a", 0)
    ws = await connect(client, first["access_token"])
    await login(client, "node-a", 0)  # a second live login: nothing revoked
    await ws.send_str(json.dumps({"type": "heartbeat", "ref": 2}))
    assert await ws.receive_json(timeout=10) == {"type": "ok", "ref": 2}
    await ws.close()
