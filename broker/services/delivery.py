"""The dispatcher: pushes queued messages to connected nodes, in priority order, within a bounded
in-flight window per connection; redelivers on ack timeout and reconnect; records dead letters
and expiries as events. The queue itself (`projections.delivery`) is synchronous; this wraps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Protocol

import structlog

from broker import errors
from broker.config import DeliveryConfig
from broker.errors import Disconnect
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
from projections.messages import Mail

log = structlog.get_logger(__name__)

SLACK = 0.25  # seconds housekeeping may run after a deadline


def _nothing() -> None:
    pass


class Connection(Protocol):
    """A node's connection as the dispatcher sees it (the node WebSocket's is
    `broker.ws.wire.NodeConnection`): it pushes messages and closes, nothing more."""

    node_id: str
    session: str  # the login it authenticated with: its revocation closes it
    closed: bool
    opened_at: float

    async def push(self, messages: Sequence[Mail]) -> bool:
        """Send these messages to the node; False once the connection is gone."""
        ...

    async def close(self, disconnect: Disconnect) -> None: ...


class _Link:
    """What the dispatcher keeps of a node's current connection: the pump's wake-up and the
    ack credit of the delivery window (see Dispatcher.acking)."""

    __slots__ = ("acking", "conn", "wake")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.wake = asyncio.Event()
        # Pushes the node has acked whose reads are still being made durable: they no longer
        # count against its window.
        self.acking: set[str] = set()


class Dispatcher:
    def __init__(self, runtime: Runtime, messaging: Messaging, config: DeliveryConfig) -> None:
        self.runtime = runtime
        self.messaging = messaging
        self.config = config
        self.queue = runtime.messages.queue
        self.connections: dict[str, Connection] = {}  # node id -> its current connection
        self._links: dict[str, _Link] = {}  # node id -> the same connection's link
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
            await conn.close(errors.SHUTDOWN)
        await self.messaging.reads.drain()  # acks waiting for a send: recorded now

    # --- connections ---

    def connect(self, conn: Connection) -> Connection | None:
        """Make `conn` the node's connection; returns the one it replaces (to be closed).
        What the old one had in flight is ready again at once, for the new one."""
        node = conn.node_id
        old = self.connections.get(node)
        old_link = self._links.get(node)
        link = self._links[node] = _Link(conn)
        self.connections[node] = conn
        self.queue.release(node)
        link.wake.set()
        if old_link is not None:
            old_link.wake.set()  # its pump ends
        return old

    def disconnect(self, conn: Connection) -> None:
        conn.closed = True
        node = conn.node_id
        link = self._links.get(node)
        if link is not None and link.conn is conn:
            link.wake.set()
            del self._links[node]
            del self.connections[node]
            self.queue.release(node)

    async def pump(self, conn: Connection) -> None:
        """Push the node's messages while `conn` is its connection."""
        queue, node, window = self.queue, conn.node_id, self.config.window
        link = self._links.get(node)
        if link is None or link.conn is not conn:
            return
        links, wake, acking = self._links, link.wake, link.acking
        while not conn.closed and links.get(node) is link:
            await wake.wait()
            wake.clear()
            while not conn.closed and links.get(node) is link:
                room = window - queue.in_flight(node) + len(acking)
                if room <= 0:
                    break
                batch = queue.take(node, room)
                if not batch:
                    break
                self._schedule(time.time() + self.config.ack_timeout)
                if not await conn.push([d.message.payload for d in batch]):
                    return

    def credit(self, node_id: str) -> int:
        """How many of the node's pushes are acked and still being recorded as read."""
        link = self._links.get(node_id)
        return 0 if link is None else len(link.acking)

    @contextlib.contextmanager
    def acking(self, conn: Connection, message_ids: Collection[str]) -> Iterator[None]:
        """While the node's acks of these pushes are being recorded: they make room in its
        window at once, as RabbitMQ frees a prefetch slot on `basic.ack` (each ack's `ok` still
        waits until its read is durable; if recording fails, the room is taken back and the
        push stays in flight until acked again or redelivered). Only pushes in flight on the
        node count, each once: what the node has pushed and not acked stays within the window
        (a push that expires while its ack is recorded leaves room early, until the read ends)."""
        done = self.make_room(conn, message_ids)
        try:
            yield
        finally:
            done()

    def make_room(self, conn: Connection, message_ids: Collection[str]) -> Callable[[], None]:
        """`acking` for a caller that is no task: call what it returns once the reads are
        recorded (or failed)."""
        node = conn.node_id
        link = self._links.get(node)
        if link is None or link.conn is not conn:  # replaced or gone: its window is no more
            return _nothing
        acking, taken = link.acking, self.queue.taken
        before = len(acking)
        for m in message_ids:
            if taken(node, m):
                acking.add(m)
        if len(acking) != before:
            link.wake.set()

        def done() -> None:
            # Recorded (the listener below took them out as the queue acked them, before the
            # pump could count them twice) or failed: the room is the queue's again.
            if acking:
                acking.difference_update(message_ids)

        return done

    # --- log listener: wake whoever the new events concern ---

    def _on_append(self, envs: Sequence[Envelope]) -> None:
        links, conns = self._links, self.connections
        for env in envs:
            event = env.event
            kind = type(event)
            if kind is MessageSent:
                for node in event.to_nodes:  # type: ignore[attr-defined]
                    link = links.get(node)
                    if link is not None:
                        link.wake.set()
                self._schedule(env.ts + event.ttl)  # type: ignore[attr-defined]
            elif kind is MessagesRead or kind is MessageRead or kind is MessageRedriven:
                link = links.get(event.node_id)  # type: ignore[attr-defined]
                if link is not None:
                    if link.acking:  # read and out of the queue's flight now: no double room
                        if kind is MessagesRead:
                            link.acking.difference_update(event.message_ids)  # type: ignore[attr-defined]
                        elif kind is MessageRead:
                            link.acking.discard(event.message_id)  # type: ignore[attr-defined]
                    link.wake.set()
            elif kind is NodeDeregistered:
                conn = conns.get(event.node_id)  # type: ignore[attr-defined]
                if conn is not None:  # its tokens are void: so is its connection
                    self._close(conn, errors.DEREGISTERED)
            elif kind is TokenFamilyRevoked:
                family = self.runtime.tokens.families.get(event.family_id)  # type: ignore[attr-defined]
                if family is not None and family.subject_kind == "node":
                    conn = conns.get(family.subject_id)
                    if conn is not None and conn.session == family.family_id:
                        self._close(conn, errors.TOKEN_REVOKED)

    def _close(self, conn: Connection, disconnect: Disconnect) -> None:
        task = asyncio.create_task(conn.close(disconnect))
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
            link = self._links.get(d.node_id)
            if link is not None:
                link.wake.set()
        # Every delivery out of attempts and not yet dropped, so one whose dead letter could
        # not be recorded last time is recorded now (recording drops it from the queue).
        held = self.queue.held()
        if held:
            await self.messaging.record_dead(held)
        expired = self.queue.expired(self.config.expiry_batch)
        if expired:
            await self.messaging.record_expired(expired)
