"""Discovery indices of the nodes projection against a brute-force model: filter every node,
sort with the key functions of a plain sort, slice. Also: folding the same log in one go gives
the same state and answers, and so does a projection loaded from a snapshot."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import projections.node_index as node_index
from eventstore.base import Envelope
from eventstore.events import (
    BaseEvent,
    NodeDeregistered,
    NodeHeartbeat,
    NodeRegistered,
    NodeStatusUpdated,
)
from projections.base import Projections
from projections.nodes import Node, NodesProjection
from projections.snapshots import encoder

# The order of a plain sort of the matches (in registration order), as the API had it.
SORT_KEYS: dict[str, Any] = {
    "registered_at": lambda n: n.generation,
    "node_id": lambda n: n.node_id,
    "name": lambda n: n.name.lower(),
    "type": lambda n: n.type,
    "status": lambda n: n.status,
    "load": lambda n: (n.load is None, n.load or 0.0),
    "last_heartbeat_at": lambda n: n.last_heartbeat_at or 0.0,
}

IDS = [f"n{i}" for i in range(14)]
words = st.sampled_from(["a", "b", "c"])
names = st.sampled_from(["Alpha", "alpha", "beta", "Gamma", "b"])
regions = st.sampled_from(["eu", "us", "ap", None, 7])
loads = st.none() | st.sampled_from([0.0, -0.0, 0.5, 1.0, -2.0, 0.25])
steps = st.sampled_from([0.0, 0.0, 1.0, 20.0, 59.0, 61.0, 250.0, -5.0])


def model_page(p: NodesProjection, q: dict[str, Any]) -> tuple[list[str], int]:
    """Filter every node, sort with the plain key, slice."""
    now, ow, sw = q["now"], q["online_within"], q["stale_within"]
    found = []
    for n in sorted(p.nodes.values(), key=lambda n: n.generation):
        presence = n.presence(now, ow, sw)
        if (
            (q["type"] is None or n.type == q["type"])
            and all(c in n.capabilities for c in q["capabilities"])
            and (q["region"] is None or n.region == q["region"])
            and (q["status"] is None or n.status == q["status"])
            and (q["presence"] is None or presence == q["presence"])
            and (q["online"] is None or (presence == "online") is q["online"])
        ):
            found.append(n)
    found.sort(key=SORT_KEYS[q["sort_by"]], reverse=q["descending"])
    window = found[q["skip"] : q["skip"] + q["limit"]]
    return [n.node_id for n in window], len(found)


def index_page(p: NodesProjection, q: dict[str, Any]) -> tuple[list[str], int]:
    found, total = p.page(**q)
    return [n.node_id for n in found], total


FILTERS: dict[str, st.SearchStrategy[Any]] = {
    "type": words,
    "capabilities": st.lists(words, min_size=1, max_size=2),
    "region": st.sampled_from(["eu", "us", "zz"]),
    "status": st.sampled_from(["active", "down", "idle"]),
    "presence": st.sampled_from(["online", "stale", "offline"]),
    "online": st.booleans(),
}
NO_FILTER: dict[str, Any] = {"type": None, "capabilities": [], "region": None, "status": None}
NO_FILTER |= {"presence": None, "online": None}

queries = st.fixed_dictionaries(
    {
        "now_offset": st.sampled_from([-400.0, -61.0, 0.0, 30.0, 60.0, 61.0, 301.0, 5000.0]),
        "online_within": st.sampled_from([60.0, 0.0, 300.0, 90.0]),
        "stale_within": st.sampled_from([300.0, 60.0, 30.0, 1000.0]),
        "sort_by": st.sampled_from(sorted(SORT_KEYS)),
        "descending": st.booleans(),
        "skip": st.sampled_from([0, 0, 0, 1, 2, 3, 5, 8, 13]),
        "limit": st.integers(1, 16),
    }
).flatmap(
    lambda q: (
        st.sets(st.sampled_from(sorted(FILTERS)), max_size=3)
        .flatmap(lambda names: st.fixed_dictionaries({n: FILTERS[n] for n in names}))
        .map(lambda f: {**NO_FILTER, **q, **f})
    )
)


class DiscoveryMachine(RuleBasedStateMachine):
    """Random registrations, deregistrations, status updates and heartbeats; every query the
    indices answer must equal the brute-force one."""

    tight = False  # tiny blocks (boundaries, splits, slot compaction all happen), never sort

    def __init__(self) -> None:
        super().__init__()
        self.p = NodesProjection()
        self.all = Projections([self.p])
        self.log: list[Envelope] = []
        self.versions: dict[str, int] = {}
        self.ts = 0.0
        self.saved: dict[str, int] = {}

    @initialize(
        nodes=st.lists(
            st.tuples(st.sampled_from(IDS), names, words, st.lists(words, max_size=3), regions),
            max_size=12,
        ),
        beats=st.lists(st.tuples(st.integers(0, 11), steps), max_size=12),
    )
    def populate(
        self, nodes: list[tuple[str, str, str, list[str], Any]], beats: list[tuple[int, float]]
    ) -> None:
        if self.tight:
            tiny = (("SHIFT", 2), ("BLOCK", 4), ("MASK", 3), ("BLOCK_LEN", 2), ("SORT_COST", 1e9))
            for name, value in tiny:
                self.saved[name] = getattr(node_index, name)
                setattr(node_index, name, value)
        self.register_many(nodes, 1.0)
        for i, step in beats if nodes else ():
            self.heartbeat(nodes[i % len(nodes)][0], step)

    def teardown(self) -> None:
        for name, value in self.saved.items():
            setattr(node_index, name, value)

    def record(self, event: BaseEvent, step: float) -> None:
        self.ts += step
        stream = event.stream
        self.versions[stream] = self.versions.get(stream, 0) + 1
        seq = len(self.log) + 1
        env = Envelope(seq, stream, self.versions[stream], self.ts, f"e{seq}", event)
        self.log.append(env)
        self.all.apply(env)

    @rule(
        node_id=st.sampled_from(IDS),
        name=names,
        type=words,
        caps=st.lists(words, max_size=3),
        region=regions,
        status=st.sampled_from(["active", "idle"]),
        step=steps,
    )
    def register(
        self,
        node_id: str,
        name: str,
        type: str,
        caps: list[str],
        region: Any,
        status: str,
        step: float,
    ) -> None:
        if node_id in self.p.nodes:  # the log refuses a live id
            return
        metadata = {} if region is None else {"region": region}
        event = NodeRegistered(
            node_id=node_id,
            name=name,
            node_type=type,
            public_key="PEM",
            capabilities=caps,
            metadata=metadata,
            status=status,
        )
        self.record(event, step)

    @rule(
        nodes=st.lists(
            st.tuples(st.sampled_from(IDS), names, words, st.lists(words, max_size=3), regions),
            min_size=1,
            max_size=8,
        ),
        step=steps,
    )
    def register_many(self, nodes: list[tuple[str, str, str, list[str], Any]], step: float) -> None:
        for node_id, name, type, caps, region in nodes:
            self.register(node_id, name, type, caps, region, "active", step)

    @rule(node_id=st.sampled_from(IDS), step=steps)
    def deregister(self, node_id: str, step: float) -> None:
        self.record(NodeDeregistered(node_id=node_id), step)

    @rule(
        node_id=st.sampled_from(IDS),
        status=st.none() | st.sampled_from(["active", "down", "idle"]),
        load=loads,
        region=st.none() | regions,
        step=steps,
    )
    def update(
        self, node_id: str, status: str | None, load: float | None, region: Any, step: float
    ) -> None:
        metadata = None if region is None else {"region": region}
        self.record(
            NodeStatusUpdated(node_id=node_id, status=status, load=load, metadata=metadata), step
        )

    @rule(node_id=st.sampled_from(IDS), step=steps)
    def heartbeat(self, node_id: str, step: float) -> None:
        self.record(NodeHeartbeat(node_id=node_id), step)

    @rule(q=queries)
    def query(self, q: dict[str, Any]) -> None:
        q = dict(q)
        q["now"] = self.ts + q.pop("now_offset")
        assert index_page(self.p, q) == model_page(self.p, q)

    @rule(
        filter=st.sampled_from(["type", "capabilities", "region", "status"]).flatmap(
            lambda name: st.tuples(st.just(name), FILTERS[name])
        ),
        sort_by=st.sampled_from(["node_id", "name", "load", "last_heartbeat_at"]),
        descending=st.booleans(),
        skip=st.integers(0, 8),
        limit=st.integers(1, 4),
    )
    def query_one_filter(
        self, filter: tuple[str, Any], sort_by: str, descending: bool, skip: int, limit: int
    ) -> None:
        """The shape whose walk skips whole blocks by their counts."""
        q = {**NO_FILTER, "now": self.ts, "online_within": 60.0, "stale_within": 300.0}
        q |= {filter[0]: filter[1], "sort_by": sort_by, "descending": descending}
        q |= {"skip": skip, "limit": limit}
        assert index_page(self.p, q) == model_page(self.p, q)

    @rule(q=queries)
    def replayed_and_restored_answer_alike(self, q: dict[str, Any]) -> None:
        q = dict(q)
        q["now"] = self.ts + q.pop("now_offset")
        replayed = NodesProjection()
        Projections([replayed]).apply_many(self.log)
        restored = through_snapshot(self.p)
        assert replayed.state() == self.p.state() == restored.state()
        want = model_page(self.p, q)
        assert index_page(replayed, q) == want
        assert index_page(restored, q) == want

    @invariant()
    def indices_hold_exactly_the_live_nodes(self) -> None:
        index = self.p.index
        live = {n.slot: n for n in index.slots if n is not None}
        assert sorted(n.node_id for n in live.values()) == sorted(self.p.nodes)
        assert all(index.slots[n.slot] is n for n in self.p.nodes.values())
        for name in index.keys:
            order = index.order(name)
            slots = list(order.ascending(0, order.size))
            assert sorted(slots) == sorted(live)
            key = SORT_KEYS[name]
            assert slots == sorted(live, key=lambda s: (key(live[s]), s))


DiscoveryMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=50, deadline=None
)
TestDiscoveryMachine = DiscoveryMachine.TestCase


class TightDiscoveryMachine(DiscoveryMachine):
    tight = True


TightDiscoveryMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=60, deadline=None
)
TestTightDiscoveryMachine = TightDiscoveryMachine.TestCase


def fold(events: list[tuple[float, BaseEvent]]) -> NodesProjection:
    p = NodesProjection()
    everything = Projections([p])
    versions: dict[str, int] = {}
    for seq, (ts, event) in enumerate(events, 1):
        versions[event.stream] = versions.get(event.stream, 0) + 1
        everything.apply(Envelope(seq, event.stream, versions[event.stream], ts, f"e{seq}", event))
    return p


def through_snapshot(p: NodesProjection) -> NodesProjection:
    """A projection loaded from what a snapshot saves of `p`: its records (in slices, by
    `broker.snapshots`) and the rest, each through the codec."""
    records = encoder.encode(list(p.records().items()))
    restored = NodesProjection()
    restored.restore_sliced(
        dict(msgspec.msgpack.decode(records, type=list[tuple[str, Node]])),
        encoder.encode(p.snapshot()),
    )
    return restored


def test_a_snapshot_saves_the_registry_and_a_restore_rebuilds_the_indices() -> None:
    p = fold(
        [
            (1.0, NodeRegistered(node_id="a", name="A", node_type="t", public_key="k")),
            (2.0, NodeRegistered(node_id="b", name="B", node_type="u", public_key="k")),
            (3.0, NodeHeartbeat(node_id="b")),
            (4.0, NodeStatusUpdated(node_id="a", load=0.5)),
        ]
    )
    assert set(msgspec.msgpack.decode(encoder.encode(p.snapshot()))) == {"retired"}
    restored = through_snapshot(p)
    query = {"now": 10.0, "sort_by": "last_heartbeat_at", "descending": True}
    assert index_page(restored, query) == index_page(p, query) == (["b", "a"], 2)
    assert index_page(restored, {"type": "u"}) == (["b"], 1)
    assert isinstance(restored.nodes["a"], Node)


@pytest.mark.parametrize("descending", [False, True])
def test_ties_keep_registration_order_in_both_directions(descending: bool) -> None:
    events: list[tuple[float, BaseEvent]] = [
        (float(i), NodeRegistered(node_id=f"n{i}", name="same", node_type="t", public_key="k"))
        for i in range(5)
    ]
    p = fold(events)
    for key in ("name", "type", "status", "load", "last_heartbeat_at"):
        q = {"sort_by": key, "descending": descending, "skip": 1, "limit": 3}
        assert index_page(p, q) == (["n1", "n2", "n3"], 5)
