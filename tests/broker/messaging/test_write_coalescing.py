"""A node connection's frames of one loop tick go out in one transport write, as separate
WebSocket frames in the order they were sent; a Ping, a Close or the slow path writes them
first; an aborted connection drops them; a transport the peer does not drain gets the slow
path (aiohttp's writer, which waits) after what was listed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import WSMsgType

from broker.errors import Disconnect
from broker.ws.wire import PING, SAFE_BUFFER, NodeConnection, close_frame, text_frames


@dataclass
class FakeTransport:
    log: list[tuple[str, bytes]]  # every write, by whom, in order
    buffered: int = 0
    closing: bool = False
    aborted: bool = False
    wrote: asyncio.Event = field(default_factory=asyncio.Event)

    def write(self, data: bytes) -> None:
        self.log.append(("transport", data))
        self.wrote.set()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closing = True


@dataclass
class FakeWS:
    log: list[tuple[str, bytes]]
    closed: bool = False
    compress: bool = False

    async def send_frame(self, data: bytes, opcode: WSMsgType) -> None:
        assert opcode == WSMsgType.TEXT
        self.log.append(("aiohttp", data))


def connection() -> tuple[NodeConnection, FakeTransport, list[tuple[str, bytes]]]:
    log: list[tuple[str, bytes]] = []
    transport = FakeTransport(log)
    conn = NodeConnection("b", FakeWS(log), send_timeout=600, transport=transport)  # type: ignore[arg-type]
    return conn, transport, log


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode byte, payload) of each unmasked frame, short lengths only."""
    out, pos = [], 0
    while pos < len(data):
        n = data[pos + 1]
        assert n < 126
        out.append((data[pos], data[pos + 2 : pos + 2 + n]))
        pos += 2 + n
    return out


async def test_frames_of_a_tick_go_out_in_one_write_in_order_as_separate_frames() -> None:
    conn, transport, log = connection()
    assert await conn.send_many([b'{"type":"message","id":"m1"}'])
    assert await conn.send_many([b'{"type":"ok","ref":1}', b'{"type":"ok","ref":2}'])
    assert log == []  # nothing written while the tick runs
    await asyncio.wait_for(transport.wrote.wait(), 10)
    ((who, data),) = log  # ONE write
    assert who == "transport"
    assert frames_of(data) == [
        (0x81, b'{"type":"message","id":"m1"}'),
        (0x81, b'{"type":"ok","ref":1}'),
        (0x81, b'{"type":"ok","ref":2}'),
    ]
    transport.wrote.clear()
    assert await conn.send_many([b'{"type":"ok","ref":3}'])  # the next tick: a write of its own
    await asyncio.wait_for(transport.wrote.wait(), 10)
    assert log[1] == ("transport", text_frames([b'{"type":"ok","ref":3}']))
    conn.abort()


async def test_a_close_after_listed_frames_delivers_them_first() -> None:
    conn, _transport, log = connection()
    await conn.send_many([b"a", b"b"])
    await conn.close(Disconnect(4000, "bye", False))
    assert log == [
        ("transport", text_frames([b"a", b"b"])),
        ("transport", close_frame(4000, "bye")),
    ]
    assert not await conn.send_many([b"late"])  # closed: refused, never written
    conn.flush()
    assert len(log) == 2


async def test_a_ping_goes_behind_the_listed_frames() -> None:
    conn, transport, log = connection()
    await conn.send_many([b"a"])
    conn._ping()  # the read check's timer fires within the tick
    assert log == [("transport", text_frames([b"a"])), ("transport", PING)]
    conn.flush()  # the tick's callback finds nothing left
    assert len(log) == 2
    conn.abort()
    assert transport.aborted


async def test_an_aborted_connection_drops_what_is_listed() -> None:
    conn, transport, log = connection()
    await conn.send_many([b"a"])
    conn.abort()
    conn.flush()
    assert log == [] and transport.aborted


async def test_a_closed_transport_drops_what_is_listed() -> None:
    conn, transport, log = connection()
    await conn.send_many([b"a"])
    transport.closing = True  # the peer went away
    conn.flush()
    assert log == []


async def test_a_peer_that_does_not_drain_gets_the_slow_path_after_what_is_listed() -> None:
    conn, transport, log = connection()
    await conn.send_many([b"a"])
    transport.buffered = SAFE_BUFFER  # the peer stopped reading: the writer must wait
    assert await conn.send_many([b"b"])
    assert log == [("transport", text_frames([b"a"])), ("aiohttp", b"b")]
    conn.abort()


async def test_what_is_listed_counts_against_the_safe_buffer() -> None:
    conn, transport, log = connection()
    big = b"x" * (SAFE_BUFFER // 2)
    await conn.send_many([big])
    transport.buffered = SAFE_BUFFER // 2  # with the listed half: the buffer is full
    await conn.send_many([b"b"])
    assert [who for who, _ in log] == ["transport", "aiohttp"]
    conn.abort()
