"""What an idle node WebSocket costs (issue 15): no push task waits on it (a pump starts when
the node may have mail and ends when nothing more can go) and no timer of its own checks that
the peer is still there (one liveness check walks every connection)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from broker.keys import DISPATCHER
from broker.ws.wire import PING_AFTER, Liveness
from tests.broker.identity.helpers import bearer, node_session
from tests.helpers.messaging import Client, connect, receive, send


async def test_a_pump_runs_only_while_there_is_mail(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    early = await send(client, a, from_node="node-a", to_nodes=["node-b"], content={"n": 0})
    assert early.status == 200
    dispatcher = client.app[DISPATCHER]
    ws = await connect(client, b)
    assert (await receive(ws))["content"] == {"n": 0}  # queued before: pushed at the welcome
    conn = dispatcher.connections["node-b"]
    await dispatcher.drained(conn)
    assert not dispatcher.pumping("node-b")  # idle: no task for it
    for n in (1, 2):  # mail for an idle connection starts a pump, each time
        resp = await send(client, a, from_node="node-a", to_nodes=["node-b"], content={"n": n})
        assert resp.status == 200
        pushed = await receive(ws)
        assert pushed["content"] == {"n": n}
        await dispatcher.drained(conn)
        assert not dispatcher.pumping("node-b")
        await ws.send_json({"type": "ack", "message_id": pushed["id"], "ref": n})
        assert (await receive(ws))["ref"] == n
    await ws.close()


async def test_the_window_still_holds_without_a_waiting_pump(client: Client) -> None:
    """Pushes beyond the window wait for an ack; the ack starts the pump that pushes the next."""
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    window = client.app[DISPATCHER].config.window
    for n in range(window + 1):
        resp = await send(client, a, from_node="node-a", to_nodes=["node-b"], content={"n": n})
        assert resp.status == 200
    ws = await connect(client, b)
    first = [await receive(ws) for _ in range(window)]
    assert [m["content"]["n"] for m in first] == list(range(window))
    dispatcher = client.app[DISPATCHER]
    await dispatcher.drained(dispatcher.connections["node-b"])
    assert not dispatcher.pumping("node-b")  # full window: it ended instead of waiting
    await ws.send_json({"type": "ack", "message_id": first[0]["id"]})
    kinds: dict[str, Any] = {}
    while len(kinds) < 2:
        m = await receive(ws)
        kinds[m["type"]] = m
    assert kinds["message"]["content"] == {"n": window}
    await ws.close()


async def _silent_node(client: Client, token: str) -> aiohttp.ClientWebSocketResponse:
    """A node whose client does not answer Pings by itself."""
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(token), autoping=False)
    assert (await receive(ws))["type"] == "welcome"
    return ws


async def test_a_silent_peer_is_pinged_then_cut_by_the_shared_check(client: Client) -> None:
    b = (await node_session(client, "node-b", 1))["access_token"]
    c = (await node_session(client, "node-c", 2))["access_token"]
    dead = await _silent_node(client, b)
    alive = await _silent_node(client, c)
    liveness = Liveness(client.app[DISPATCHER].connections, interval=30)
    for _ in range(PING_AFTER):
        liveness.check()
    for ws in (dead, alive):  # both pinged
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.PING
    # One answers, then sends an op: once that op is answered, its Pong was read before it.
    await alive.pong()
    await alive.send_json({"type": "heartbeat", "ref": "after-pong"})
    assert (await receive(alive))["ref"] == "after-pong"
    liveness.check()  # the silent one is cut (no Close frame: it would not be read)
    msg = await dead.receive(timeout=10)
    assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE)
    connections = client.app[DISPATCHER].connections
    assert "node-c" in connections and not connections["node-c"].closed
    await alive.send_json({"type": "heartbeat", "ref": "still"})
    assert (await receive(alive))["ref"] == "still"
    await alive.close()


async def test_a_peer_that_talks_is_never_pinged_by_the_check(client: Client) -> None:
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await _silent_node(client, b)
    liveness = Liveness(client.app[DISPATCHER].connections, interval=30)
    for n in range(3 * PING_AFTER):
        liveness.check()
        await ws.send_json({"type": "heartbeat", "ref": n})
        msg = await ws.receive(timeout=10)  # its answer, never a Ping
        assert msg.type == aiohttp.WSMsgType.TEXT and msg.json()["ref"] == n
    await ws.close()


async def test_the_check_skips_closed_connections(client: Client) -> None:
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await connect(client, b)
    conn = client.app[DISPATCHER].connections["node-b"]
    conn.closed = True
    liveness = Liveness({"node-b": conn}, interval=30)
    for _ in range(PING_AFTER + 2):
        liveness.check()
    assert conn.quiet == 0
    await asyncio.wait_for(ws.close(), 10)


async def test_the_running_check_pings_and_cuts_in_slices(client: Client) -> None:
    """`run` goes through the connections a slice at a time (here one): every silent peer is
    pinged, then cut."""
    tokens = [(await node_session(client, f"node-{i}", i))["access_token"] for i in range(3)]
    sockets = [await _silent_node(client, t) for t in tokens]
    liveness = Liveness(client.app[DISPATCHER].connections, interval=0.01)
    liveness.SLICE = 1
    task = asyncio.create_task(liveness.run())
    try:
        for ws in sockets:
            assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.PING
        for ws in sockets:
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    finally:
        task.cancel()


async def test_a_pump_that_fails_is_logged_and_the_next_mail_starts_another(
    client: Client,
) -> None:
    """Nothing awaits a pump: its failure is logged with its traceback, and the connection's
    next mail starts a new one."""
    import contextlib
    import unittest.mock

    import structlog

    from broker.ws.wire import NodeConnection

    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    dispatcher = client.app[DISPATCHER]
    ws = await connect(client, b)
    conn = dispatcher.connections["node-b"]
    real_push = NodeConnection.push
    failures = [RuntimeError("push broke")]

    async def push(self: NodeConnection, payloads: Any) -> bool:
        if failures:
            raise failures.pop()
        return await real_push(self, payloads)

    with (
        structlog.testing.capture_logs() as logs,
        unittest.mock.patch.object(NodeConnection, "push", push),
    ):
        resp = await send(client, a, from_node="node-a", to_nodes=["node-b"], content={"n": 1})
        assert resp.status == 200
        with contextlib.suppress(RuntimeError):
            await dispatcher.drained(conn)
        assert not failures and not dispatcher.pumping("node-b")
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["delivery_pump_failed"]
        resp = await send(client, a, from_node="node-a", to_nodes=["node-b"], content={"n": 2})
        assert resp.status == 200
        assert (await receive(ws))["content"] == {"n": 2}  # n=1 stays in flight until redelivery
    await ws.close()
