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
        log.error("node_op_failed", exc_info=exc)
        return errors.internal()
    return err


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

    async def ack(self, principal: Principal, conn: Connection, message_id: str) -> None:
        with self.dispatcher.acking(conn, (message_id,)):
            await self.messaging.read(principal, message_id, via="ws")

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
        messaging = self.messaging
        sent: list[SendResult | BrokerError | None] = [None] * len(sends)
        read: list[BrokerError | None] = [None] * len(acks)
        events: list[BaseEvent] = []
        batched: list[tuple[int, MessageSent]] = []
        claimed: set[str] = set()
        alone: list[int] = []  # sends settled on their own
        for i, op in enumerate(sends):
            try:
                prepared = messaging.prepare_send(principal, op, op.idempotency_key)
            except BrokerError as exc:
                sent[i] = exc
                continue
            if type(prepared) is not MessageSent:  # a retry: the earlier send's answer
                sent[i] = prepared  # type: ignore[assignment]
            elif prepared.message_id not in claimed:
                claimed.add(prepared.message_id)
                events.append(prepared)
                batched.append((i, prepared))
            else:
                alone.append(i)  # the same idempotency key twice in one frame
        read_ids: dict[str, None] = {}  # the frame's acks, in order, once each
        reading: list[int] = []
        for j, message_id in enumerate(acks):
            try:
                if messaging.unread(principal, message_id):
                    reading.append(j)
                    read_ids[message_id] = None
            except BrokerError as exc:
                read[j] = exc
        node_id = principal.id
        if len(read_ids) == 1:
            events.append(MessageRead(message_id=next(iter(read_ids)), node_id=node_id, via="ws"))
        elif read_ids:  # one event for the frame's acks, not one per message
            events.append(MessagesRead(node_id=node_id, message_ids=list(read_ids)))
        read_alone: list[int] = []
        if events:
            try:
                with self.dispatcher.acking(conn, read_ids):
                    envs = await self.runtime.record(events, {m: 0 for m in claimed} or None)
            except (ConcurrencyError, EventNotEncodable):  # settle each op on its own
                alone.extend(i for i, _ in batched)
                read_alone = reading
            except StoreUnavailable as exc:
                err = failure(exc)
                for i, _ in batched:
                    sent[i] = err
                for j in reading:
                    read[j] = err
            else:
                for (i, event), env in zip(batched, envs, strict=False):
                    sent[i] = messaging.recorded(event, env)
        if alone or read_alone:
            done = await asyncio.gather(
                *(self._send(principal, sends[i]) for i in alone),
                *(self._ack(principal, conn, acks[j]) for j in read_alone),
            )
            for i, result in zip(alone, done, strict=False):
                sent[i] = result
            for j, outcome in zip(read_alone, done[len(alone) :], strict=True):
                read[j] = outcome  # type: ignore[assignment]
        return sent, read  # type: ignore[return-value]

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
