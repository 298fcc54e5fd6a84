"""Messages and mailboxes: the delivery queue rebuilt from the log, per-recipient message state,
dead letters and idempotency keys (DESIGN.md §5).

The durable state comes from events only. What a connection has in flight (takes, attempts,
ack deadlines) lives in the queue too but is volatile: it is driven by the dispatcher, starts
empty after a restart, and is not part of `state()`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from eventstore.base import Envelope
from eventstore.events import (
    MessageDeadLettered,
    MessageExpired,
    MessageRead,
    MessageRedriven,
    MessageSent,
    MessagesRead,
)
from eventstore.timestamps import iso
from projections.base import Projection, handles
from projections.delivery import DeliveryQueue, Priority, QueuedMessage

RETAIN_COMPLETED = 100_000  # finished messages kept for GET /messages/{id} and idempotency


_PRIORITIES = {p.label: p for p in Priority}


def _priority(name: str) -> Priority:
    # Validated before recording; a log from elsewhere still replays, as normal.
    return _PRIORITIES.get(name, Priority.NORMAL)


def _label(name: str) -> str:
    """The priority's wire name (`_priority(name).label`, without the enum)."""
    return name if name in _PRIORITIES else "normal"


# The records below are msgspec Structs with gc=False: a message-heavy projection holds
# millions of them, and the cyclic collector's pauses grow with what it tracks. None of them
# can take part in a reference cycle (they hold events, strings, numbers and each other,
# downwards only).


class PendingMessage(msgspec.Struct, kw_only=True, gc=False):
    """A message as a recipient sees it: in GET /messages/pending and pushed over WebSocket."""

    id: str
    from_node: str
    message_type: str
    content: Any
    priority: str
    metadata: dict[str, Any]
    sent_at: str
    expires_at: str
    seq: int


class Mail(msgspec.Struct, gc=False):
    """A queued message's payload, shared by every recipient: the event and its times. Its
    pending view is built on first use only; so is its push frame, by the front that pushes it
    (`broker.ws.wire.push_frame`), which keeps it in `built_frame` for every recipient (replay
    and polling-only fleets never pay for frames)."""

    event: MessageSent
    seq: int
    sent_at: float
    expires_at: float
    built_pending: PendingMessage | None = None
    built_frame: bytes | None = None

    @property
    def message_type(self) -> str:
        return self.event.message_type

    @property
    def pending(self) -> PendingMessage:
        if self.built_pending is None:
            self.built_pending = self.build(PendingMessage)
        return self.built_pending

    def build(self, kind: type[PendingMessage]) -> PendingMessage:
        """The message as `kind`: PendingMessage or a subclass of it (a wire frame's shape)."""
        e = self.event
        return kind(
            id=e.message_id,
            from_node=e.from_node,
            message_type=e.message_type,
            content=e.content,
            priority=_label(e.priority),
            metadata=e.metadata,
            sent_at=iso(self.sent_at),
            expires_at=iso(self.expires_at),
            seq=self.seq,
        )


class Recipient(msgspec.Struct, gc=False):
    status: str = "queued"  # queued | read | expired | dead
    at: float | None = None  # when it became read/expired/dead
    via: str | None = None
    attempts: int = 0  # recorded with a dead letter


class MessageRecord(msgspec.Struct, gc=False):
    message_id: str
    from_node: str
    message_type: str
    priority: str
    sent_at: float
    expires_at: float
    seq: int
    recipients: dict[str, Recipient]
    idempotency_key: str | None = None
    sent_by: str | None = None
    open: int = 0  # recipients still queued

    @property
    def done(self) -> bool:
        return self.open == 0


class DeadLetter(msgspec.Struct, gc=False):
    message_id: str
    node_id: str
    reason: str  # expired | max_attempts
    at: float
    attempts: int
    mail: Mail


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
    _completed: OrderedDict[str, None] = field(default_factory=OrderedDict)
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
            _label(e.priority),
            env.ts,
            expires_at,
            env.seq,
            recipients,
            e.idempotency_key,
            e.sent_by,
            open=len(recipients),
        )
        if e.idempotency_key is not None:
            self.idempotency[(e.from_node, e.idempotency_key)] = e.message_id
        self._mail[e.message_id] = mail
        self.queue.enqueue(
            QueuedMessage(e.message_id, env.seq, _priority(e.priority), expires_at, mail),
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
        record = self.messages.get(e.message_id)
        if dead is None or record is None:
            return
        rec = record.recipients[e.node_id]
        rec.status, rec.at, rec.attempts = "queued", None, 0
        record.open += 1
        self._completed.pop(e.message_id, None)
        expires_at = env.ts + e.ttl
        old = dead.mail
        mail = Mail(old.event, env.seq, old.sent_at, expires_at)
        self._mail[e.message_id] = mail
        priority = _priority(old.event.priority)
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
        if record.open == 0:
            self._retire(record)
        return True

    def _retire(self, record: MessageRecord) -> None:
        """A message nobody waits for any more: keep its record (bounded), free its payload
        unless a dead letter still holds it."""
        self._mail.pop(record.message_id, None)
        self._completed[record.message_id] = None
        while len(self._completed) > self.retain_completed:
            old_id, _ = self._completed.popitem(last=False)
            old = self.messages.pop(old_id, None)
            if old is not None and old.idempotency_key is not None:
                self.idempotency.pop((old.from_node, old.idempotency_key), None)

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

    # --- snapshots ---
    # Saved: the records, dead letters, idempotency keys, the order of completion, and every copy
    # still queued with the payload (`Mail`) it was queued with (a redriven copy has its own
    # seq and expiry). Loaded: the same objects, the queue rebuilt by enqueueing the copies in
    # seq order, as the log did; what was in flight is pending again, as after a replay.

    snapshot_version: ClassVar[int] = 1

    def snapshot(self) -> Any:
        mails: dict[tuple[str, int], Mail] = {}

        def saved(mail: Mail) -> tuple[str, int]:
            key = (mail.event.message_id, mail.seq)
            mails[key] = mail
            return key

        copies: dict[int, tuple[QueuedMessage, list[str]]] = {}
        for node, m in self.queue.queued():
            group = copies.get(id(m))
            if group is None:
                copies[id(m)] = (m, [node])
            else:
                group[1].append(node)
        queued = []
        for m, nodes in sorted(copies.values(), key=lambda g: g[0].seq):
            queued.append((*saved(m.payload), nodes))
        dead = [
            (mid, node, d.reason, d.at, d.attempts, saved(d.mail)[1])
            for (mid, node), d in self.dead_letters.items()
        ]
        mail = {mid: saved(m)[1] for mid, m in self._mail.items()}
        return _Saved(
            messages=self.messages,
            events={mid: m.event for (mid, _seq), m in mails.items()},
            mails=[(mid, seq, m.sent_at, m.expires_at) for (mid, seq), m in mails.items()],
            mail=mail,
            queued=queued,
            dead_letters=dead,
            idempotency=[(sender, key, mid) for (sender, key), mid in self.idempotency.items()],
            completed=list(self._completed),
        )

    def restore(self, raw: bytes) -> None:
        saved = _saved_decoder.decode(raw)
        events = saved.events
        mails = {
            (mid, seq): Mail(events[mid], seq, sent_at, expires_at)
            for mid, seq, sent_at, expires_at in saved.mails
        }
        self.messages = saved.messages
        self._mail = {mid: mails[(mid, seq)] for mid, seq in saved.mail.items()}
        self.dead_letters = {
            (mid, node): DeadLetter(mid, node, reason, at, attempts, mails[(mid, seq)])
            for mid, node, reason, at, attempts, seq in saved.dead_letters
        }
        self.idempotency = {(sender, key): mid for sender, key, mid in saved.idempotency}
        self._completed = OrderedDict.fromkeys(saved.completed)
        for mid, seq, nodes in saved.queued:
            mail = mails[(mid, seq)]
            priority = _priority(mail.event.priority)
            self.queue.enqueue(
                QueuedMessage(mid, seq, priority, mail.expires_at, mail), tuple(nodes)
            )


class _Saved(msgspec.Struct, kw_only=True):
    """What a snapshot saves of the messages projection (see `MessagesProjection.snapshot`)."""

    messages: dict[str, MessageRecord]
    events: dict[str, MessageSent]  # message id -> its send, for every payload saved
    mails: list[tuple[str, int, float, float]]  # (message id, seq, sent_at, expires_at)
    mail: dict[str, int]  # message id -> seq of its payload while queued
    queued: list[tuple[str, int, list[str]]]  # (message id, seq, nodes), in seq order
    # (message id, node, reason, at, attempts, seq of its payload)
    dead_letters: list[tuple[str, str, str, float, int, int]]
    idempotency: list[tuple[str, str, str]]  # (sender, key, message id)
    completed: list[str]


_saved_decoder = msgspec.msgpack.Decoder(_Saved)
