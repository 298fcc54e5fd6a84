"""The nodes projection: registry, presence from heartbeat times, discovery indices."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore.base import Envelope
from eventstore.events import (
    BaseEvent,
    NodeDeregistered,
    NodeHeartbeat,
    NodeRegistered,
    NodeStatusUpdated,
)
from projections.base import Projections
from projections.node_index import Bitmap, intersect, slots_of
from projections.nodes import NodesProjection


def fold(events: list[tuple[float, BaseEvent]]) -> NodesProjection:
    projection = NodesProjection()
    all_ = Projections([projection])
    versions: dict[str, int] = {}
    for seq, (ts, event) in enumerate(events, 1):
        versions[event.stream] = versions.get(event.stream, 0) + 1
        all_.apply(Envelope(seq, event.stream, versions[event.stream], ts, f"e{seq}", event))
    return projection


def registered(node_id: str, **kw: Any) -> NodeRegistered:
    fields: dict[str, Any] = {
        "name": node_id,
        "node_type": "gateway",
        "public_key": "PEM",
        "capabilities": ["routing"],
        "metadata": {"region": "eu"},
    }
    fields.update(kw)
    return NodeRegistered(node_id=node_id, **fields)


def test_presence_is_computed_from_heartbeat_time_and_now() -> None:
    p = fold([(100.0, registered("n1")), (200.0, NodeHeartbeat(node_id="n1", timestamp="x"))])
    node = p.get("n1")
    assert node is not None
    assert node.last_heartbeat_at == 200.0 and node.heartbeat_timestamp == "x"
    assert node.presence(200.0 + 60, 60, 300) == "online"
    assert node.presence(200.0 + 61, 60, 300) == "stale"
    assert node.presence(200.0 + 301, 60, 300) == "offline"
    never = fold([(100.0, registered("n2"))]).get("n2")
    assert never is not None and never.presence(100.0, 60, 300) == "offline"


def test_discovery_by_type_capabilities_region_status() -> None:
    p = fold(
        [
            (1.0, registered("a", capabilities=["routing", "storage"])),
            (2.0, registered("b", node_type="storage", capabilities=["storage"])),
            (3.0, registered("c", node_type="storage", metadata={"region": "us"})),
            (4.0, NodeStatusUpdated(node_id="a", status="down", metadata={"region": "us"})),
        ]
    )
    assert [n.node_id for n in p.discover(type="storage")] == ["b", "c"]
    assert [n.node_id for n in p.discover(capabilities=["storage"])] == ["a", "b"]
    assert [n.node_id for n in p.discover(capabilities=["storage", "routing"])] == ["a"]
    assert [n.node_id for n in p.discover(region="us")] == ["a", "c"]
    assert [n.node_id for n in p.discover(region="eu")] == ["b"]
    assert [n.node_id for n in p.discover(status="down")] == ["a"]
    assert [n.node_id for n in p.discover(status="active", type="storage")] == ["b", "c"]
    assert p.discover(capabilities=["gpu"]) == []


def test_deregistration_clears_indices_and_ignores_later_events() -> None:
    p = fold(
        [
            (1.0, registered("a")),
            (2.0, NodeDeregistered(node_id="a")),
            (3.0, NodeHeartbeat(node_id="a")),
            (4.0, NodeStatusUpdated(node_id="a", status="x")),
        ]
    )
    assert p.get("a") is None and p.discover() == []
    index = p.index
    assert index.by_type == {} and index.by_capability == {} and index.by_region == {}
    assert index.by_status == {} and index.live == {}
    assert p.retired == {"a": 2.0}


# --- property: the indices always equal the ones recomputed from the registry ---

node_ids = st.sampled_from(["a", "b", "c"])
words = st.sampled_from(["x", "y", "z"])
node_events = st.one_of(
    st.builds(
        lambda i, t, caps, r: registered(i, node_type=t, capabilities=caps, metadata={"region": r}),
        node_ids,
        words,
        st.lists(words, max_size=3),
        words,
    ),
    st.builds(
        lambda i, s, r: NodeStatusUpdated(node_id=i, status=s, metadata={"region": r}),
        node_ids,
        st.none() | words,
        words,
    ),
    st.builds(lambda i: NodeHeartbeat(node_id=i), node_ids),
    st.builds(lambda i: NodeDeregistered(node_id=i), node_ids),
)


def expected_index(p: NodesProjection, key: Any) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for node in p.nodes.values():
        values = key(node)
        for v in values if isinstance(values, list) else [values]:
            if v is not None:
                out.setdefault(v, set()).add(node.node_id)
    return out


def members(p: NodesProjection, index: dict[str, Bitmap]) -> dict[str, set[str]]:
    """An index of bitmaps as sets of node ids."""
    out: dict[str, set[str]] = {}
    for key, bitmap in index.items():
        slots = slots_of(intersect([bitmap]), 0, len(p.index.slots))
        out[key] = {p.index.slots[s].node_id for s in slots}  # type: ignore[union-attr]
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(node_events, max_size=30))
def test_indices_match_the_registry(events: list[BaseEvent]) -> None:
    # The log refuses a second registration of a live id; mirror that here.
    live: set[str] = set()
    accepted = []
    for e in events:
        if isinstance(e, NodeRegistered):
            if e.node_id in live:
                continue
            live.add(e.node_id)
        elif isinstance(e, NodeDeregistered):
            live.discard(e.node_id)
        accepted.append((float(len(accepted)), e))
    p = fold(accepted)
    assert members(p, p.index.by_type) == expected_index(p, lambda n: n.type)
    assert members(p, p.index.by_capability) == expected_index(p, lambda n: n.capabilities)
    assert members(p, p.index.by_region) == expected_index(p, lambda n: n.region)
    assert members(p, p.index.by_status) == expected_index(p, lambda n: n.status)
    # replaying the same log gives the same state
    again = fold(accepted)
    assert again.nodes == p.nodes and members(again, again.index.by_region) == members(
        p, p.index.by_region
    )
