"""The messages projection through a snapshot (projections.message_slices): records saved while
events keep being applied, those changed meanwhile saved again, then the cut; the state and
every node's mailbox (order, payloads, expiries of redriven copies) equal a replay's, at the cut
and after the tail."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from eventstore.base import Envelope
from eventstore.events import (
    BaseEvent,
    MessageDeadLettered,
    MessageExpired,
    MessageRead,
    MessageRedriven,
    MessageSent,
    MessagesRead,
)
from projections.message_slices import Saved
from projections.messages import MessagesProjection
from projections.snapshots import encoder

record_decoder = msgspec.msgpack.Decoder(Saved | None)  # type: ignore[arg-type]

NODES = ["a", "b", "c"]
MIDS = [f"m{i}" for i in range(6)]
NOW = 1000.0 + 50.0  # the clock of every query: some messages have expired by then

mids = st.sampled_from(MIDS)
nodes = st.sampled_from(NODES)
event = st.one_of(
    st.builds(
        MessageSent,
        message_id=mids,
        from_node=st.just("x"),
        to_nodes=st.lists(nodes, min_size=1, max_size=3, unique=True).map(tuple),
        message_type=st.sampled_from(["t", "u"]),
        priority=st.sampled_from(["critical", "high", "normal", "low"]),
        ttl=st.sampled_from([10.0, 3600.0]),
        idempotency_key=st.one_of(st.none(), st.sampled_from(["k1", "k2"])),
    ),
    st.builds(MessageRead, message_id=mids, node_id=nodes),
    st.builds(MessagesRead, node_id=nodes, message_ids=st.lists(mids, max_size=3)),
    st.builds(MessageDeadLettered, message_id=mids, node_id=nodes, attempts=st.integers(0, 9)),
    st.builds(MessageRedriven, message_id=mids, node_id=nodes, ttl=st.sampled_from([5.0, 99.0])),
    st.builds(MessageExpired, message_id=mids, node_ids=st.lists(nodes, max_size=2)),
)


def projection() -> MessagesProjection:
    return MessagesProjection(now=lambda: NOW, retain_completed=3)


def fold(p: MessagesProjection, envs: list[Envelope]) -> MessagesProjection:
    handlers = p.handlers()
    for env in envs:
        handlers[type(env.event)](env)
    return p


def seen(p: MessagesProjection) -> dict[str, Any]:
    mailboxes = {
        node: [(m.id, m.seq, m.expires_at, m.priority) for m in p.pending(node)] for node in NODES
    }
    return {"state": p.state(), "mailboxes": mailboxes}


def unique_sends(events: list[BaseEvent]) -> list[BaseEvent]:
    """Without the sends of an id already sent: the log refuses them (a message's stream starts
    at version 0), so the projection never sees one."""
    sent: set[str] = set()
    kept = []
    for e in events:
        if isinstance(e, MessageSent):
            if e.message_id in sent:
                continue
            sent.add(e.message_id)
        kept.append(e)
    return kept


def snapshot_under_load(
    live: MessagesProjection, meanwhile: list[Envelope]
) -> tuple[dict[str, Any], bytes]:
    """What a snapshot of `live` loads back: every record saved, `meanwhile` applied, the
    records it changed saved again (as `broker.upkeep.snapshot_write` does), then the cut."""
    live.dirty = {}
    saved = {key: encoder.encode(record) for key, record in live.records().items()}
    fold(live, meanwhile)
    records = live.records()
    saved.update((key, encoder.encode(records.get(key))) for key in live.dirty)
    cut = encoder.encode(live.snapshot())
    live.dirty = None
    decoded = {key: record_decoder.decode(data) for key, data in saved.items()}
    return {key: record for key, record in decoded.items() if record is not None}, cut


def sent(mid: str, key: str | None = None) -> MessageSent:
    return MessageSent(
        message_id=mid, from_node="x", to_nodes=("a",), message_type="t", idempotency_key=key
    )


def read(*mids: str) -> list[BaseEvent]:
    return [MessageRead(message_id=mid, node_id="a") for mid in mids]


# records changed after their slice was saved, by nothing but one of these: saved again
REDRIVEN = [sent("m0"), MessageDeadLettered(message_id="m0", node_id="a")]
REDRIVEN.append(MessageRedriven(message_id="m0", node_id="a"))
DROPPED = [*map(sent, MIDS[:4]), *read("m0", "m1", "m2", "m3")]  # retain_completed=3
KEYED = [sent("m0", "k1"), sent("m1", "k1"), *map(sent, MIDS[2:5])]


@example(events=REDRIVEN, start=0.7, cut=1.0)  # a dead letter redriven
@example(  # completed in another order than sent, and one more after the load
    events=[*map(sent, MIDS[:3]), *read("m1", "m0", "m2")], start=0.85, cut=0.0
)
@example(events=DROPPED, start=0.63, cut=1.0)  # a completed message dropped for newer ones
@example(  # ... dropping the idempotency key another message holds now
    events=[*KEYED, *read("m0", "m2", "m3", "m4")], start=0.67, cut=1.0
)
@example(  # a key another message takes, then drops with it
    events=[*KEYED, *read("m1", "m2", "m3", "m4")], start=0.12, cut=1.0
)
@settings(max_examples=500, deadline=None)
@given(events=st.lists(event, max_size=40), start=st.floats(0, 1), cut=st.floats(0, 1))
def test_snapshot_then_tail_equals_replay(
    events: list[BaseEvent], start: float, cut: float
) -> None:
    events = unique_sends(events)
    envs = [Envelope(i, e.stream, 1, 1000.0 + i, f"e{i}", e) for i, e in enumerate(events, 1)]
    i = int(len(envs) * start)
    k = i + int((len(envs) - i) * cut)
    records, raw = snapshot_under_load(fold(projection(), envs[:i]), envs[i:k])
    loaded = projection()
    loaded.restore_sliced(records, raw)
    at_k = fold(projection(), envs[:k])
    assert seen(loaded) == seen(at_k)
    assert list(loaded.dead_letters) == list(at_k.dead_letters)  # listed in the order they died
    whole = seen(fold(projection(), envs))
    assert seen(fold(loaded, envs[k:])) == whole
    again = projection()  # a snapshot of the loaded one, after the tail, loads alike
    again.restore_sliced(*snapshot_under_load(loaded, []))
    assert seen(again) == whole
