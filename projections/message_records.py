"""The records of the messages projection (projections.messages): what a recipient sees of a
message, its payload shared by every recipient, its per-recipient state, its dead letters.

msgspec Structs with gc=False: a message-heavy projection holds millions of them, and the cyclic
collector's pauses grow with what it tracks. None of them can take part in a reference cycle
(they hold events, strings, numbers and each other, downwards only).
"""

from __future__ import annotations

from typing import Any

import msgspec

from eventstore.events import MessageSent
from eventstore.timestamps import iso
from projections.delivery import Priority

_PRIORITIES = {p.label: p for p in Priority}


def priority_of(name: str) -> Priority:
    # Validated before recording; a log from elsewhere still replays, as normal.
    return _PRIORITIES.get(name, Priority.NORMAL)


def label_of(name: str) -> str:
    """The priority's wire name (`priority_of(name).label`, without the enum)."""
    return name if name in _PRIORITIES else "normal"


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
            priority=label_of(e.priority),
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
