"""How the messages projection (projections.messages) is saved in a snapshot: in slices.

A record per message and one per dead letter, each built when its slice is encoded
(broker.upkeep.snapshot_write) while events keep being applied; the handlers mark the key of
everything they change (`Projection.mark_dirty`), so a record changed after its slice was saved
is saved again. The cut, the one step of the loop that stops applying, saves one number: how
many completions were ranked (a completed message's record holds its rank, which gives the order
in which completed messages are let go). Before, the cut encoded the whole
projection: every record, and every queued copy grouped with its payload, ~0.5 s of the loop
with 47,000 messages pending (docs/performance.md).

A message's record holds what the projection keeps of it: its `MessageRecord`, the payloads it
is queued with (one event, and the seq and times of each `Mail`: a redriven copy has its own),
its copies still queued (by payload seq, with their nodes), whether it holds its idempotency
key, and its rank among the completed. A dead letter's record holds its payload whole (it may
outlive the message's record). At load, payloads of one (message, seq) are one `Mail` again,
dead letters come back in the order they died, completed messages in the order of their ranks,
and the copies are enqueued in seq order, as the log did.

Keys: a message's id (listing them costs a copy of the dict's keys, in C), and for a dead letter
`\0<len(node)>:<node><message id>`. A key is looked up as a message's id first: only a message
id equal to a dead letter's key could hide that dead letter from a snapshot, and the server's
ids (`msg_…`, or a hex digest) never begin with NUL.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import msgspec

from eventstore.events import MessageSent
from projections.delivery import QueuedMessage
from projections.message_records import DeadLetter, Mail, MessageRecord, priority_of

if TYPE_CHECKING:
    from projections.messages import MessagesProjection


class SavedMessage(msgspec.Struct, array_like=True, tag="m", gc=False):
    record: MessageRecord
    event: MessageSent | None  # its payloads' event, while any is kept
    mails: list[tuple[int, float, float]]  # per payload: (seq, sent_at, expires_at)
    mail: int  # seq of its current payload (the projection's `_mail`), 0 if none
    queued: list[tuple[int, list[str]]]  # per copy still queued: (payload seq, nodes)
    keyed: bool  # the idempotency key (from_node, key) leads to this message
    done: int  # its rank in the order of completion, 0 while not completed


class SavedDeadLetter(msgspec.Struct, array_like=True, tag="d", gc=False):
    message_id: str
    node_id: str
    reason: str
    at: float
    attempts: int
    event: MessageSent
    seq: int  # its payload's seq and times
    sent_at: float
    expires_at: float


Saved = SavedMessage | SavedDeadLetter


class Cut(msgspec.Struct):
    """What the cut saves: how many completions were ranked (the next one ranks above)."""

    ranked: int


cut_decoder = msgspec.msgpack.Decoder(Cut)


def dead_key(message_id: str, node_id: str) -> str:
    return f"\0{len(node_id)}:{node_id}{message_id}"


def _dead_ids(key: str) -> tuple[str, str]:
    """(message id, node id) of a dead letter's key."""
    colon = key.index(":")
    end = colon + 1 + int(key[1:colon])
    return key[end:], key[colon + 1 : end]


class Records(Mapping[str, Saved]):
    """The projection's records as a snapshot saves them, each built when asked for."""

    def __init__(self, projection: MessagesProjection) -> None:
        self._p = projection

    def __iter__(self) -> Iterator[str]:
        dead = itertools.starmap(dead_key, self._p.dead_letters)
        return itertools.chain(self._p.messages, dead)

    def __len__(self) -> int:
        return len(self._p.messages) + len(self._p.dead_letters)

    def __getitem__(self, key: str) -> Saved:
        p = self._p
        record = p.messages.get(key)
        if record is not None:
            return _saved_message(p, record)
        if key[:1] != "\0":
            raise KeyError(key)
        try:
            ids = _dead_ids(key)
        except ValueError:
            raise KeyError(key) from None
        d = p.dead_letters[ids]
        m = d.mail
        return SavedDeadLetter(
            d.message_id, d.node_id, d.reason, d.at, d.attempts, m.event, m.seq, m.sent_at,
            m.expires_at,
        )  # fmt: skip


def _saved_message(p: MessagesProjection, record: MessageRecord) -> SavedMessage:
    mid = record.message_id
    payloads: dict[int, Mail] = {}
    queued: dict[int, list[str]] = {}
    if record.open:
        copy = p.queue.copy
        for node, rec in record.recipients.items():
            if rec.status == "queued" and (m := copy(node, mid)) is not None:
                payloads[m.seq] = m.payload
                queued.setdefault(m.seq, []).append(node)
    mail = p._mail.get(mid)
    if mail is not None:
        payloads[mail.seq] = mail
    event = next(iter(payloads.values())).event if payloads else None
    key = record.idempotency_key
    return SavedMessage(
        record,
        event,
        [(m.seq, m.sent_at, m.expires_at) for m in payloads.values()],
        0 if mail is None else mail.seq,
        list(queued.items()),
        key is not None and p.idempotency.get((record.from_node, key)) == mid,
        p._completed.get(mid, 0),
    )


def restore(p: MessagesProjection, records: Mapping[str, Saved], raw: bytes) -> None:
    """Load what `Records` and the cut saved into the fresh projection `p` (see the module)."""
    mails: dict[tuple[str, int], Mail] = {}
    copies: list[tuple[int, str, list[str]]] = []
    dead: list[SavedDeadLetter] = []
    done: list[tuple[int, str]] = []
    messages, idempotency, current = p.messages, p.idempotency, p._mail
    for saved in records.values():
        if type(saved) is not SavedMessage:
            dead.append(saved)  # type: ignore[arg-type]
            continue
        record = saved.record
        mid = record.message_id
        messages[mid] = record
        if saved.keyed and record.idempotency_key is not None:
            idempotency[(record.from_node, record.idempotency_key)] = mid
        if saved.done:
            done.append((saved.done, mid))
        event = saved.event
        if event is None:  # a completed message: no payload, nothing queued
            continue
        for seq, sent_at, expires_at in saved.mails:
            mails[(mid, seq)] = Mail(event, seq, sent_at, expires_at)
        if saved.mail:
            current[mid] = mails[(mid, saved.mail)]
        for seq, nodes in saved.queued:
            copies.append((seq, mid, nodes))
    dead.sort(key=lambda d: d.at)  # the order they died in (stable: a record's own order)
    for d in dead:
        mail = mails.get((d.message_id, d.seq))
        if mail is None:
            mail = mails[(d.message_id, d.seq)] = Mail(d.event, d.seq, d.sent_at, d.expires_at)
        p.dead_letters[(d.message_id, d.node_id)] = DeadLetter(
            d.message_id, d.node_id, d.reason, d.at, d.attempts, mail
        )
    done.sort()
    p._completed.update((mid, rank) for rank, mid in done)
    p._ranked = cut_decoder.decode(raw).ranked
    copies.sort(key=lambda c: c[0])
    for seq, mid, nodes in copies:
        mail = mails[(mid, seq)]
        priority = priority_of(mail.event.priority)
        p.queue.enqueue(QueuedMessage(mid, seq, priority, mail.expires_at, mail), tuple(nodes))
