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
    """What the dispatcher keeps of a node's current connection: its pump, if one runs, and the
    ack credit of the delivery window (see Dispatcher.acking).

    No task waits on an idle connection: a pump is started when the node may have mail (a send
    to it, an ack or a redelivery making room, the connection opening) and ends once nothing
    more can be pushed. A wake-up while it runs is remembered (`again`) and makes it look once
    more before ending. Per connection that is a few pointers, not a task, its coroutine and an
    Event (issue 15: the memory of an idle connection)."""

    __slots__ = ("acking", "again", "conn", "open", "pump")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.open = False  # pushes may go (the connection's welcome is sent)
        self.again = False  # woken while its pump runs: look once more
        self.pump: asyncio.Task[None] | None = None
        # Pushes the node has acked whose reads are still being made durable: they no longer
        # count against its window (None while there are none: most connections, most of the
        # time).
        self.acking: set[str] | None = None


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
        What the old one had in flight is ready again at once, for the new one, whose pushes
        begin at `open`. The old one's pump, if it runs, ends at its next look."""
        node = conn.node_id
        old = self.connections.get(node)
        self._links[node] = _Link(conn)
        self.connections[node] = conn
        self.queue.release(node)
        return old

    def open(self, conn: Connection) -> None:
        """The node has its welcome: push what is queued for it, and from now on whatever
        arrives (if `conn` is still its connection)."""
        link = self._links.get(conn.node_id)
        if link is not None and link.conn is conn:
            link.open = True
            self._wake(link)

    def disconnect(self, conn: Connection) -> None:
        conn.closed = True
        node = conn.node_id
        link = self._links.get(node)
        if link is not None and link.conn is conn:
            del self._links[node]
            del self.connections[node]
            self.queue.release(node)
            if link.pump is not None:
                link.pump.cancel()

    def _wake(self, link: _Link) -> None:
        """The node may have mail, or room for more: start its pump, or have the running one
        look again."""
        if not link.open:
            return
        if link.pump is None:
            link.pump = asyncio.get_running_loop().create_task(self._pump(link))
            link.pump.add_done_callback(_pump_ended)
        else:
            link.again = True

    async def _pump(self, link: _Link) -> None:
        """Push the node's messages while `link` is its current one and there is room and
        mail; then end (the next wake-up starts another)."""
        queue, window, conn = self.queue, self.config.window, link.conn
        node, links = conn.node_id, self._links
        try:
            while True:
                link.again = False
                while not conn.closed and links.get(node) is link:
                    room = window - queue.in_flight(node) + len(link.acking or ())
                    if room <= 0:
                        break
                    batch = queue.take(node, room)
                    if not batch:
                        break
                    self._schedule(time.time() + self.config.ack_timeout)
                    if not await conn.push([d.message.payload for d in batch]):
                        return
                if not link.again:
                    return
        finally:
            link.pump = None

    def pumping(self, node_id: str) -> bool:
        """Whether a pump runs for the node's connection (none while it is idle)."""
        link = self._links.get(node_id)
        return link is not None and link.pump is not None

    async def drained(self, conn: Connection) -> None:
        """Wait for `conn`'s pump, if one runs (tests, and a handler ending cleanly)."""
        link = self._links.get(conn.node_id)
        task = link.pump if link is not None and link.conn is conn else None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    def credit(self, node_id: str) -> int:
        """How many of the node's pushes are acked and still being recorded as read."""
        link = self._links.get(node_id)
        return 0 if link is None or link.acking is None else len(link.acking)

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
        taken = self.queue.taken
        mine = [m for m in message_ids if taken(node, m)]
        if not mine:
            return _nothing
        if link.acking is None:
            link.acking = set()
        acking = link.acking
        before = len(acking)
        acking.update(mine)
        if len(acking) != before:
            self._wake(link)

        def done() -> None:
            # Recorded (the listener below took them out as the queue acked them, before the
            # pump could count them twice) or failed: the room is the queue's again.
            if acking:
                acking.difference_update(message_ids)
            if not acking and link.acking is acking:
                link.acking = None

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
                        self._wake(link)
                self._schedule(env.ts + event.ttl)  # type: ignore[attr-defined]
            elif kind is MessagesRead or kind is MessageRead or kind is MessageRedriven:
                link = links.get(event.node_id)  # type: ignore[attr-defined]
                if link is not None:
                    acking = link.acking
                    if acking:  # read and out of the queue's flight now: no double room
                        if kind is MessagesRead:
                            acking.difference_update(event.message_ids)  # type: ignore[attr-defined]
                        elif kind is MessageRead:
                            acking.discard(event.message_id)  # type: ignore[attr-defined]
                    self._wake(link)
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
                self._wake(link)
        # Every delivery out of attempts and not yet dropped, so one whose dead letter could
        # not be recorded last time is recorded now (recording drops it from the queue).
        held = self.queue.held()
        if held:
            await self.messaging.record_dead(held)
        expired = self.queue.expired(self.config.expiry_batch)
        if expired:
            await self.messaging.record_expired(expired)


def _pump_ended(task: asyncio.Task[None]) -> None:
    """A pump's failure, logged with its traceback (nothing awaits a pump); the node's next
    wake-up (a send to it, an ack) starts another."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("delivery_pump_failed", exc_info=exc)
