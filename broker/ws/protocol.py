"""A WebSocket after aiohttp has answered its upgrade: the broker's own asyncio protocol reads
its frames (issue 15: the memory of an idle node WebSocket).

aiohttp answers the upgrade (the handshake, permessage-deflate's negotiation, the 101); then
`take_over` hands the socket to a `FrameProtocol` and aiohttp's request ends, so its parsed
request, HTTP parser, `WebSocketResponse` and the handler's coroutines are not kept for the
socket's lifetime. The frames are parsed by aiohttp's own frame reader (C-accelerated: masking,
fragmented messages, control frames, UTF-8, the size limit and permessage-deflate as before),
which puts each message in one `_Sink` shared by every connection: each read is parsed and its
messages taken at once, in the same step of the loop. The server writes its frames itself
(`broker.ws.wire`); only a compressing connection's slow path uses aiohttp's frame writer.

A message the protocol's owner cannot take yet (`on_message` answers False) waits, with the
ones behind it, and reading pauses until `wake` finds it taken: the transport stops reading
while the owner is busy, as aiohttp's reading loop did by not reading.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from aiohttp import WSMsgType, hdrs, web
from aiohttp._websocket.helpers import ws_ext_parse
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.base_protocol import BaseProtocol

from broker.ws.wire import PING, close_frame

CLOSE_OK = 1000  # the answer to a peer's Close (RFC 6455 §5.5.1), as aiohttp answered it
_CLOSE = WSMsgType.CLOSE


class _Sink(WebSocketDataQueue):  # type: ignore[misc]
    """Where the frame reader puts each message (and its error), for the protocol that fed it
    to take right away. Its size never grows, so the reader never stalls on it: the protocols
    pause reading themselves."""

    __slots__ = ("error", "messages")

    def __init__(self) -> None:
        super().__init__(None, 1 << 16, loop=None)  # type: ignore[arg-type]
        self.messages: list[Any] = []
        self.error: BaseException | None = None

    def feed_data(self, data: Any, size: int) -> None:
        self.messages.append(data)

    def set_exception(self, exc: BaseException, exc_cause: Any = None) -> None:
        if self.error is None:
            self.error = exc

    def feed_eof(self) -> None:
        pass


_sink: _Sink | None = None


def _the_sink() -> _Sink:
    global _sink
    if _sink is None:
        _sink = _Sink()
    return _sink


class FrameProtocol(BaseProtocol):  # type: ignore[misc]
    """One WebSocket's frames, read by aiohttp's frame reader: answers the peer's Close (and
    closes the transport), drops what follows a Close it sent, and hands every other message
    to `on_message`. Writes Pongs, Pings and Closes itself; `send_frame` (aiohttp's writer,
    which compresses and waits for the transport to drain) for the rest.

    `closed` is True once a Close frame went either way or the connection is lost. The
    attributes NodeConnection reads (`closed`, `compress`, `send_frame`, `ping`, `close`) are
    those of the aiohttp `WebSocketResponse` it wrote through before."""

    __slots__ = (
        "_backlog",
        "_reader",
        "_writer",
        "close_timeout",
        "closed",
        "compress",
        "notakeover",
    )

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        max_msg_size: int,
        close_timeout: float,
    ) -> None:
        super().__init__(asyncio.get_running_loop())
        self._upgraded = True  # BaseProtocol.pause_reading: the transport only
        self.compress: int = ws.compress  # type: ignore[assignment]
        self.notakeover = (
            bool(self.compress)
            and ws_ext_parse(request.headers.get(hdrs.SEC_WEBSOCKET_EXTENSIONS), isserver=True)[1]
        )
        self._reader = WebSocketReader(
            _the_sink(), max_msg_size, compress=bool(self.compress), decode_text=True
        )
        self._writer: WebSocketWriter | None = None  # made by the first send_frame
        self._backlog: deque[Any] | None = None  # messages not taken yet (reading paused)
        self.close_timeout = close_timeout
        self.closed = False

    # --- reading ---

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        sink = _the_sink()
        self._reader.feed_data(data)
        messages, error = sink.messages, sink.error
        if messages:
            sink.messages = []
        sink.error = None
        backlog = self._backlog
        for msg in messages:
            if backlog is None:
                if self._take(msg):
                    continue
                backlog = self._backlog = deque()
                self.transport.pause_reading()  # type: ignore[union-attr]
            backlog.append(msg)
        if error is not None:
            # A frame the reader refused (too big, bad UTF-8, a protocol error): its code and
            # no reason, as aiohttp's WebSocketResponse sent. What the peer still sends is
            # read and dropped until it ends the connection (or `close_timeout` does), so the
            # Close is not lost to a reset while the peer is still writing.
            self._backlog = None
            self.send_close(getattr(error, "code", 1002), "")
            self.on_failed()

    def _take(self, msg: Any) -> bool:
        if msg.type is _CLOSE:
            if not self.close_sent():
                self.closed = True
                self._write(close_frame(CLOSE_OK, ""))
            self._end()
            return True
        if self.closed or self.close_sent():
            return True  # after a Close, only the peer's Close matters
        return self.on_message(msg)

    def wake(self) -> None:
        """The owner may take what waits: try again on the loop's next step."""
        if self._backlog:
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        backlog = self._backlog
        if backlog is None:
            return
        while backlog:
            if not self._take(backlog[0]):
                return  # still busy: the next wake tries again
            backlog.popleft()
            if self._backlog is not backlog:
                return  # closed meanwhile
        self._backlog = None
        if self.transport is not None and not self._buffer_paused:
            self.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.closed = True
        self._backlog = None
        self.on_lost()

    def eof_received(self) -> bool:
        return False  # the transport closes itself, then connection_lost

    # --- for the owner ---

    def on_message(self, msg: Any) -> bool:
        """A TEXT, BINARY, PING or PONG message: False if it cannot be taken now."""
        raise NotImplementedError

    def on_lost(self) -> None:
        """The connection ended."""

    def on_failed(self) -> None:
        """The peer sent a frame the reader refused: its Close frame is sent."""

    def close_sent(self) -> bool:
        return self.closed

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def _end(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def write_pong(self, payload: Any) -> None:
        self._write(bytes((0x8A, len(payload))) + bytes(payload))

    def send_close(self, code: int, reason: str) -> None:
        """A Close frame; the peer's answer ends the connection, or `close_timeout` does."""
        if self.closed:
            return
        self.closed = True
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(close_frame(code, reason))
        self._loop.call_later(self.close_timeout, _cut, t)

    # --- what NodeConnection writes through (the slow path, and a transport gone) ---

    async def send_frame(self, data: bytes, opcode: WSMsgType) -> None:
        if self.transport is None or self.closed:
            raise ConnectionResetError("the WebSocket is closed")
        if self._writer is None:
            self._writer = WebSocketWriter(
                self, self.transport, compress=self.compress, notakeover=self.notakeover
            )
        await self._writer.send_frame(data, opcode)

    async def ping(self) -> None:
        self._write(PING)

    async def close(self, *, code: int, message: bytes = b"") -> None:
        self.send_close(code, message.decode())


def _cut(transport: asyncio.BaseTransport) -> None:
    if not transport.is_closing():
        transport.close()


def unread_bytes(request: web.Request) -> bytes:
    """What the client sent behind its upgrade request before the 101 (a client should not:
    RFC 6455 §4.1), taken from aiohttp before `WebSocketResponse.prepare` hands it to a reader
    of its own. Called right before `prepare`, once the upgrade is known to be accepted (a
    refused one leaves the bytes to aiohttp, which reads them as the next request)."""
    handler = request.protocol
    tail: bytes = getattr(handler, "_message_tail", b"")
    if tail:
        handler._message_tail = b""  # type: ignore[attr-defined]
    return tail


class _HandedOver(web.StreamResponse):
    """What aiohttp gets back for a socket handed over: nothing more to write."""

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def take_over(request: web.Request, protocol: FrameProtocol) -> web.StreamResponse:
    """Hand the upgraded socket from aiohttp to `protocol`; the handler returns what this
    returns. Right after `WebSocketResponse.prepare`, in the same step of the loop (prepare
    does not wait once its 101 is written), so nothing was read in between.

    aiohttp's request handler is told its connection is gone once it no longer holds the
    transport: it neither writes to nor closes it, and its server forgets the connection when
    the request ends (graceful shutdown closes these sockets itself: `close_all`)."""
    handler = request.protocol
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("Connection lost")
    transport.set_protocol(protocol)
    protocol.transport = transport
    protocol._paused = handler._paused  # the transport tells the new protocol when it drains
    handler.transport = None
    handler.connection_lost(None)
    if handler._reading_paused or handler._buffer_paused:
        transport.resume_reading()
    return _HandedOver(status=101)
