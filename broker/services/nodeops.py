"""What a node does over its connection: heartbeats, status, telemetry, sends and acks.

The node WebSocket (`broker.ws.nodes`) parses frames and writes answers; the work is here. A
frame's sends and acks are recorded in ONE append (`record_batch`); the acks it carries make
room in the node's delivery window while their reads are recorded (`Dispatcher.acking`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from broker import errors
from broker.errors import BrokerError
from broker.principal import Principal
from broker.services.delivery import Connection, Dispatcher
from broker.services.messaging import Messaging, SendFields, SendResult
from broker.services.nodes import NodeService
from eventstore.base import ConcurrencyError, EventNotEncodable, StoreUnavailable
from eventstore.events import (
    BaseEvent,
    MessageRead,
    MessageSent,
    MessagesRead,
    NodeHeartbeat,
    NodeTelemetry,
)

log = structlog.get_logger(__name__)


class Send(SendFields, Protocol):
    idempotency_key: str | None


class Beat(Protocol):
    timestamp: Any
    status: str | None
    metrics: dict[str, Any] | None


def failure(exc: Exception) -> BrokerError:
    """A failed op's error from the catalog (an unexpected one is logged and INTERNAL)."""
    if isinstance(exc, BrokerError):
        return exc
    err = errors.from_store(exc)
    if err is None:
        log.error("ws_op_failed", exc_info=exc)
        return errors.internal()
    return err


class _Batch:
    """A frame's sends and acks on their way to one append."""

    __slots__ = (
        "alone",
        "batched",
        "claimed",
        "events",
        "read",
        "read_alone",
        "read_ids",
        "reading",
        "sent",
    )

    def __init__(self, sends: int, acks: int) -> None:
        self.sent: list[SendResult | BrokerError | None] = [None] * sends
        self.read: list[BrokerError | None] = [None] * acks
        self.events: list[BaseEvent] = []
        self.batched: list[tuple[int, MessageSent]] = []  # sends in the append
        self.claimed: set[str] = set()  # their message ids
        self.alone: list[int] = []  # sends settled on their own
        self.read_ids: dict[str, None] = {}  # the frame's acks, in order, once each
        self.reading: list[int] = []  # acks in the append
        self.read_alone: list[int] = []  # acks settled on their own


class NodeOps:
    def __init__(self, messaging: Messaging, nodes: NodeService, dispatcher: Dispatcher) -> None:
        self.messaging = messaging
        self.nodes = nodes
        self.dispatcher = dispatcher
        self.runtime = messaging.runtime

    # --- heartbeats, status, telemetry ---

    def heartbeats(self, node_id: str, beats: Sequence[Beat]) -> list[BaseEvent] | None:
        """The events of a frame of heartbeats (for the heartbeat batch); None for a node that
        is not registered (its ops then fail one by one)."""
        if node_id not in self.runtime.nodes.nodes:
            return None
        return [
            NodeHeartbeat(
                node_id=node_id, timestamp=b.timestamp, status=b.status, metrics=b.metrics or {}
            )
            for b in beats
        ]

    async def heartbeat(self, node_id: str, beat: Beat) -> None:
        await self.nodes.heartbeat(
            node_id, timestamp=beat.timestamp, status=beat.status, metrics=beat.metrics
        )

    async def status(self, node_id: str, **fields: Any) -> None:
        await self.nodes.update_status(node_id, by="node", **fields)

    async def telemetry(self, node_id: str, metrics: dict[str, Any], timestamp: Any) -> None:
        self.nodes.get(node_id)  # 404 for a node deregistered meanwhile
        await self.runtime.record(
            [NodeTelemetry(node_id=node_id, metrics=metrics, timestamp=timestamp)]
        )

    # --- sends and acks ---

    def ack_soon(
        self, principal: Principal, conn: Connection, message_id: str
    ) -> asyncio.Future[None] | None:
        """An ack on its own, for a caller that is no task: None when the message is read
        already (acks are idempotent), else a future done once the read is durable; NotFound
        at once for a message that is not the node's. The read goes with the next send
        (broker.services.readfold); the push leaves room in the window meanwhile."""
        if not self.messaging.unread(principal, message_id):
            return None
        done = self.dispatcher.make_room(conn, (message_id,))
        fut = self.messaging.reads.read(principal.id, message_id)
        fut.add_done_callback(lambda _: done())
        return fut

    async def ack(self, principal: Principal, conn: Connection, message_id: str) -> None:
        fut = self.ack_soon(principal, conn, message_id)
        if fut is not None:
            await fut

    async def record_batch(
        self,
        principal: Principal,
        conn: Connection,
        sends: Sequence[Send],
        acks: Sequence[str],
    ) -> tuple[list[SendResult | BrokerError], list[BrokerError | None]]:
        """A frame's sends and acks (message ids), validated and recorded in ONE append (their
        events are independent: each send claims its own new message id). Returns each send's
        result and each ack's outcome (None: read), in order; one that cannot go with the
        others (a racing retry elsewhere, an idempotency key twice in the frame, a value the
        log cannot store) is settled on its own."""
        batch = _Batch(len(sends), len(acks))
        self._prepare_sends(principal, sends, batch)
        self._prepare_acks(principal, acks, batch)
        if batch.events:
            await self._record(conn, batch)
        if batch.alone or batch.read_alone:
            await self._settle_alone(principal, conn, sends, acks, batch)
        return batch.sent, batch.read  # type: ignore[return-value]

    def _prepare_sends(self, principal: Principal, sends: Sequence[Send], batch: _Batch) -> None:
        prepare, claimed = self.messaging.prepare_send, batch.claimed
        for i, op in enumerate(sends):
            try:
                prepared = prepare(principal, op, op.idempotency_key)
            except BrokerError as exc:
                batch.sent[i] = exc
                continue
            if type(prepared) is not MessageSent:  # a retry: the earlier send's answer
                batch.sent[i] = prepared  # type: ignore[assignment]
            elif prepared.message_id not in claimed:
                claimed.add(prepared.message_id)
                batch.events.append(prepared)
                batch.batched.append((i, prepared))
            else:
                batch.alone.append(i)  # the same idempotency key twice in one frame

    def _prepare_acks(self, principal: Principal, acks: Sequence[str], batch: _Batch) -> None:
        unread, read_ids = self.messaging.unread, batch.read_ids
        for j, message_id in enumerate(acks):
            try:
                if unread(principal, message_id):
                    batch.reading.append(j)
                    read_ids[message_id] = None
            except BrokerError as exc:
                batch.read[j] = exc
        node_id = principal.id
        if len(read_ids) == 1:
            batch.events.append(
                MessageRead(message_id=next(iter(read_ids)), node_id=node_id, via="ws")
            )
        elif read_ids:  # one event for the frame's acks, not one per message
            batch.events.append(MessagesRead(node_id=node_id, message_ids=list(read_ids)))

    async def _record(self, conn: Connection, batch: _Batch) -> None:
        expected = {m: 0 for m in batch.claimed} or None
        try:
            with self.dispatcher.acking(conn, batch.read_ids):
                envs = await self.messaging.reads.append(batch.events, expected)
        except (ConcurrencyError, EventNotEncodable):  # settle each op on its own
            batch.alone.extend(i for i, _ in batch.batched)
            batch.read_alone = batch.reading
        except StoreUnavailable as exc:
            err = failure(exc)
            for i, _ in batch.batched:
                batch.sent[i] = err
            for j in batch.reading:
                batch.read[j] = err
        else:
            recorded = self.messaging.recorded
            for (i, event), env in zip(batch.batched, envs, strict=False):
                batch.sent[i] = recorded(event, env)

    async def _settle_alone(
        self,
        principal: Principal,
        conn: Connection,
        sends: Sequence[Send],
        acks: Sequence[str],
        batch: _Batch,
    ) -> None:
        alone, read_alone = batch.alone, batch.read_alone
        done = await asyncio.gather(
            *(self._send(principal, sends[i]) for i in alone),
            *(self._ack(principal, conn, acks[j]) for j in read_alone),
        )
        for i, result in zip(alone, done, strict=False):
            batch.sent[i] = result
        for j, outcome in zip(read_alone, done[len(alone) :], strict=True):
            batch.read[j] = outcome  # type: ignore[assignment]

    async def _send(self, principal: Principal, op: Send) -> SendResult | BrokerError:
        try:
            return await self.messaging.send(principal, op, op.idempotency_key)
        except Exception as exc:
            return failure(exc)

    async def _ack(
        self, principal: Principal, conn: Connection, message_id: str
    ) -> BrokerError | None:
        try:
            await self.ack(principal, conn, message_id)
        except Exception as exc:
            return failure(exc)
        return None
