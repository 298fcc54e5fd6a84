"""The messages projection through a snapshot: the state and every node's mailbox (order,
payloads, expiries of redriven copies) equal a replay's, at the cut and after the tail."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
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
from projections.messages import MessagesProjection
from projections.snapshots import encoder

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


@settings(max_examples=500, deadline=None)
@given(events=st.lists(event, max_size=40), cut=st.floats(0, 1))
def test_snapshot_then_tail_equals_replay(events: list[BaseEvent], cut: float) -> None:
    events = unique_sends(events)
    envs = [Envelope(i, e.stream, 1, 1000.0 + i, f"e{i}", e) for i, e in enumerate(events, 1)]
    k = int(len(envs) * cut)
    at_k = fold(projection(), envs[:k])
    loaded = projection()
    loaded.restore(encoder.encode(at_k.snapshot()))
    assert seen(loaded) == seen(at_k)
    assert seen(fold(loaded, envs[k:])) == seen(fold(projection(), envs))
