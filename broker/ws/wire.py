"""What the WebSocket fronts write on the wire: RFC 6455 frames, the push frame, error frames,
and the node connection that writes them (the dispatcher sees it as a
`broker.services.delivery.Connection`)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import WSMsgType

from broker.errors import BrokerError, Disconnect
from projections.messages import Mail, PendingMessage

if TYPE_CHECKING:
    from broker.ws.protocol import FrameProtocol

log = structlog.get_logger(__name__)

PING_AFTER = 3  # liveness checks without a word from the peer before it is pinged (Liveness)
SAFE_BUFFER = 256 * 1024  # bytes a socket may have queued before sends are timed
PING = b"\x89\x00"  # an unmasked Ping frame with no payload (RFC 6455 §5.5.2)

_LEN16 = struct.Struct("!BBH").pack
_LEN64 = struct.Struct("!BBQ").pack
_json = msgspec.json.Encoder()


def text_frames(payloads: Sequence[bytes]) -> bytes:
    """Unmasked server-to-client text frames (RFC 6455 §5.2: FIN, opcode 1), back to back."""
    parts: list[bytes] = []
    for payload in payloads:
        n = len(payload)
        if n < 126:
            parts.append(bytes((0x81, n)))
        elif n < 65536:
            parts.append(_LEN16(0x81, 126, n))
        else:
            parts.append(_LEN64(0x81, 127, n))
        parts.append(payload)
    return b"".join(parts)


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked Close frame (RFC 6455 §5.5.1): the code, then the reason, ≤ 123 bytes."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


def _cut(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.close()


# --- frames ---


class PushFrame(PendingMessage, kw_only=True, tag="message", tag_field="type"):
    """The WebSocket push: `{"type": "message", ...}` with the pending message's fields."""


def push_frame(mail: Mail) -> bytes:
    """The push frame's JSON (UTF-8), built once per message and shared by every recipient."""
    frame = mail.built_frame
    if frame is None:
        frame = mail.built_frame = _json.encode(mail.build(PushFrame))
    return frame


def error_frame(err: BrokerError, ref: Any = None) -> dict[str, Any]:
    """`{"type": "error", "ref": …, "error": {"code", "message"}}`: a failed op's answer."""
    return {"type": "error", "ref": ref, "error": {"code": err.code, "message": err.message}}


def encode(answer: Any) -> bytes:
    return _json.encode(answer)


# --- the node's connection ---


class NodeConnection:
    """One node's WebSocket, as the dispatcher sees it.

    While the socket keeps up (less than SAFE_BUFFER queued in the transport) and the connection
    did not negotiate compression, frames are not written one by one: every frame of a loop tick
    (pushes, answers) joins the connection's outgoing list, and one callback, scheduled by the
    tick's first frame, writes them all in ONE transport write (one system call for a push and
    the `ok` of an ack made durable by the same commit). They stay separate WebSocket frames.
    Anything written another way (a Ping, a Pong, a Close, the slow path below) first writes
    what is listed, so the peer sees the frames in the order they were sent; an aborted or
    closing transport drops them. What a connection can have queued is thus bounded by
    SAFE_BUFFER plus one tick's frames (at most the in-flight window and the pending answers).
    Otherwise frames go through aiohttp's frame writer (`FrameProtocol.send_frame`), which
    compresses and waits for the peer, under ``send_timeout``.

    Frames that fit in the kernel's buffers are written at once whether the peer reads them or
    not, so each write is also checked: half a ``send_timeout`` after it, the connection sends a
    Ping, which sits behind everything sent before it; a peer that has not answered with a Pong
    half a ``send_timeout`` later has not read what it was sent, and is cut. One probe at a time
    per connection, and only while it is being written to.

    Whether an idle peer is still there is checked by `Liveness`, one task for every
    connection, not a timer each (see there). Slotted, and idle it holds no list, set or timer
    of its own (issue 15: thousands of idle connections).
    """

    __slots__ = (
        "__weakref__",  # Takeover keys its announcements by connection
        "_awaiting_pong",
        "_out",
        "_out_bytes",
        "_probe",
        "_written",
        "closed",
        "node_id",
        "opened_at",
        "quiet",
        "send_timeout",
        "session",
        "transport",
        "ws",
    )

    def __init__(
        self,
        node_id: str,
        ws: FrameProtocol,
        send_timeout: float,
        transport: asyncio.Transport | None = None,
        session: str = "",
    ) -> None:
        self.node_id = node_id
        self.session = session  # the login it authenticated with: its revocation closes it
        self.ws = ws
        self.send_timeout = send_timeout
        self.transport = transport
        self.closed = False
        self.opened_at = time.time()  # shown by the console (connected since)
        self._probe: asyncio.TimerHandle | None = None  # the read check in progress, if any
        self._awaiting_pong = False
        self._written = False  # written to since the last Ping
        self._out: list[bytes] | tuple[()] = ()  # this tick's frames, written by flush
        self._out_bytes = 0
        self.quiet = 0  # liveness checks passed since the peer was last heard (Liveness)

    # --- the read check (see the class doc) ---

    def _watch(self) -> None:
        self._written = True
        if self._probe is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._probe = loop.call_later(self.send_timeout / 2, self._ping)

    def _ping(self) -> None:
        self._probe = None
        if self.closed or self.ws.closed:
            return
        self._written = False
        self._awaiting_pong = True
        self.send_ping()  # behind what is listed: the Ping checks them too
        self._probe = asyncio.get_running_loop().call_later(self.send_timeout / 2, self._judge)

    def _judge(self) -> None:
        self._probe = None
        if self.closed:
            return
        if self._awaiting_pong:
            log.info("slow_consumer_cut", node_id=self.node_id, timeout=self.send_timeout)
            self.abort()
        elif self._written:  # what was written since the Ping is checked by the next one
            self._ping()

    def pong(self) -> None:
        """The peer answered a Ping: it has read everything sent before it."""
        self._awaiting_pong = False

    def check_alive(self) -> None:
        """One liveness check (`Liveness`): a peer not heard since PING_AFTER checks gets a
        Ping; one still not heard at the next check is cut, as aiohttp's heartbeat did (no
        Close frame: a peer that does not answer would not read it)."""
        if self.closed:
            return
        self.quiet = quiet = self.quiet + 1
        if quiet < PING_AFTER:
            return
        if quiet == PING_AFTER:
            self.send_ping()
            return
        log.info("ws_peer_dead", node_id=self.node_id)
        self.abort()

    def send_ping(self) -> None:
        """A Ping behind what is listed; the Pong is seen by the socket (broker.ws.nodes)."""
        t = self.transport
        if t is not None and not t.is_closing():
            if self._out:
                self._write_out()
            t.write(PING)
        elif not self.ws.closed:
            task = asyncio.ensure_future(self.ws.ping())
            task.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _stop_watching(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    async def push(self, messages: Sequence[Mail]) -> bool:
        """Push queued messages (the dispatcher's send); False if the connection is gone."""
        return await self.send_many([push_frame(m) for m in messages])

    async def send_many(self, frames: Sequence[bytes]) -> bool:
        """Send text frames (UTF-8 JSON); a consumer that does not take them within the
        timeout is dropped. False if the connection is gone."""
        queued = self.queue(frames)
        if queued is not None:
            return queued
        self.flush()  # what is listed goes first
        try:
            async with asyncio.timeout(self.send_timeout):
                for frame in frames:
                    await self.ws.send_frame(frame, WSMsgType.TEXT)
            self._watch()
            return True
        except (TimeoutError, ConnectionError, RuntimeError):
            self.abort()
            return False

    def queue(self, frames: Sequence[bytes]) -> bool | None:
        """List frames for this tick's write (see the class doc): True if listed, False if the
        connection is gone, None if they must go the slow way (`send_many`)."""
        if self.closed or self.ws.closed:
            return False
        t = self.transport
        if (
            t is None
            or self.ws.compress
            or t.is_closing()
            or t.get_write_buffer_size() + self._out_bytes >= SAFE_BUFFER
        ):
            return None
        out = self._out
        if not out:
            out = self._out = []
            asyncio.get_running_loop().call_soon(self.flush)
        out.extend(frames)
        self._out_bytes += sum(map(len, frames))
        return True

    def flush(self) -> None:
        """Write the listed frames now, in one transport write."""
        if self._out and self._write_out():
            self._watch()

    def _write_out(self) -> bool:
        out = self._out
        self._out, self._out_bytes = (), 0
        t = self.transport
        if t is None or self.closed or self.ws.closed or t.is_closing():
            return False  # gone, or closed: nothing may follow its Close frame
        try:
            t.write(text_frames(out))
        except (ConnectionError, RuntimeError):
            self.abort()
            return False
        return True

    def abort(self) -> None:
        """Drop a consumer that does not read: a close frame would wait behind the data it
        does not take, so cut the connection at once."""
        self.closed = True
        self._stop_watching()
        self._out, self._out_bytes = (), 0
        if self.transport is not None:
            self.transport.abort()

    async def close(self, disconnect: Disconnect) -> None:
        """Close with the disconnect's code and reason (RFC 6455 §7.1.2: send a Close frame,
        let the peer answer with its own, then the TCP connection ends). aiohttp's
        `ws.close()` from another task than the one reading shuts the socket right after its
        Close frame, so the peer's answer met a reset and aiohttp clients reported 1006 instead
        of the code. Here the frame is written and the socket (broker.ws.protocol) finishes
        the handshake when the answer arrives; a peer that does not answer within
        `send_timeout` is cut."""
        if self.closed:
            return
        if self._out:  # what was sent before the close arrives before it
            self._write_out()
        self.closed = True
        self._stop_watching()
        code, reason = disconnect.code, disconnect.reason
        t = self.transport
        if t is None or t.is_closing():
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, message=reason.encode())
            return
        try:
            t.write(close_frame(code, reason))
        except (ConnectionError, RuntimeError):
            t.abort()
            return
        asyncio.get_running_loop().call_later(self.send_timeout, _cut, t)


class Liveness:
    """Whether idle peers are still there: one task checks every node connection each half
    `interval` (`NodeConnection.check_alive`). A connection not heard from (any frame) for
    PING_AFTER - 1 to PING_AFTER checks, about `interval` to 1.5 × `interval`, gets a Ping;
    one silent until the next check, half an `interval` later, is cut. That is aiohttp's
    WebSocket heartbeat (a Ping `interval` after the last frame received, the peer dropped
    without a Pong within half of it) without a timer handle, a bound callback and a
    rescheduling per received chunk on every connection (issue 15). The connections are
    checked in slices of SLICE, the loop free between them: pinging a silent fleet is a write
    each."""

    SLICE = 1000

    def __init__(self, connections: Mapping[str, object], interval: float) -> None:
        self.connections = connections  # the dispatcher's: node id -> current connection
        self.interval = interval

    def check(self, conns: Sequence[object] | None = None) -> None:
        """Check `conns` (by default every connection) once."""
        for conn in list(self.connections.values()) if conns is None else conns:
            if type(conn) is NodeConnection:
                conn.check_alive()

    async def run(self) -> None:
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval / 2)
            conns = list(self.connections.values())
            for start in range(0, len(conns), self.SLICE):
                self.check(conns[start : start + self.SLICE])
                await asyncio.sleep(0)
