"""Prefix search of node ids and names (the console's search box) against a brute-force model,
after registrations, renames by re-registration and deregistrations, while the sorted orders are
built in slices and once they are ready."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore.base import Envelope
from eventstore.events import BaseEvent, NodeDeregistered, NodeRegistered
from projections.base import Projections
from projections.nodes import NodesProjection

chars = st.text(alphabet="abAB-1", min_size=1, max_size=4)
steps = st.lists(st.tuples(st.booleans(), chars, chars), max_size=40)


def model(p: NodesProjection, prefix: str, limit: int) -> list[str]:
    by_id = sorted(n.node_id for n in p.nodes.values() if n.node_id.startswith(prefix))
    by_name = [
        n.node_id
        for n in sorted(p.nodes.values(), key=lambda n: (n.name.lower(), n.slot))
        if n.name.lower().startswith(prefix.lower()) and n.node_id not in by_id
    ]
    return (by_id + by_name)[:limit]


@settings(max_examples=200, deadline=None)
@given(steps=steps, prefix=st.text(alphabet="abAB-1", max_size=3), limit=st.integers(1, 8))
def test_by_prefix_matches_a_scan(
    steps: list[tuple[bool, str, str]], prefix: str, limit: int
) -> None:
    p = NodesProjection()
    everything = Projections([p])
    versions: dict[str, int] = {}
    for seq, (register, node_id, name) in enumerate(steps, 1):
        event: BaseEvent
        if register:
            event = NodeRegistered(node_id=node_id, name=name, node_type="t", public_key="k")
        else:
            event = NodeDeregistered(node_id=node_id)
        versions[event.stream] = versions.get(event.stream, 0) + 1
        everything.apply(Envelope(seq, event.stream, versions[event.stream], seq, f"e{seq}", event))
    want = model(p, prefix, limit)
    assert [n.node_id for n in p.by_prefix(prefix, limit)] == want  # orders being built: a scan
    while p.index.build_step():
        pass
    assert [n.node_id for n in p.by_prefix(prefix, limit)] == want  # from the built orders
