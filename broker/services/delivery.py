"""The dispatcher: pushes queued messages to connected nodes, in priority order, within a bounded
in-flight window per connection; redelivers on ack timeout and reconnect; records dead letters
and expiries as events. The queue itself (`projections.delivery`) is synchronous; this wraps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
from collections.abc import Collection, Iterator, Sequence

import structlog
from aiohttp import WSMsgType, web

from broker.config import DeliveryConfig
from broker.runtime import Runtime
from broker.services.messaging import Messaging
from eventstore.base import Envelope
from eventstore.events import (
    MessageRead,
    MessageRedriven,
    MessageSent,
    MessagesRead,
    NodeDeregistered,
    TokenFamilyRevoked,
)

log = structlog.get_logger(__name__)

SLACK = 0.25  # seconds housekeeping may run after a deadline
SAFE_BUFFER = 256 * 1024  # bytes a socket may have queued before sends are timed
CLOSE_REPLACED = 4000  # a newer connection of the same node took over
CLOSE_DEREGISTERED = 4003  # the node was deregistered
CLOSE_TRY_AGAIN = 1013  # RFC 6455 registry: the server is at capacity, reconnect later
CLOSE_REVOKED = 4401  # the login of the connection's token was revoked (logout, reuse, superseded)


_LEN16 = struct.Struct("!BBH").pack
_LEN64 = struct.Struct("!BBQ").pack


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


PING = b"\x89\x00"  # an unmasked Ping frame with no payload (RFC 6455 §5.5.2)


def _cut(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.close()


class NodeConnection:
    """One node's WebSocket, as the dispatcher sees it.

    While the socket keeps up (less than SAFE_BUFFER queued in the transport) and the connection
    did not negotiate compression, a batch of frames goes out in ONE transport write with no
    await: no per-frame writer call or system call. What a connection can have queued is thus
    bounded by SAFE_BUFFER plus one batch (at most the in-flight window). Otherwise frames go
    through aiohttp's writer, which compresses and waits for the peer, under ``send_timeout``.

    Frames that fit in the kernel's buffers are written at once whether the peer reads them or
    not, so each write is also checked: half a ``send_timeout`` after it, the connection sends a
    Ping, which sits behind everything sent before it; a peer that has not answered with a Pong
    half a ``send_timeout`` later has not read what it was sent, and is cut. One probe at a time
    per connection, and only while it is being written to.
    """

    def __init__(
        self,
        node_id: str,
        ws: web.WebSocketResponse,
        send_timeout: float,
        transport: asyncio.Transport | None = None,
        session: str = "",
    ) -> None:
        self.node_id = node_id
        self.session = session  # the login it authenticated with: its revocation closes it
        self.ws = ws
        self.send_timeout = send_timeout
        self.transport = transport
        self.wake = asyncio.Event()
        self.closed = False
        self.opened_at = time.time()  # shown by the console (connected since)
        # Pushes the node has acked whose reads are still being made durable: they no longer
        # count against its window (see Dispatcher.acking).
        self.acking: set[str] = set()
        self._probe: asyncio.TimerHandle | None = None  # the read check in progress, if any
        self._awaiting_pong = False
        self._written = False  # written to since the last Ping

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
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(PING)
        else:
            task = asyncio.ensure_future(self.ws.ping())
            task.add_done_callback(lambda f: f.cancelled() or f.exception())
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

    def _stop_watching(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    async def send_many(self, frames: Sequence[bytes]) -> bool:
        """Send text frames (UTF-8 JSON); a consumer that does not take them within the
        timeout is dropped. False if the connection is gone."""
        t = self.transport
        if self.closed or self.ws.closed:
            return False
        if t is not None and not self.ws.compress and not t.is_closing():
            if t.get_write_buffer_size() < SAFE_BUFFER:  # the peer keeps up: write it all
                try:
                    t.write(text_frames(frames))
                except (ConnectionError, RuntimeError):
                    self.abort()
                    return False
                self._watch()
                return True
        try:
            async with asyncio.timeout(self.send_timeout):
                for frame in frames:
                    await self.ws.send_frame(frame, WSMsgType.TEXT)
            self._watch()
            return True
        except (TimeoutError, ConnectionError, RuntimeError):
            self.abort()
            return False

    def abort(self) -> None:
        """Drop a consumer that does not read: a close frame would wait behind the data it
        does not take, so cut the connection at once."""
        self.closed = True
        self.wake.set()
        self._stop_watching()
        if self.transport is not None:
            self.transport.abort()

    async def close(self, code: int, reason: str) -> None:
        """Close with `code` (RFC 6455 §7.1.2: send a Close frame, let the peer answer with its
        own, then the TCP connection ends). aiohttp's `ws.close()` from another task than
        the one reading shuts the socket right after its Close frame, so the peer's answer
        met a reset and aiohttp clients reported 1006 instead of the code. Here the frame is
        written and the reading handler finishes the handshake when the answer arrives; a
        peer that does not answer within `send_timeout` is cut."""
        if self.closed:
            return
        self.closed = True
        self.wake.set()
        self._stop_watching()
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


class Dispatcher:
    def __init__(self, runtime: Runtime, messaging: Messaging, config: DeliveryConfig) -> None:
        self.runtime = runtime
        self.messaging = messaging
        self.config = config
        self.queue = runtime.messages.queue
        self.connections: dict[str, NodeConnection] = {}
        self._tick = asyncio.Event()
        self._scheduled = math.inf  # when housekeeping wakes up next
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # closes in progress (kept referenced)

    async def start(self) -> None:
        self.runtime.react(self._on_append)
        self._task = asyncio.create_task(self._housekeeping(), name="delivery-housekeeping")

    async def stop(self) -> None:
        self.runtime.unreact(self._on_append)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in list(self.connections.values()):
            await conn.close(1001, "server shutting down")

    # --- connections ---

    def connect(self, conn: NodeConnection) -> NodeConnection | None:
        """Make `conn` the node's connection; returns the one it replaces (to be closed).
        What the old one had in flight is ready again at once, for the new one."""
        old = self.connections.get(conn.node_id)
        self.connections[conn.node_id] = conn
        self.queue.release(conn.node_id)
        conn.wake.set()
        return old

    def disconnect(self, conn: NodeConnection) -> None:
        conn.closed = True
        conn.wake.set()
        if self.connections.get(conn.node_id) is conn:
            del self.connections[conn.node_id]
            self.queue.release(conn.node_id)

    async def pump(self, conn: NodeConnection) -> None:
        """Push the node's messages while `conn` is its connection."""
        queue, node, window = self.queue, conn.node_id, self.config.window
        while not conn.closed:
            await conn.wake.wait()
            conn.wake.clear()
            while not conn.closed and self.connections.get(node) is conn:
                room = window - queue.in_flight(node) + len(conn.acking)
                if room <= 0:
                    break
                batch = queue.take(node, room)
                if not batch:
                    break
                self._schedule(time.time() + self.config.ack_timeout)
                if not await conn.send_many([d.message.payload.frame for d in batch]):
                    return

    @contextlib.contextmanager
    def acking(self, conn: NodeConnection, message_ids: Collection[str]) -> Iterator[None]:
        """While the node's acks of these pushes are being recorded: they make room in its
        window at once, as RabbitMQ frees a prefetch slot on `basic.ack` (each ack's `ok` still
        waits until its read is durable; if recording fails, the room is taken back and the
        push stays in flight until acked again or redelivered). Only pushes in flight on the
        node count, each once: what the node has pushed and not acked stays within the window
        (a push that expires while its ack is recorded leaves room early, until the read ends)."""
        acking, taken, node = conn.acking, self.queue.taken, conn.node_id
        before = len(acking)
        for m in message_ids:
            if taken(node, m):
                acking.add(m)
        if len(acking) != before:
            conn.wake.set()
        try:
            yield
        finally:  # recorded (the listener below took them out as the queue acked them,
            # before the pump could count them twice) or failed: the room is the queue's again
            if acking:
                acking.difference_update(message_ids)

    # --- log listener: wake whoever the new events concern ---

    def _on_append(self, envs: Sequence[Envelope]) -> None:
        conns = self.connections
        for env in envs:
            event = env.event
            kind = type(event)
            if kind is MessageSent:
                for node in event.to_nodes:  # type: ignore[attr-defined]
                    conn = conns.get(node)
                    if conn is not None:
                        conn.wake.set()
                self._schedule(env.ts + event.ttl)  # type: ignore[attr-defined]
            elif kind is MessagesRead or kind is MessageRead or kind is MessageRedriven:
                conn = conns.get(event.node_id)  # type: ignore[attr-defined]
                if conn is not None:
                    if conn.acking:  # read and out of the queue's flight now: no double room
                        if kind is MessagesRead:
                            conn.acking.difference_update(event.message_ids)  # type: ignore[attr-defined]
                        elif kind is MessageRead:
                            conn.acking.discard(event.message_id)  # type: ignore[attr-defined]
                    conn.wake.set()
            elif kind is NodeDeregistered:
                conn = conns.get(event.node_id)  # type: ignore[attr-defined]
                if conn is not None:  # its tokens are void: so is its connection
                    self._close(conn, CLOSE_DEREGISTERED, "deregistered")
            elif kind is TokenFamilyRevoked:
                family = self.runtime.tokens.families.get(event.family_id)  # type: ignore[attr-defined]
                if family is not None and family.subject_kind == "node":
                    conn = conns.get(family.subject_id)
                    if conn is not None and conn.session == family.family_id:
                        self._close(conn, CLOSE_REVOKED, "token revoked")

    def _close(self, conn: NodeConnection, code: int, reason: str) -> None:
        task = asyncio.create_task(conn.close(code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _schedule(self, when: float) -> None:
        # Housekeeping may run up to SLACK late: waking it for every new ack deadline would cost
        # a sweep per push when nodes ack one message at a time.
        if when < self._scheduled - SLACK:
            self._scheduled = when
            self._tick.set()

    # --- housekeeping: ack timeouts, dead letters, expiry ---

    async def _housekeeping(self) -> None:
        while True:
            deadline = self.queue.next_deadline()
            self._scheduled = math.inf if deadline is None else deadline
            delay = None if deadline is None else max(0.0, deadline - time.time()) + 0.001
            self._tick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._tick.wait()
            try:
                await self.sweep()
            except Exception:  # the log may be unavailable for a while: try again later
                log.exception("delivery_housekeeping_failed")
                await asyncio.sleep(1.0)

    async def sweep(self) -> None:
        """Redeliver timed-out pushes, record dead letters and expiries (one pass)."""
        redelivered, _exhausted = self.queue.timed_out()
        for d in redelivered:
            conn = self.connections.get(d.node_id)
            if conn is not None:
                conn.wake.set()
        # Every delivery out of attempts and not yet dropped, so one whose dead letter could
        # not be recorded last time is recorded now (recording drops it from the queue).
        held = self.queue.held()
        if held:
            await self.messaging.record_dead(held)
        expired = self.queue.expired(self.config.expiry_batch)
        if expired:
            await self.messaging.record_expired(expired)
