"""Discovery indices of the nodes projection against a brute-force model: filter every node,
sort with the key functions of a plain sort, slice. Also: folding the same log in one go gives
the same state and answers, and so does a projection loaded from a snapshot."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import projections.bitmaps as bitmaps
import projections.heartbeat_order as heartbeat_order
import projections.index_snapshot as index_snapshot
import projections.node_index as node_index
import projections.sorted_slots as sorted_slots
import projections.token_counts as token_counts
from broker.upkeep.snapshot_write import slice_decoders
from eventstore.base import Envelope
from eventstore.events import (
    BaseEvent,
    NodeDeregistered,
    NodeHeartbeat,
    NodeRegistered,
    NodeStatusUpdated,
)
from projections.base import Projections
from projections.node_record import Packed
from projections.nodes import Node, NodesProjection
from projections.snapshots import encoder, fingerprint

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


# Tiny blocks and runs: boundaries, splits, compactions and slot compaction all happen.
TINY = [
    (bitmaps, "SHIFT", 2),
    (bitmaps, "BLOCK", 4),
    (bitmaps, "MASK", 3),
    (node_index, "BLOCK", 4),
    (sorted_slots, "BLOCK_LEN", 2),
    (sorted_slots, "BUILD_STEP", 3),
    (sorted_slots, "SORT_STEP", 3),
    (node_index, "SORT_COST", 1e9),
    (heartbeat_order, "RUN_LEN", 4),
    (heartbeat_order, "COUNT_STEP", 3),
    (node_index, "WINDOW_STEP", 2),
    (index_snapshot, "UNPACK_STEP", 3),
]


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


def check_heartbeat_order(order: heartbeat_order.HeartbeatOrder, live: dict[int, Node]) -> None:
    """The log's own invariants: each live slot has exactly one live entry, keyed by its node's
    heartbeat; runs in key order, a tie group in one run; counts and live counts exact; no run
    without a live entry, none with more dead entries than live ones."""
    where, off = order.where, order.off
    seen: dict[int, Any] = {}
    for runs, sign in ((order.neg, -1), (order.pos, 1)):
        previous = None
        for run in runs:
            assert len(run.ts) == len(run.sl) > 0
            assert list(run.ts) == sorted(run.ts)
            assert all(t * sign > 0 for t in run.ts)
            assert previous is None or previous < run.ts[0]
            previous = run.ts[-1]
            mine = [x for i, x in enumerate(run.sl) if where[x] is run and off[x] == i]
            assert 0 < run.live == len(mine) and run.live * 2 >= len(run.sl)
            for i, x in enumerate(run.sl):
                if where[x] is run and off[x] == i:
                    assert run.ts[i] == live[x].last_heartbeat_at
                    seen[x] = run
            if run.counts is not None:  # None: left by a load to `count_step`
                assert nonzero(run.counts) == counts_of([live[x] for x in mine])
    zero = [s for s, n in live.items() if not n.last_heartbeat_at]
    assert sorted(bitmaps.slots_of(sorted(order.zero.bits.items()), 0, len(live))) == sorted(zero)
    assert order.zero.live == len(zero) and nonzero(order.zero.counts) == counts_of(
        [live[s] for s in zero]
    )
    seen |= {s: order.zero for s in zero}
    assert seen.keys() == live.keys() and order.size == len(live)
    assert order.uncounted == sum(run.counts is None for run in [*order.neg, *order.pos])
    assert all(where[s] is seen[s] for s in live)
    assert all(w is None for s, w in enumerate(where) if s not in live)


def counts_of(nodes: list[Node]) -> tuple[dict[str, int], ...]:
    counts = token_counts.new_counts()
    for n in nodes:
        token_counts.count_node(counts, n, 1)
    return nonzero(counts)


def nonzero(counts: tuple[dict[str, int], ...]) -> tuple[dict[str, int], ...]:
    return tuple({k: v for k, v in c.items() if v} for c in counts)


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
        self.saved: dict[tuple[Any, str], Any] = {}
        self.reloaded = False

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
            for module, name, value in TINY:
                self.saved[module, name] = getattr(module, name)
                setattr(module, name, value)
        self.register_many(nodes, 1.0)
        for i, step in beats if nodes else ():
            self.heartbeat(nodes[i % len(nodes)][0], step)

    def teardown(self) -> None:
        for (module, name), value in self.saved.items():
            setattr(module, name, value)

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

    @rule(
        node_ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=6),
        back=st.sampled_from([0.5, 1.0, 20.0, 59.0, 400.0]),
    )
    def heartbeats_from_the_past(self, node_ids: list[str], back: float) -> None:
        """Timestamps older than the last (an imported log, a clock set back): inserted in the
        middle of the heartbeat log."""
        now = self.ts
        self.ts -= back
        for node_id in node_ids:
            self.record(NodeHeartbeat(node_id=node_id), 0.0)
        self.ts = now

    @rule(
        steps=st.integers(1, 4),
        start=st.booleans(),
        window=st.none() | st.tuples(st.sampled_from([60.0, 300.0]), steps),
    )
    def build_in_slices(self, steps: int, start: bool, window: tuple[float, float] | None) -> None:
        """Orders and presence windows are built in slices while events keep coming."""
        if start:
            self.p.index.build_orders()
        if window is not None:
            self.p.index.prepare_window(window[0], self.ts + window[1])
        for _ in range(steps):
            self.p.index.build_step()

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

    @rule(q=queries, steps=st.integers(0, 40))
    def replayed_and_restored_answer_alike(self, q: dict[str, Any], steps: int) -> None:
        """Replayed, replayed with the indexing deferred to its end (a start without a
        snapshot), restored with the saved indices, restored from a snapshot without them
        (rebuilt): the same state, the same indices (the deferred replay's slots dense), the
        same answers; and so once the restored one's background work (sharing strings,
        building orders and windows) has moved on."""
        q = dict(q)
        q["now"] = self.ts + q.pop("now_offset")
        replayed = NodesProjection()
        Projections([replayed]).apply_many(self.log)
        at_once = NodesProjection()
        with (everything := Projections([at_once])).replaying():
            assert at_once.index.deferred
            everything.apply_many(self.log)
        assert not at_once.index.deferred and at_once.state() == replayed.state()
        restored = through_snapshot(self.p)
        rebuilt = through_snapshot(self.p, saved_index=False)
        older = through_snapshot(self.p, version=3)
        assert replayed.state() == self.p.state() == restored.state() == rebuilt.state()
        assert older.state() == replayed.state()
        assert saved_records(replayed) == saved_records(self.p) == saved_records(restored)
        assert saved_records(older) == saved_records(replayed)
        assert restored.index.registry is restored.nodes  # the saved indices were used
        assert older.index.registry is older.nodes and older.index.packed == 0
        assert same_index(older, self.p)
        assert rebuilt.index.packed == 0
        assert all(type(n) is Node for n in [*rebuilt.nodes.values(), *older.nodes.values()])
        assert same_index(restored, self.p)
        want = model_page(self.p, q)
        for other in (replayed, at_once, restored, rebuilt, older):
            check_index(other)
            assert index_page(other, q) == want
        restored.index.build_orders()
        for _ in range(steps):
            restored.index.build_step()
        check_index(restored)
        assert index_page(restored, q) == want
        if restored.index.packed == 0:
            for node in restored.nodes.values():
                assert type(node) is Node
                assert node.type is sys.intern(node.type)
                assert node.status is sys.intern(node.status)
                assert all(c is sys.intern(c) for c in node.capabilities)

    @rule(
        reads=st.lists(st.sampled_from(IDS), max_size=4),
        beats=st.lists(st.tuples(st.sampled_from(IDS), steps), max_size=4),
        updates=st.lists(st.tuples(st.sampled_from(IDS), loads), max_size=2),
        steps=st.sampled_from([0, 0, 0, 1, 2, 6]),
    )
    def reload_from_a_snapshot(
        self,
        reads: list[str],
        beats: list[tuple[str, float]],
        updates: list[tuple[str, float | None]],
        steps: int,
    ) -> None:
        """The live projection replaced by one loaded from its snapshot: its nodes stay packed
        until touched (read, changed by an event, decoded by a background slice), and its next
        snapshot mixes packed and decoded nodes. State and saved records stay a replay's."""
        self.p = through_snapshot(self.p)
        self.all = Projections([self.p])
        self.all.seq = len(self.log)
        self.reloaded = True
        for node_id in reads:
            node = self.p.get(node_id)
            assert node is None or type(node) is Node and self.p.nodes[node_id] is node
        for node_id, step in beats:
            self.heartbeat(node_id, step)
        for node_id, load in updates:
            self.record(NodeStatusUpdated(node_id=node_id, load=load), 1.0)
        for _ in range(steps):
            self.p.index.build_step()
        assert self.p.index.packed == sum(type(n) is Packed for n in self.p.nodes.values())
        replayed = NodesProjection()
        Projections([replayed]).apply_many(self.log)
        again = through_snapshot(self.p)
        for p in (self.p, again):
            assert replayed.state() == p.state()
            assert saved_records(replayed) == saved_records(p)
            assert same_index(replayed, p)

    @invariant()
    def a_reloaded_projection_stays_a_replay(self) -> None:
        """Once reloaded, every event after it, touching packed nodes or not, keeps the state
        (and what a snapshot saves) that of a replay."""
        if self.reloaded:
            replayed = NodesProjection()
            Projections([replayed]).apply_many(self.log)
            assert replayed.state() == self.p.state()
            assert saved_records(replayed) == saved_records(self.p)

    @invariant()
    def indices_hold_exactly_the_live_nodes(self) -> None:
        check_index(self.p)


def check_index(p: NodesProjection) -> None:
    """Every structure of `p.index` holds exactly the live nodes, keyed by their attributes."""
    index = p.index
    live = {n.slot: n for n in index.slots if n is not None}
    assert sorted(n.node_id for n in live.values()) == sorted(p.nodes)
    assert all(index.slots[n.slot] is n for n in p.nodes.values())
    assert index.live == bitmap_of(live)
    assert index.holes == len(index.slots) - len(live)
    for group, key in zip(index.groups(), GROUP_KEYS, strict=True):
        members: dict[str, list[int]] = {}
        for s, n in live.items():
            for k in key(n):
                members.setdefault(k, []).append(s)
        assert group == {k: bitmap_of(dict.fromkeys(slots)) for k, slots in members.items()}
    for name in index.keys:
        order = index.order(name)
        if order is None:  # being built: checked once it is
            continue
        slots = list(order.ascending(0, order.size))
        assert sorted(slots) == sorted(live)
        key = SORT_KEYS[name]
        assert slots == sorted(live, key=lambda s: (key(live[s]), s))
    check_heartbeat_order(index.heartbeats, live)


GROUP_KEYS: tuple[Any, ...] = (
    lambda n: [n.type],
    lambda n: n.capabilities,
    lambda n: [n.region] if n.region is not None else [],
    lambda n: [n.status],
)


def bitmap_of(slots: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in slots:
        bitmaps.bm_add(out, s)
    return out


def same_index(a: NodesProjection, b: NodesProjection) -> bool:
    """The same slots (by node id), bitmaps and heartbeat order."""
    x, y = a.index, b.index
    ids = [[n and n.node_id for n in i.slots] for i in (x, y)]
    orders = [list(i.heartbeats.ascending(0, i.heartbeats.size)) for i in (x, y)]
    return (
        ids[0] == ids[1]
        and x.live == y.live
        and x.groups() == y.groups()
        and orders[0] == orders[1]
    )


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


def through_snapshot(
    p: NodesProjection, saved_index: bool = True, version: int = 4
) -> NodesProjection:
    """A projection loaded from what a snapshot saves of `p`: its records (in slices, by
    `broker.upkeep.snapshots`) and the rest, each through the codec. `saved_index` False: a
    snapshot made before the indices were saved (they are rebuilt). `version` 3: the records
    as that version saved them (each node whole), read with the decoder kept for it."""
    if version == 3:
        records = encoder.encode([(key, p.get(key)) for key in p.nodes])
        (decoder,) = [
            d
            for fp, d in slice_decoders(Projections([p]))["nodes"].items()
            if fp in NodesProjection.legacy_records
        ]
    else:
        records = encoder.encode(list(p.records().items()))
        decoder = slice_decoders(Projections([p]))["nodes"][fingerprint(p)]
    rest = p.snapshot() if saved_index else {"retired": p.retired}
    restored = NodesProjection()
    restored.restore_sliced(dict(decoder.decode(records)), encoder.encode(rest))
    return restored


def saved_records(p: NodesProjection) -> dict[str, bytes]:
    """Each record as a snapshot saves it (a packed node: its bytes as they are)."""
    return {key: encoder.encode(record) for key, record in p.records().items()}


def test_a_snapshot_saves_the_registry_and_the_indices_and_a_restore_uses_them() -> None:
    p = fold(
        [
            (1.0, NodeRegistered(node_id="a", name="A", node_type="t", public_key="k")),
            (2.0, NodeRegistered(node_id="b", name="B", node_type="u", public_key="k")),
            (3.0, NodeHeartbeat(node_id="b")),
            (4.0, NodeStatusUpdated(node_id="a", load=0.5)),
        ]
    )
    assert set(msgspec.msgpack.decode(encoder.encode(p.snapshot()))) == {"retired", "index"}
    for restored in (through_snapshot(p), through_snapshot(p, saved_index=False)):
        query = {"now": 10.0, "sort_by": "last_heartbeat_at", "descending": True}
        assert index_page(restored, query) == index_page(p, query) == (["b", "a"], 2)
        assert index_page(restored, {"type": "u"}) == (["b"], 1)
        assert isinstance(restored.nodes["a"], Node)
        assert same_index(restored, p)


@pytest.mark.parametrize(
    "damage",
    [
        "slot taken twice",
        "slot out of range",
        "fewer slots",
        "a type's bitmap short",
        "bits cut",
        "another block size",
        "another shape",
        "too many blocks to save in the cut",
    ],
)
def test_a_saved_index_that_does_not_fit_the_records_is_rebuilt(
    damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[float, BaseEvent]] = [
        (
            float(i),
            NodeRegistered(node_id=f"n{i}", name=f"N{i}", node_type=f"t{i % 2}", public_key="k"),
        )
        for i in range(6)
    ]
    p = fold([*events, (9.0, NodeDeregistered(node_id="n1")), (10.0, NodeHeartbeat(node_id="n4"))])
    records = dict(
        msgspec.msgpack.decode(
            encoder.encode(list(p.records().items())), type=list[tuple[str, Packed]]
        )
    )
    if damage == "too many blocks to save in the cut":
        monkeypatch.setattr(index_snapshot, "MAX_BLOCKS", 2)
    saved = p.snapshot()
    index = saved["index"]
    if damage == "slot taken twice":
        records["n2"].slot = records["n3"].slot
    elif damage == "slot out of range":
        records["n5"].slot = index.slots
    elif damage == "fewer slots":
        index.slots = 3
    elif damage == "a type's bitmap short":
        del index.groups[0]["t0"]
    elif damage == "bits cut":
        index.groups[0]["t1"].bits = index.groups[0]["t1"].bits[:-1]
    elif damage == "another block size":
        index.block *= 2
    elif damage == "another shape":
        saved["index"] = [1, 2]
    else:
        assert index is None
    restored = NodesProjection()
    restored.restore_sliced(records, encoder.encode(saved))
    assert restored.index.packed == 0 and restored.index.registry is not restored.nodes
    check_index(restored)
    q = {**NO_FILTER, "now": 10.0, "online_within": 60.0, "stale_within": 300.0}
    for sort_by in SORT_KEYS:
        query = {**q, "sort_by": sort_by, "descending": False, "skip": 0, "limit": 10}
        assert index_page(restored, query) == index_page(p, query)


def test_compacting_the_slots_while_a_snapshot_is_taken_saves_every_record_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(node_index, "BLOCK", 2)  # compaction once holes > 2 and > half
    events: list[tuple[float, BaseEvent]] = [
        (float(i), NodeRegistered(node_id=f"n{i}", name="N", node_type="t", public_key="k"))
        for i in range(6)
    ]
    p = fold(events)
    p.dirty = {}  # a snapshot is being taken

    def deregister(i: int) -> None:
        event = NodeDeregistered(node_id=f"n{i}")
        p._deregistered(Envelope(7 + i, event.stream, 2, 7.0 + i, f"d{i}", event))

    for i in range(3):
        deregister(i)
    assert set(p.dirty) == {"n0", "n1", "n2"}  # no compaction yet (3 holes of 6 slots)
    deregister(3)
    assert set(p.dirty) == {"n0", "n1", "n2", "n3", "n4", "n5"}  # the slots were compacted
    assert [n.slot for n in p.nodes.values()] == [0, 1]


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


def make_node(i: int) -> Node:
    return Node(
        node_id=f"n{i}",
        name="n",
        type="abc"[i % 3],
        capabilities=["x", "y"][: i % 3],
        public_key="k",
        endpoint="",
        metadata={"region": "eu"} if i % 2 else {},
        status="active",
        registered_at=0.0,
        generation=i,
        updated_at=0.0,
    )


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 24),
            st.none() | st.sampled_from([-3.0, -1.0, 0.0, 1.0, 2.0, 2.0, 3.0, 5.0, 9.0]),
        ),
        max_size=150,
    ),
    run_len=st.sampled_from([2, 3, 4, 1024]),
    build=st.booleans(),
)
def test_the_heartbeat_log_reads_like_a_sort(
    ops: list[tuple[int, float | None]], run_len: int, build: bool
) -> None:
    """Heartbeats in any order (ties, older timestamps, 0.0, negative), removals and
    re-insertions, from empty or from a bulk load: every range of the order, both directions,
    equals a stable sort of the live slots, and the log keeps its invariants."""
    saved = heartbeat_order.RUN_LEN
    heartbeat_order.RUN_LEN = run_len
    try:
        nodes: list[Node | None] = [make_node(i) for i in range(25)]
        for i, n in enumerate(nodes):
            n.slot = i  # type: ignore[union-attr]
        order = heartbeat_order.HeartbeatOrder(nodes)
        live = set(range(25))
        half = len(ops) // 2 if build else 0
        for s in sorted(live):
            order.insert(s)
        for step, (s, at) in enumerate(ops):
            if step == half and build:
                order.load(sorted(live))
            node = nodes[s]
            assert node is not None
            if at is None:  # deregistered, or registered again
                if s in live:
                    order.remove(s)
                    live.discard(s)
                else:
                    node.last_heartbeat_at = None
                    order.insert(s)
                    live.add(s)
            elif s in live:
                order.move(node, at)
                node.last_heartbeat_at = at
        check_heartbeat_order(order, {s: nodes[s] for s in live})  # type: ignore[misc]
        key = SORT_KEYS["last_heartbeat_at"]
        model = sorted(live, key=lambda s: (key(nodes[s]), s))
        keys = [key(nodes[s]) for s in model]
        bounds = sorted(
            {0, len(model)} | {i for i in range(1, len(model)) if keys[i - 1] != keys[i]}
        )
        for k in {*keys, -5.0, 0.0, 100.0}:
            assert order.first_true(lambda x, k=k: x >= k) == sum(1 for x in keys if x < k)
        for a in bounds:
            for b in bounds:
                if a > b:
                    continue
                assert list(order.ascending(a, b)) == model[a:b]
                window = bitmaps.slots_of(sorted(order.bitmap_of(a, b).items()), 0, len(nodes))
                beat = [s for s in model[a:b] if nodes[s].last_heartbeat_at is not None]  # type: ignore[union-attr]
                assert window == sorted(beat)
                part = sorted(model[a:b], key=lambda s: key(nodes[s]), reverse=True)
                for skip in (0, 1, 3):
                    assert list(order.descending_from(skip, a, b)) == part[skip:]
    finally:
        heartbeat_order.RUN_LEN = saved


def test_a_window_built_in_slices_takes_in_what_changes_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node not yet visited whose heartbeat lands (older timestamp) in the part already
    visited, one that leaves the window, one deregistered: the finished window is exact."""
    monkeypatch.setattr(node_index, "WINDOW_STEP", 2)
    events: list[tuple[float, BaseEvent]] = [
        (float(i), NodeRegistered(node_id=f"n{i}", name="n", node_type="t", public_key="k"))
        for i in range(8)
    ]
    events += [(100.0 + i, NodeHeartbeat(node_id=f"n{i}")) for i in range(8)]
    p = fold(events)
    everything = Projections([p])
    everything.seq = len(events)
    index = p.index
    w = index.prepare_window(60.0, 150.0)  # n0..n7 within (heartbeats 100..107)
    assert index.build_step() and w.todo is not None  # visited n0, n1
    versions = {n.node_id: n.heartbeats + 1 for n in p.nodes.values()}
    later: list[tuple[float, BaseEvent]] = [
        (100.5, NodeHeartbeat(node_id="n6")),  # not visited yet, now among the visited keys
        (80.0, NodeHeartbeat(node_id="n5")),  # out of the window
        (0.0, NodeDeregistered(node_id="n7")),
    ]
    for seq, (ts, event) in enumerate(later, len(events) + 1):
        stream = event.stream
        versions[stream] += 1
        everything.apply(Envelope(seq, stream, versions[stream], ts, f"x{seq}", event))
    while index.build_step():
        pass
    assert w.todo is None
    found, total = index.page(online=True, now=150.0, limit=10)
    assert [n.node_id for n in found] == ["n0", "n1", "n2", "n3", "n4", "n6"] and total == 6


def test_counts_leave_out_regions_that_are_not_strings() -> None:
    nodes: list[Node | None] = [make_node(i) for i in range(4)]
    nodes[0].metadata["region"] = ["eu"]  # type: ignore[union-attr]
    nodes[2].metadata["region"] = 7  # type: ignore[union-attr]
    counts = token_counts.count_slots(nodes, range(4))
    assert counts[token_counts.KIND["region"]] == {"eu": 2}  # nodes 1 and 3
    assert counts == counts_of([n for n in nodes if n is not None])
