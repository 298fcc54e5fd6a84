"""The node WebSocket after its upgrade is the broker's own protocol (broker.ws.protocol), not
aiohttp's request (issue 15). Over real sockets, with a raw RFC 6455 client where aiohttp's
client cannot say it (frames split across writes, fragmented messages, bad frames): the frames
and the close handshake behave as they did, aiohttp's server no longer holds the socket, and a
graceful shutdown still sends the nodes their Close frame."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from pathlib import Path
from typing import Any

import aiohttp

from broker import errors
from broker.keys import CONFIG, DISPATCHER, PENDING_SOCKETS
from tests.broker.identity.helpers import bearer, node_session
from tests.helpers.messaging import Client, connect, receive, send

TEXT, CONT, BINARY, CLOSE, PING, PONG = 0x1, 0x0, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 §5.2)."""
    head = bytes(((0x80 if fin else 0) | opcode,))
    n = len(payload)
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += struct.pack("!BH", 0x80 | 126, n)
    else:
        head += struct.pack("!BQ", 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(obj: Any) -> bytes:
    return frame(TEXT, json.dumps(obj).encode())


class Raw:
    """A raw WebSocket client: writes bytes as given, reads the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the server's next frame (unmasked, never fragmented here)."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 10)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def json(self) -> Any:
        opcode, payload = await self.frame()
        assert opcode == TEXT, (opcode, payload)
        return json.loads(payload)

    async def closed_with(self) -> tuple[int, str]:
        """The server's Close frame (what comes before it is skipped), then the end of the
        connection once it is answered."""
        opcode, payload = await self.frame()
        while opcode != CLOSE:
            opcode, payload = await self.frame()
        await self.write(frame(CLOSE, payload[:2]))
        self.writer.write_eof()
        assert await asyncio.wait_for(self.reader.read(), 10) == b""  # the server ends it
        return int.from_bytes(payload[:2], "big"), payload[2:].decode()

    def close(self) -> None:
        self.writer.close()


async def raw(client: Client, token: str | None = None, extra: bytes = b"") -> Raw:
    """A raw client past the upgrade; `extra` goes out with the upgrade request itself."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(
        (
            f"GET /api/v1/ws HTTP/1.1\r\nHost: {client.server.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{auth}\r\n"
        ).encode()
        + extra
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return Raw(reader, writer)


async def node(client: Client, name: str = "node-b", index: int = 1) -> Raw:
    token = (await node_session(client, name, index))["access_token"]
    ws = await raw(client, token)
    assert (await ws.json())["type"] == "welcome"
    return ws


async def test_a_frame_split_across_writes_is_one_message(client: Client) -> None:
    ws = await node(client)
    data = text({"type": "heartbeat", "ref": "split"})
    for i in range(len(data)):  # one byte a write
        await ws.write(data[i : i + 1])
    assert await ws.json() == {"type": "ok", "ref": "split"}
    two = text({"type": "heartbeat", "ref": 1}) + text({"type": "heartbeat", "ref": 2})
    await ws.write(two[:5])
    await ws.write(two[5:])
    assert [await ws.json() for _ in range(2)] == [{"type": "ok", "ref": r} for r in (1, 2)]
    ws.close()


async def test_a_fragmented_message_with_a_ping_between_its_fragments(client: Client) -> None:
    ws = await node(client)
    body = json.dumps({"type": "heartbeat", "ref": "fragments"}).encode()
    await ws.write(frame(TEXT, body[:7], fin=False) + frame(PING, b"mid"))
    await ws.write(frame(CONT, body[7:15], fin=False))
    await ws.write(frame(CONT, body[15:]))
    assert await ws.frame() == (PONG, b"mid")  # control frames may come between fragments
    assert await ws.json() == {"type": "ok", "ref": "fragments"}
    ws.close()


async def test_a_ping_is_answered_with_its_payload(client: Client) -> None:
    ws = await node(client)
    await ws.write(frame(PING, b"are you there"))
    assert await ws.frame() == (PONG, b"are you there")
    ws.close()


async def test_the_close_handshake_either_way(client: Client) -> None:
    ws = await node(client)
    await ws.write(frame(CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    assert await ws.frame() == (CLOSE, (1000).to_bytes(2, "big"))  # answered, as aiohttp did
    assert await asyncio.wait_for(ws.reader.read(), 10) == b""
    # The server's Close (here: replaced by a newer connection) carries its code and reason;
    # the node's answer ends the connection.
    token = (await node_session(client, "node-c", 2))["access_token"]
    ws = await raw(client, token)
    assert (await ws.json())["type"] == "welcome"
    newer = await raw(client, token)
    assert (await newer.json())["type"] == "welcome"
    assert await ws.closed_with() == (errors.REPLACED.code, errors.REPLACED.reason)
    await newer.write(text({"type": "heartbeat", "ref": 1}))
    assert await newer.json() == {"type": "ok", "ref": 1}
    newer.close()


async def test_bad_frames_close_with_their_code(client: Client) -> None:
    limit = client.app[CONFIG].delivery.ws_max_message_bytes
    cases = [
        (frame(TEXT, b" " * (limit + 1)), 1009),  # message too big
        (frame(TEXT, b" " * limit, fin=False) + frame(CONT, b"  "), 1009),  # ... in fragments
        (frame(TEXT, b'{"type": "\xff"}'), 1007),  # not UTF-8
        (frame(CONT, b"{}"), 1002),  # a continuation of nothing
    ]
    for i, (data, code) in enumerate(cases):
        ws = await node(client, f"node-{i}", i)
        await ws.write(data)
        assert (await ws.closed_with())[0] == code
        assert f"node-{i}" not in client.app[DISPATCHER].connections


async def test_a_binary_frame_is_answered_and_the_socket_stays(client: Client) -> None:
    ws = await node(client)
    await ws.write(frame(BINARY, b"\x00\x01"))
    err = await ws.json()
    assert err["type"] == "error" and err["error"]["code"] == "VALIDATION_ERROR"
    await ws.write(text({"type": "heartbeat", "ref": 2}))
    assert await ws.json() == {"type": "ok", "ref": 2}
    ws.close()


async def test_frames_behind_the_auth_frame_wait_for_the_session(client: Client) -> None:
    """The auth frame and the node's first ops in one write; and frames sent with the upgrade
    request itself, before the 101 (a client should not), are read all the same."""
    token = (await node_session(client, "node-b", 1))["access_token"]
    ws = await raw(client)
    ops = [text({"type": "heartbeat", "ref": n}) for n in range(3)]
    await ws.write(text({"type": "auth", "token": f"Bearer {token}"}) + b"".join(ops))
    assert (await ws.json())["type"] == "welcome"
    assert [await ws.json() for _ in range(3)] == [{"type": "ok", "ref": n} for n in range(3)]
    ws.close()
    early = await raw(client, token, extra=text({"type": "heartbeat", "ref": "early"}))
    assert (await early.json())["type"] == "welcome"
    assert await early.json() == {"type": "ok", "ref": "early"}
    early.close()


async def test_no_auth_frame_in_time_closes_with_the_auth_code(client: Client) -> None:
    client.app[CONFIG].delivery.ws_auth_timeout = 0.2
    ws = await raw(client)
    await ws.write(frame(PING, b"x"))  # answered while the auth frame is awaited
    assert await ws.frame() == (PONG, b"x")
    err = await ws.json()
    assert err["type"] == "error" and err["error"]["message"] == "auth timeout"
    assert await ws.closed_with() == (errors.AUTH_FAILED.code, errors.AUTH_FAILED.reason)
    assert not client.app[PENDING_SOCKETS]


async def test_permessage_deflate_ops_pushes_and_close(client: Client) -> None:
    a = (await node_session(client, "node-a", 0))["access_token"]
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(b), compress=15)
    assert ws.compress == 15  # negotiated
    assert (await receive(ws))["type"] == "welcome"
    await ws.send_json({"type": "heartbeat", "ref": "z"})  # compressed by the client
    assert await receive(ws) == {"type": "ok", "ref": "z"}
    blob = "y" * 50_000
    resp = await send(client, a, from_node="node-a", to_nodes=["node-b"], content=blob)
    assert resp.status == 200
    pushed = await receive(ws)
    assert pushed["content"] == blob
    await ws.send_json({"type": "ack", "message_id": pushed["id"], "ref": "ack"})
    assert (await receive(ws))["ref"] == "ack"
    conn = client.app[DISPATCHER].connections["node-b"]
    await conn.close(errors.DEREGISTERED)
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == errors.DEREGISTERED.code


async def test_aiohttp_forgets_the_upgraded_socket(client: Client) -> None:
    """aiohttp's server holds no request handler for an open node socket (its request ended)."""
    runner = client.server.runner
    assert runner is not None and runner.server is not None
    server = runner.server
    sockets = [await node(client, f"node-{i}", i) for i in range(3)]
    for ws in sockets:  # each socket's session answers: its upgrade's request ended long ago
        await ws.write(text({"type": "heartbeat", "ref": 0}))
        assert await ws.json() == {"type": "ok", "ref": 0}
    ours = {ws.writer.get_extra_info("sockname") for ws in sockets}
    assert not [h for h in server.connections if h.peername in ours]
    for ws in sockets:
        ws.close()


async def test_a_graceful_shutdown_sends_every_node_socket_its_close(client: Client) -> None:
    b = (await node_session(client, "node-b", 1))["access_token"]
    ws = await connect(client, b)
    unauthed = await raw(client)
    await client.server.close()
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == errors.SHUTDOWN.code
    assert await unauthed.closed_with() == (errors.SHUTDOWN.code, errors.SHUTDOWN.reason)


async def test_the_hand_over_behind_broker_serves_runner(tmp_path: Path) -> None:
    """`broker serve` runs the lean front (its request handler a subclass of aiohttp's): the
    upgraded socket is handed over from it the same way, ops and a shutdown's Close included."""
    from tests.broker.test_lean_front import lean_client, lean_config

    async for lean in lean_client(lean_config(tmp_path), lean=True):
        b = (await node_session(lean, "node-b", 1))["access_token"]
        ws = await raw(lean, b)
        assert (await ws.json())["type"] == "welcome"
        data = text({"type": "heartbeat", "ref": "lean"})
        await ws.write(data[:3])
        await ws.write(data[3:])
        assert await ws.json() == {"type": "ok", "ref": "lean"}
        runner = lean.server.runner
        assert runner is not None and runner.server is not None
        mine = ws.writer.get_extra_info("sockname")
        assert not [h for h in runner.server.connections if h.peername == mine]
        await lean.server.close()
        assert await ws.closed_with() == (errors.SHUTDOWN.code, errors.SHUTDOWN.reason)
