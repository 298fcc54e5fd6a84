"""The node WebSocket cap: past it a new connection is closed with 1013 (try again later) and
counted; a node's reconnection (which replaces its own connection) is still let in."""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, DeliveryConfig
from broker.ws.nodes import connection_cap
from tests.broker.identity.helpers import bearer, node_session
from tests.conftest import make_config

Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Client]:
    config: Config = make_config(tmp_path)
    delivery = msgspec.structs.replace(DeliveryConfig(), ws_max_connections=2)
    async with TestClient(
        TestServer(create_app(msgspec.structs.replace(config, delivery=delivery)))
    ) as c:
        yield c


async def open_ws(client: Client, token: str) -> aiohttp.ClientWebSocketResponse:
    return await client.ws_connect("/api/v1/ws", headers=bearer(token))


async def test_past_the_cap_a_connection_is_closed_1013_and_counted(capped: Client) -> None:
    tokens = [(await node_session(capped, f"node-{i}", i))["access_token"] for i in range(3)]
    first, second = await open_ws(capped, tokens[0]), await open_ws(capped, tokens[1])
    for ws in (first, second):
        assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    third = await open_ws(capped, tokens[2])
    msg = await third.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013, msg
    again = await open_ws(capped, tokens[0])  # node-0 reconnects: replaces its own connection
    assert (await again.receive_json(timeout=10))["type"] == "welcome"
    resp = await capped.get("/metrics", headers=bearer(tokens[1]))
    text = await resp.text()
    assert 'broker_ws_refused_total{reason="capacity"} 1.0' in text
    assert "broker_node_connections 2.0" in text
    for ws in (first, second, third, again):
        await ws.close()


def test_the_default_cap_keeps_descriptors_for_the_log() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(DeliveryConfig(fd_reserve=100)) == max(1, soft - 100)
    assert connection_cap(DeliveryConfig(ws_max_connections=7)) == 7
