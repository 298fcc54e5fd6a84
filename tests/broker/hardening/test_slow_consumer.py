"""A node that does not read what it is sent is cut after `ws_send_timeout`, even when every
push fits in the kernel's buffers (then no write ever waits): the connection Pings behind its
writes and a node without a Pong is cut. A node that reads stays."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, DeliveryConfig
from tests.broker.identity.helpers import bearer, node_session
from tests.conftest import make_config

Client = TestClient  # type: ignore[type-arg]
WS = aiohttp.ClientWebSocketResponse


@pytest.fixture
def short_timeout_config(tmp_path: Path) -> Config:
    config = make_config(tmp_path)
    delivery = msgspec.structs.replace(DeliveryConfig(), ws_send_timeout=0.4, ws_heartbeat=600.0)
    return msgspec.structs.replace(config, delivery=delivery)


@pytest.fixture
async def short(short_timeout_config: Config) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(short_timeout_config))) as c:
        yield c


async def setup_pair(client: Client) -> tuple[str, WS]:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(b), autoping=False)
    assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    resp = await client.post(
        "/api/v1/messages/send",
        json={"to_nodes": ["node-b"], "message_type": "t", "content": 1},
        headers=bearer(a),
    )
    assert resp.status == 200, await resp.text()
    return a, ws


async def test_a_node_that_never_answers_a_ping_is_cut(short: Client) -> None:
    _, ws = await setup_pair(short)
    kinds = []
    while True:  # reads every frame, answers nothing: bounded by the receive timeout
        msg = await ws.receive(timeout=30)
        kinds.append(msg.type)
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            break
    assert kinds[0] == aiohttp.WSMsgType.TEXT  # the push
    assert aiohttp.WSMsgType.PING in kinds


async def test_a_node_that_answers_pings_stays(short: Client) -> None:
    _, ws = await setup_pair(short)
    assert (await ws.receive_json(timeout=10))["type"] == "message"
    first = await ws.receive(timeout=10)
    assert first.type == aiohttp.WSMsgType.PING
    await ws.pong(first.data)
    await ws.send_json({"type": "heartbeat", "ref": 1})  # its answer is written after the Ping
    assert await ws.receive_json(timeout=10) == {"type": "ok", "ref": 1}
    # The answer is checked by a second Ping, sent once the first was judged: still connected.
    second = await ws.receive(timeout=10)
    assert second.type == aiohttp.WSMsgType.PING, second
    await ws.pong(second.data)
    await ws.send_json({"type": "heartbeat", "ref": 2})
    assert await ws.receive_json(timeout=10) == {"type": "ok", "ref": 2}
    await ws.close()
