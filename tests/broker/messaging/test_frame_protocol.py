"""broker.ws.protocol.FrameProtocol on a stub transport: the same messages whichever way the
bytes are split into reads, messages its owner cannot take yet wait in order with reading
paused, and the close handshake from either side."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from aiohttp import WSMsgType

from broker.ws.protocol import FrameProtocol
from broker.ws.wire import close_frame
from tests.broker.messaging.test_ws_protocol import CLOSE, CONT, PING, TEXT, frame


@dataclass
class StubTransport:
    written: list[bytes] = field(default_factory=list)
    closing: bool = False
    paused: bool = False
    pauses: int = 0

    def write(self, data: bytes) -> None:
        assert not self.closing
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class Recorder(FrameProtocol):
    __slots__ = ("busy", "got")

    def __init__(self, max_msg_size: int = 1 << 20) -> None:
        request = SimpleNamespace(headers={})
        super().__init__(request, SimpleNamespace(compress=0), max_msg_size, 10.0)  # type: ignore[arg-type]
        self.got: list[tuple[WSMsgType, Any]] = []
        self.busy = False

    def on_message(self, msg: Any) -> bool:
        if self.busy:
            return False
        if msg.type is WSMsgType.PING:
            self.write_pong(msg.data)
        self.got.append((msg.type, bytes(msg.data) if msg.type is WSMsgType.PING else msg.data))
        return True


def attached(proto: Recorder) -> StubTransport:
    transport = StubTransport()
    proto.transport = transport  # type: ignore[assignment]
    return transport


STREAM = (
    frame(TEXT, b'{"a": 1}')
    + frame(TEXT, b'{"b":', fin=False)
    + frame(PING, b"p")
    + frame(CONT, b" 2}")
    + frame(TEXT, "é".encode() * 200)  # a 16-bit length
)
EXPECTED = [
    (WSMsgType.TEXT, '{"a": 1}'),
    (WSMsgType.PING, b"p"),
    (WSMsgType.TEXT, '{"b": 2}'),
    (WSMsgType.TEXT, "é" * 200),
]


async def test_the_same_messages_at_every_split_of_the_bytes() -> None:
    for cut in range(len(STREAM) + 1):
        for second in (cut, min(len(STREAM), cut + 7)):  # two and three reads
            proto = Recorder()
            transport = attached(proto)
            for part in (STREAM[:cut], STREAM[cut:second], STREAM[second:]):
                if part:
                    proto.data_received(part)
            assert proto.got == EXPECTED, cut
            assert transport.written == [b"\x8a\x01p"]  # the Pong


async def test_what_the_owner_cannot_take_waits_in_order_with_reading_paused() -> None:
    proto = Recorder()
    transport = attached(proto)
    proto.data_received(frame(TEXT, b"1"))
    proto.busy = True
    proto.data_received(frame(TEXT, b"2") + frame(TEXT, b"3"))
    assert proto.got == [(WSMsgType.TEXT, "1")] and transport.paused
    proto.busy = False
    proto.data_received(frame(TEXT, b"4"))  # a read already under way: behind the others
    assert len(proto.got) == 1
    proto.wake()
    await asyncio.sleep(0)  # wake takes them on the loop's next step
    assert [m for _, m in proto.got] == ["1", "2", "3", "4"]
    assert not transport.paused and transport.pauses == 1


async def test_the_peers_close_is_answered_and_ends_the_connection() -> None:
    proto = Recorder()
    transport = attached(proto)
    proto.data_received(frame(CLOSE, (1001).to_bytes(2, "big")) + frame(TEXT, b"late"))
    assert transport.written == [close_frame(1000, "")] and transport.closing
    assert proto.got == [] and proto.closed


async def test_after_its_own_close_only_the_peers_close_matters() -> None:
    proto = Recorder()
    transport = attached(proto)
    proto.send_close(4000, "bye")
    proto.data_received(frame(TEXT, b"dropped") + frame(PING, b""))
    assert proto.got == [] and not transport.closing
    proto.data_received(frame(CLOSE, (4000).to_bytes(2, "big")))
    assert transport.written == [close_frame(4000, "bye")]  # no second Close
    assert transport.closing


async def test_a_refused_frame_sends_its_code_and_drops_what_follows() -> None:
    proto = Recorder(max_msg_size=10)
    transport = attached(proto)
    proto.data_received(frame(TEXT, b"x" * 11) + frame(TEXT, b"next"))
    assert transport.written == [close_frame(1009, "")]
    proto.data_received(frame(CLOSE, b""))  # unread: the peer or the timeout ends it
    assert proto.got == [] and not transport.closing
