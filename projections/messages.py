"""Messages and mailboxes: the delivery queue rebuilt from the log, per-recipient message state,
dead letters and idempotency keys (DESIGN.md §5).

The durable state comes from events only. What a connection has in flight (takes, attempts,
ack deadlines) lives in the queue too but is volatile: it is driven by the dispatcher, starts
empty after a restart, and is not part of `state()`. The records are in
projections.message_records; how snapshots save them, in slices, in projections.message_slices.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from eventstore.base import Envelope
from eventstore.events import (
    MessageDeadLettered,
    MessageExpired,
    MessageRead,
    MessageRedriven,
    MessageSent,
    MessagesRead,
)
from projections import message_slices
from projections.base import Projection, handles
from projections.delivery import DeliveryQueue, QueuedMessage
from projections.message_records import (
    DeadLetter,
    Mail,
    MessageRecord,
    PendingMessage,
    Recipient,
    label_of,
    priority_of,
)
from projections.message_slices import Cut, dead_key

__all__ = ["Mail", "MessageRecord", "MessagesProjection", "PendingMessage"]

RETAIN_COMPLETED = 100_000  # finished messages kept for GET /messages/{id} and idempotency


@dataclass
class MessagesProjection(Projection):
    name = "messages"
    now: Callable[[], float] = time.time
    ack_timeout: float = 30.0
    max_attempts: int = 10
    retain_completed: int = RETAIN_COMPLETED
    messages: dict[str, MessageRecord] = field(default_factory=dict)
    dead_letters: dict[tuple[str, str], DeadLetter] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], str] = field(default_factory=dict)
    # completed messages, oldest first, each with its rank in the order of completion
    _completed: OrderedDict[str, int] = field(default_factory=OrderedDict)
    _ranked: int = 0  # completions ranked so far
    _mail: dict[str, Mail] = field(default_factory=dict)  # queued messages' payloads

    def __post_init__(self) -> None:
        self.queue = DeliveryQueue(
            self.now, ack_timeout=self.ack_timeout, max_attempts=self.max_attempts
        )

    # --- apply ---

    @handles(MessageSent)
    def _sent(self, env: Envelope) -> None:
        e: MessageSent = env.event  # type: ignore[assignment]
        expires_at = env.ts + e.ttl
        mail = Mail(e, env.seq, env.ts, expires_at)
        recipients = {node: Recipient() for node in e.to_nodes}
        self.messages[e.message_id] = MessageRecord(
            e.message_id,
            e.from_node,
            e.message_type,
            label_of(e.priority),
            env.ts,
            expires_at,
            env.seq,
            recipients,
            e.idempotency_key,
            e.sent_by,
            open=len(recipients),
        )
        if e.idempotency_key is not None:
            key = (e.from_node, e.idempotency_key)
            prior = self.idempotency.get(key)
            if prior is not None:  # the key leads to this message from now on
                self.mark_dirty(prior)
            self.idempotency[key] = e.message_id
        self._mail[e.message_id] = mail
        self.mark_dirty(e.message_id)
        self.queue.enqueue(
            QueuedMessage(e.message_id, env.seq, priority_of(e.priority), expires_at, mail),
            tuple(recipients),
        )

    @handles(MessageRead)
    def _read(self, env: Envelope) -> None:
        e: MessageRead = env.event  # type: ignore[assignment]
        if self._close(e.message_id, e.node_id, "read", env.ts, via=e.via):
            self.queue.ack(e.node_id, e.message_id)

    @handles(MessagesRead)
    def _read_batch(self, env: Envelope) -> None:
        # One queue call for the frame's acks: every WebSocket ack comes here.
        e: MessagesRead = env.event  # type: ignore[assignment]
        node, ts, via, close = e.node_id, env.ts, e.via, self._close
        closed = [m for m in e.message_ids if close(m, node, "read", ts, via=via)]
        if closed:
            self.queue.ack_many(node, closed)

    @handles(MessageExpired)
    def _expired(self, env: Envelope) -> None:
        e: MessageExpired = env.event  # type: ignore[assignment]
        for node in e.node_ids:
            self._dead(e.message_id, node, "expired", env.ts, 0)

    @handles(MessageDeadLettered)
    def _dead_lettered(self, env: Envelope) -> None:
        e: MessageDeadLettered = env.event  # type: ignore[assignment]
        self._dead(e.message_id, e.node_id, e.reason, env.ts, e.attempts)

    @handles(MessageRedriven)
    def _redriven(self, env: Envelope) -> None:
        e: MessageRedriven = env.event  # type: ignore[assignment]
        dead = self.dead_letters.pop((e.message_id, e.node_id), None)
        if dead is None:
            return
        self.mark_dirty(dead_key(e.message_id, e.node_id))
        record = self.messages.get(e.message_id)
        if record is None:
            return
        self.mark_dirty(e.message_id)
        rec = record.recipients[e.node_id]
        rec.status, rec.at, rec.attempts = "queued", None, 0
        record.open += 1
        self._completed.pop(e.message_id, None)
        expires_at = env.ts + e.ttl
        old = dead.mail
        mail = Mail(old.event, env.seq, old.sent_at, expires_at)
        self._mail[e.message_id] = mail
        priority = priority_of(old.event.priority)
        self.queue.enqueue(
            QueuedMessage(e.message_id, env.seq, priority, expires_at, mail), (e.node_id,)
        )

    def _dead(self, message_id: str, node: str, reason: str, ts: float, attempts: int) -> None:
        mail = self._mail.get(message_id)  # before _close: closing the last copy frees it
        if self._close(message_id, node, "dead" if reason != "expired" else "expired", ts):
            self.queue.drop(node, message_id)
            if mail is not None:
                self.dead_letters[(message_id, node)] = DeadLetter(
                    message_id, node, reason, ts, attempts, mail
                )
                self.mark_dirty(dead_key(message_id, node))
            rec = self.messages[message_id].recipients[node]
            rec.attempts = attempts

    def _close(
        self, message_id: str, node: str, status: str, ts: float, via: str | None = None
    ) -> bool:
        """Move `node`'s copy out of `queued`; False if it was not queued (idempotent)."""
        record = self.messages.get(message_id)
        if record is None:
            return False
        rec = record.recipients.get(node)
        if rec is None or rec.status != "queued":
            return False
        rec.status, rec.at, rec.via = status, ts, via
        record.open -= 1
        self.mark_dirty(message_id)
        if record.open == 0:
            self._retire(record)
        return True

    def _retire(self, record: MessageRecord) -> None:
        """A message nobody waits for any more: keep its record (bounded), free its payload
        unless a dead letter still holds it."""
        self._mail.pop(record.message_id, None)
        self._ranked += 1
        self._completed[record.message_id] = self._ranked
        while len(self._completed) > self.retain_completed:
            old_id, _ = self._completed.popitem(last=False)
            old = self.messages.pop(old_id, None)
            self.mark_dirty(old_id)
            if old is not None and old.idempotency_key is not None:
                holder = self.idempotency.pop((old.from_node, old.idempotency_key), None)
                if holder is not None:
                    self.mark_dirty(holder)

    # --- queries ---

    def get(self, message_id: str) -> MessageRecord | None:
        return self.messages.get(message_id)

    def by_idempotency_key(self, sender: str, key: str) -> MessageRecord | None:
        mid = self.idempotency.get((sender, key))
        return self.messages.get(mid) if mid else None

    def pending(
        self, node_id: str, limit: int | None = None, message_type: str | None = None
    ) -> list[PendingMessage]:
        pred = None
        if message_type is not None:

            def pred(m: QueuedMessage) -> bool:
                return bool(m.payload.message_type == message_type)

        return [m.payload.pending for m in self.queue.pending(node_id, limit, pred)]

    def state(self) -> object:
        return {
            "messages": self.messages,
            "dead_letters": {k: (v.reason, v.at, v.attempts) for k, v in self.dead_letters.items()},
            "idempotency": self.idempotency,
            "completed": list(self._completed),
            "queued": sorted(
                (node, m.message_id, m.seq, m.expires_at) for node, m in self.queue.queued()
            ),
        }

    # --- snapshots (projections.message_slices) ---

    snapshot_version: ClassVar[int] = 2  # 1: saved whole in the cut (replayed once from the log)
    record_type: ClassVar[Any] = message_slices.Saved

    def records(self) -> Mapping[str, Any]:
        return message_slices.Records(self)

    def snapshot(self) -> Any:
        return Cut(self._ranked)

    def restore_sliced(self, records: dict[str, Any], raw: bytes) -> None:
        message_slices.restore(self, records, raw)
