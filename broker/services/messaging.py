"""Messaging commands: send, read, pending, message state, dead letters and redrive, expiry.

Shared by the HTTP routes (`broker.http.messages`) and the node WebSocket (`broker.ws.nodes`):
a WebSocket `ack` is the same read as `PUT /api/v1/messages/{id}/read`.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

import msgspec

from broker.config import DeliveryConfig
from broker.errors import Conflict, Forbidden, NotFound, ValidationFailed
from broker.ids import random_hex6
from broker.principal import Principal
from broker.runtime import Runtime
from broker.services.readfold import ReadFold
from eventstore.base import ConcurrencyError, Envelope
from eventstore.events import (
    BaseEvent,
    MessageDeadLettered,
    MessageExpired,
    MessageRead,
    MessageRedriven,
    MessageSent,
)
from eventstore.timestamps import iso
from projections.delivery import Delivery, QueuedMessage
from projections.messages import MessageRecord, PendingMessage

BROKER_SENDER = "broker"
_json = msgspec.json.Encoder()

PriorityName = Literal["critical", "high", "normal", "low"]
# The fields of a send, shared by the HTTP body and the WebSocket op so both validate alike.
# A tuple, not a list: it lives in the event until the message is read, and a tuple of strings
# is dropped from the garbage collector's tracking at its first pass (lists of one recipient were
# most of what its young-generation passes walked, and kept, under load).
Recipients = Annotated[
    tuple[Annotated[str, msgspec.Meta(min_length=1, max_length=128)], ...],
    msgspec.Meta(min_length=1),
]
MessageType = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Ttl = Annotated[float, msgspec.Meta(gt=0)]


class SendRequest(msgspec.Struct, kw_only=True):
    """The seed's send body; unknown fields are ignored."""

    to_nodes: Recipients
    message_type: MessageType
    content: Any = None
    from_node: str | None = None
    priority: PriorityName = "normal"
    ttl: Ttl | None = None
    metadata: dict[str, Any] | None = None


class SendFields(Protocol):
    """What a send carries: the HTTP body (SendRequest) and the WebSocket op alike."""

    to_nodes: tuple[str, ...]
    message_type: str
    content: Any
    from_node: str | None
    priority: PriorityName
    ttl: float | None
    metadata: dict[str, Any] | None


class SendResult(msgspec.Struct, kw_only=True, gc=False):
    message_id: str
    status: str
    recipients: int
    expires_at: str


class RecipientView(msgspec.Struct, kw_only=True):
    node_id: str
    status: str  # queued | delivered | read | expired | dead
    attempts: int
    at: str | None = None


class MessageView(msgspec.Struct, kw_only=True):
    id: str
    from_node: str
    message_type: str
    priority: str
    sent_at: str
    expires_at: str
    recipients: list[RecipientView]


class DeadLetterView(msgspec.Struct, kw_only=True):
    message_id: str
    node_id: str
    reason: str
    at: str
    attempts: int
    message: PendingMessage


_prefix: list[Any] = [-1, ""]  # the last millisecond and its id prefix


def message_id_for(sender: str, key: str | None) -> str:
    """A fresh id, or with an idempotency key an id derived from (sender, key): two racing
    retries then target one stream with expected version 0 and the log lets one win.

    A fresh id is 48 bits of milliseconds then 48 random bits: ids of messages sent together
    sort together, so the log's stream index (one entry per message) grows at its end instead
    of rewriting pages all over the file on every commit."""
    if key is None:
        ms = int(time.time() * 1000) & 0xFFFFFFFFFFFF
        if ms != _prefix[0]:  # formatted once per millisecond, not per message
            _prefix[0], _prefix[1] = ms, f"msg_{ms:012x}"
        return _prefix[1] + random_hex6()
    digest = hashlib.blake2b(f"{sender}\0{key}".encode(), digest_size=12).hexdigest()
    return "msg_" + digest


class Messaging:
    def __init__(self, runtime: Runtime, config: DeliveryConfig) -> None:
        self.runtime = runtime
        self.config = config
        # WebSocket acks of single pushes, recorded with the next send (broker.services.readfold)
        self.reads = ReadFold(runtime)

    # --- send ---

    def prepare_send(
        self, principal: Principal, req: SendFields, idempotency_key: str | None = None
    ) -> MessageSent | SendResult:
        """Validate a send and build its event, or return the earlier result of a retry."""
        cfg = self.config
        if principal.is_node:
            if req.from_node is not None and req.from_node != principal.id:
                raise Forbidden("a node may only send as itself")
            sender = principal.id
        elif principal.can("messages:send"):
            sender = BROKER_SENDER
        else:
            raise Forbidden("missing permission messages:send")
        metadata = req.metadata or {}
        key = idempotency_key or metadata.get("idempotency_key")
        if key is not None and not isinstance(key, str):
            raise ValidationFailed("metadata.idempotency_key must be a string")
        if key is not None:
            earlier = self.runtime.messages.by_idempotency_key(sender, key)
            if earlier is not None:
                return self.result(earlier)
        to_nodes = req.to_nodes
        if len(to_nodes) > 1:
            to_nodes = tuple(dict.fromkeys(to_nodes))
        if len(to_nodes) > cfg.max_recipients:
            raise ValidationFailed(
                f"to_nodes: at most {cfg.max_recipients} recipients",
                details=[{"field": "to_nodes"}],
            )
        known = self.runtime.nodes.nodes
        if len(to_nodes) == 1:
            unknown = [] if to_nodes[0] in known else list(to_nodes)
        else:
            unknown = [n for n in to_nodes if n not in known]
        if unknown:
            raise NotFound(
                f"Node not found: {', '.join(unknown[:20])}",
                details=[{"field": "to_nodes", "unknown": unknown}],
            )
        ttl = cfg.default_ttl if req.ttl is None else req.ttl
        if ttl > cfg.max_ttl:
            raise ValidationFailed(
                f"ttl: at most {cfg.max_ttl:g} seconds", details=[{"field": "ttl"}]
            )
        if len(_json.encode(req.content)) > cfg.max_content_bytes:
            raise ValidationFailed(
                f"content: larger than {cfg.max_content_bytes} bytes of JSON",
                details=[{"field": "content"}],
            )
        return MessageSent(
            message_id=message_id_for(sender, key),
            from_node=sender,
            to_nodes=to_nodes,
            message_type=req.message_type,
            content=req.content,
            priority=req.priority,
            ttl=ttl,
            metadata=metadata,
            idempotency_key=key,
            sent_by=None if principal.is_node else principal.id,
        )

    async def send(
        self, principal: Principal, req: SendFields, idempotency_key: str | None = None
    ) -> SendResult:
        prepared = self.prepare_send(principal, req, idempotency_key)
        if isinstance(prepared, SendResult):
            return prepared
        return await self.record_send(prepared)

    async def record_send(self, event: MessageSent) -> SendResult:
        try:
            (env,) = await self.reads.append([event], 0)
        except ConcurrencyError:
            earlier = (
                self.runtime.messages.by_idempotency_key(event.from_node, event.idempotency_key)
                if event.idempotency_key is not None
                else None
            )
            if earlier is None:
                raise Conflict("idempotency key already used for another message") from None
            return self.result(earlier)
        return self.recorded(event, env)

    def recorded(self, event: MessageSent, env: Envelope) -> SendResult:
        """The answer to a send once `env` recorded its `event` (the record may be retired)."""
        return SendResult(
            message_id=event.message_id,
            status="queued",
            recipients=len(event.to_nodes),
            expires_at=iso(env.ts + event.ttl),
        )

    @staticmethod
    def result(record: MessageRecord) -> SendResult:
        return SendResult(
            message_id=record.message_id,
            status="queued",
            recipients=len(record.recipients),
            expires_at=iso(record.expires_at),
        )

    # --- read ---

    def prepare_read(self, principal: Principal, message_id: str) -> MessageRead | None:
        """The read event to record, or None when already read (reads are idempotent)."""
        if not self.unread(principal, message_id):
            return None
        return MessageRead(message_id=message_id, node_id=principal.id)

    def unread(self, principal: Principal, message_id: str) -> bool:
        """Whether the node has a read of the message to record (False: read already);
        NotFound if it is not the node's to read."""
        record = self.runtime.messages.messages.get(message_id)
        rec = record.recipients.get(principal.id) if record is not None else None
        if rec is None or not principal.is_node:
            raise NotFound(f"Message not found: {message_id}")
        status = rec.status
        if status == "queued":
            return True
        if status == "read":
            return False
        raise NotFound(f"Message {message_id} is {status} for {principal.id}")

    async def read(self, principal: Principal, message_id: str, via: str = "http") -> None:
        event = self.prepare_read(principal, message_id)
        if event is not None:
            if via != event.via:
                event = msgspec.structs.replace(event, via=via)
            await self.runtime.record([event])

    # --- queries ---

    def pending(
        self, principal: Principal, node_id: str, limit: int | None, message_type: str | None
    ) -> tuple[list[PendingMessage], int]:
        """The node's pending messages in delivery order, the first `limit` of them, and how
        many there are in all (with the same `message_type` filter)."""
        if principal.is_node and principal.id != node_id:
            raise Forbidden("a node may only read its own mailbox")
        if not principal.is_node and not principal.can("messages:read_any"):
            raise Forbidden("missing permission messages:read_any")
        if self.runtime.nodes.get(node_id) is None:
            raise NotFound(f"Node not found: {node_id}")
        every = self.runtime.messages.pending(node_id, None, message_type)
        return (every if limit is None else every[:limit]), len(every)

    def view(self, principal: Principal, message_id: str) -> MessageView:
        record = self.runtime.messages.get(message_id)
        allowed = record is not None and (
            principal.can("messages:read_any")
            or (
                principal.is_node
                and (principal.id == record.from_node or principal.id in record.recipients)
            )
        )
        if record is None or not allowed:
            raise NotFound(f"Message not found: {message_id}")
        queue = self.runtime.messages.queue
        recipients = []
        for node, rec in record.recipients.items():
            status, attempts = rec.status, rec.attempts
            if status == "queued":
                delivery = queue.delivery(node, message_id)
                if delivery is not None:
                    status, attempts = "delivered", delivery.attempt
            at = iso(rec.at) if rec.at is not None else None
            recipients.append(RecipientView(node_id=node, status=status, attempts=attempts, at=at))
        return MessageView(
            id=record.message_id,
            from_node=record.from_node,
            message_type=record.message_type,
            priority=record.priority,
            sent_at=iso(record.sent_at),
            expires_at=iso(record.expires_at),
            recipients=recipients,
        )

    def dead_letters(self) -> list[DeadLetterView]:
        return [
            DeadLetterView(
                message_id=d.message_id,
                node_id=d.node_id,
                reason=d.reason,
                at=iso(d.at),
                attempts=d.attempts,
                message=d.mail.pending,
            )
            for d in self.runtime.messages.dead_letters.values()
        ]

    async def redrive(
        self, principal: Principal, message_id: str, node_id: str, ttl: float | None
    ) -> None:
        if (message_id, node_id) not in self.runtime.messages.dead_letters:
            raise NotFound(f"No dead letter for message {message_id} and node {node_id}")
        ttl = self.config.default_ttl if ttl is None else ttl
        if not 0 < ttl <= self.config.max_ttl:
            raise ValidationFailed(f"ttl: 0 < ttl <= {self.config.max_ttl:g}")
        await self.runtime.record(
            [MessageRedriven(message_id=message_id, node_id=node_id, ttl=ttl, by=principal.id)]
        )

    # --- housekeeping (called by the dispatcher) ---

    async def record_expired(self, expired: Sequence[tuple[str, QueuedMessage]]) -> None:
        by_message: dict[str, list[str]] = defaultdict(list)
        for node, message in expired:
            by_message[message.message_id].append(node)
        events: list[BaseEvent] = [
            MessageExpired(message_id=mid, node_ids=nodes) for mid, nodes in by_message.items()
        ]
        if events:
            await self.runtime.record(events)

    async def record_dead(self, exhausted: Sequence[Delivery]) -> None:
        events: list[BaseEvent] = [
            MessageDeadLettered(
                message_id=d.message.message_id, node_id=d.node_id, attempts=d.attempt
            )
            for d in exhausted
        ]
        if events:
            await self.runtime.record(events)
