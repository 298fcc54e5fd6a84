"""The node WebSocket on uvloop, the loop `broker serve` runs: pushes take the single-write path,
and a replaced connection is told why (close code 4000)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from broker.keys import DISPATCHER
from tests.broker.identity.helpers import bearer, node_session, operator_token
from tests.helpers.messaging import Client, connect, receive, send

uvloop = pytest.importorskip("uvloop")


@pytest.fixture(scope="module")
def event_loop_policy() -> Iterator[asyncio.AbstractEventLoopPolicy]:
    yield uvloop.EventLoopPolicy()


async def test_the_loop_is_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_pushes_are_written_in_one_go(client: Client) -> None:
    """uvloop's transports are not asyncio.Transport subclasses (0.22+): the connection must
    still get its transport, or every push goes through aiohttp's writer one frame at a time."""
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await connect(client, b)
    conn = client.app[DISPATCHER].connections["node-b"]
    assert conn.transport is not None and not ws.compress
    resp = await send(client, a, from_node="node-a", to_nodes=["node-b"], content={"n": 1})
    assert resp.status == 200
    pushed = await receive(ws)
    assert pushed["content"] == {"n": 1}
    await ws.close()


async def test_a_replaced_connection_gets_close_code_4000(client: Client) -> None:
    """Before the close handshake was the handler's to finish, the server shut the socket right
    after its Close frame and the client's answer met a reset: aiohttp clients reported 1006
    (most of the time on uvloop). Several rounds, since that was a race."""
    b = (await node_session(client, "node-b", 1))["access_token"]
    newest = await connect(client, b)
    for _ in range(5):
        older, newest = newest, await client.ws_connect("/api/v1/ws", headers=bearer(b))
        assert (await receive(newest))["type"] == "welcome"
        closing = await older.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert older.close_code == 4000
    await newest.close()


async def test_a_deregistered_node_is_closed_with_code_4003(client: Client) -> None:
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await connect(client, b)
    operator = await operator_token(client, "ops", ["operator"])
    resp = await client.delete("/api/v1/nodes/node-b", headers=bearer(operator))
    assert resp.status == 204
    closing = await ws.receive(timeout=10)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == 4003
