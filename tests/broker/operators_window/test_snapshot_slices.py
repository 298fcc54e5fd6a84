"""Snapshots taken while events keep being applied: the file is the state at its seq, and no
step of the event loop encodes more than a slice of records (a loop-lag probe counting work).

The probe is a task that runs between every two steps of the loop and notes how many records
were encoded since it last ran: that is the work of one step, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import functools
import itertools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.config import Config
from broker.runtime import build_projections
from broker.upkeep import snapshot_write, snapshots
from broker.upkeep.snapshot_file import read_body, read_header
from broker.upkeep.snapshot_write import slice_decoders, write_snapshot
from eventstore.base import Envelope
from eventstore.events import (
    BaseEvent,
    MessageRead,
    MessageSent,
    NodeDeregistered,
    NodeHeartbeat,
    NodeLoggedIn,
    NodeRegistered,
    NodeStatusUpdated,
    TokenFamilyRevoked,
    TokenFamilyStarted,
    TokenRotated,
)
from eventstore.memory import MemoryStore
from projections import node_index
from projections.base import Projections

PEM = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n"


def registered(i: int) -> NodeRegistered:
    return NodeRegistered(
        node_id=f"n{i}",
        name=f"node {i}",
        node_type=f"t{i % 3}",
        public_key=PEM,
        capabilities=[f"c{i % 4}"],
        metadata={"region": f"r{i % 2}"},
    )


def login(i: int, k: int, expires_at: float) -> TokenFamilyStarted:
    return TokenFamilyStarted(
        family_id=f"f{i}.{k}",
        subject_kind="node",
        subject_id=f"n{i}",
        token_hash=f"h{k}",
        expires_at=expires_at,
    )


def change(op: int, i: int) -> BaseEvent:
    node_id = f"n{i}"
    return [
        NodeHeartbeat(node_id=node_id, status="ok", metrics={"cpu": i}),
        NodeStatusUpdated(node_id=node_id, status="busy", load=i / 7, metadata={"region": "r9"}),
        NodeDeregistered(node_id=node_id),  # (and its families revoked)
        registered(i),  # again, after a deregistration (else ignored by the projection)
        NodeLoggedIn(node_id=node_id, family_id=f"f{i}"),
        # a family that expires soon (pruned by the subject's next login), and one that lasts
        login(i, i % 3, expires_at=1000.0 + i % 50),
        TokenRotated(family_id=f"f{i}.{i % 3}", token_hash="r", expires_at=9e9),
        TokenFamilyRevoked(family_id=f"f{i}.{(i + 1) % 3}", reason="logout"),
        # messages (projections.message_slices): sent, then read by one of two recipients
        MessageSent(message_id=f"m{i}", from_node="n0", to_nodes=(node_id, "n1"), message_type="t"),
        MessageRead(message_id=f"m{i}", node_id=node_id),
    ][op]


def state(projections: Projections) -> dict[str, Any]:
    return {name: part.state() for name, part in projections.parts.items()}


class Probe:
    """A task that runs between every two steps of the loop: counts the records encoded in each
    step, and plays traffic: `per_step` events after each slice is encoded."""

    def __init__(self, traffic: Iterator[Callable[[], None]], per_step: int) -> None:
        self.encoded = 0
        self.calls: list[int] = []  # records encoded by each call
        self.steps: list[int] = []  # records encoded by each step of the loop
        self.traffic, self.per_step = traffic, per_step
        self.played = 0
        self.running = True

    async def run(self) -> None:
        while self.running:
            self.steps.append(self.encoded)
            self.encoded = 0
            if len(self.calls) > self.played:  # a slice more encoded: traffic after it
                self.played = len(self.calls)
                for apply in itertools.islice(self.traffic, self.per_step):
                    apply()
            await asyncio.sleep(0)


# changes that land after their record's slice was saved: each must be saved again
@example(nodes=1, changes=[(6, 0)] * 20, per_slice=4)  # rotations of a saved family
@example(nodes=3, changes=[(7, 2)] * 8, per_slice=4)  # a revocation of a saved family
@example(nodes=2, changes=[(2, 0), (3, 0)] * 6, per_slice=2)  # deregistered, registered again
@example(nodes=4, changes=[(2, 0), (2, 1), (2, 2)], per_slice=3)  # slots compacted meanwhile
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.integers(1, 120),
    changes=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 130)), max_size=300),
    per_slice=st.integers(1, 8),
)
def test_a_snapshot_taken_under_load_is_the_state_at_its_seq(
    nodes: int, changes: list[tuple[int, int]], per_slice: int
) -> None:
    async def scenario() -> None:
        envs: list[Envelope] = []

        def env(event: BaseEvent) -> Envelope:
            seq = len(envs) + 1
            envs.append(Envelope(seq, event.stream, 1, 1000.0 + seq, f"id{seq}", event))
            return envs[-1]

        live = build_projections()
        live.apply_many(env(registered(i)) for i in range(nodes))
        live.apply_many(env(login(i, 0, 9e9)) for i in range(nodes))

        sent: set[str] = set()

        def apply(op: int, i: int) -> None:
            event = change(op, i)
            if isinstance(event, MessageSent):  # a message id is sent once (the log refuses more)
                if event.message_id in sent:
                    return
                sent.add(event.message_id)
            live.apply(env(event))

        traffic = (functools.partial(apply, op, i) for op, i in changes)
        probe = Probe(traffic, per_slice)
        encode = snapshot_write._encode_records

        def counting(part: Any, keys: list[str]) -> bytes:
            probe.encoded += len(keys)
            probe.calls.append(len(keys))
            return encode(part, keys)

        async def hash_at(seq: int) -> bytes:
            return seq.to_bytes(32, "big")

        old = snapshot_write.SLICE, snapshot_write.FINAL_MAX, snapshot_write._encode_records
        snapshot_write.SLICE, snapshot_write.FINAL_MAX, snapshot_write._encode_records = (
            16,
            8,
            counting,
        )
        try:
            with tempfile.TemporaryDirectory() as directory:
                probing = asyncio.create_task(probe.run())
                taken = await write_snapshot(live, Path(directory), hash_at, dict, keep=1)
                probe.running = False
                await probing
                assert taken is not None
                header = await asyncio.to_thread(read_header, taken.path)
                wanted = slice_decoders(build_projections())
                body = await asyncio.to_thread(read_body, taken.path, header, wanted)
        finally:
            snapshot_write.SLICE, snapshot_write.FINAL_MAX, snapshot_write._encode_records = old
        # the file holds the state at its seq: what replaying the log up to there gives
        expected = build_projections()
        expected.apply_many(envs[: taken.seq])
        snapshotter = snapshots.Snapshotter(Config())  # loaded as start-up loads it
        loaded = await snapshotter._restore(MemoryStore(), build_projections(), taken.seq, body)
        assert snapshotter.boot.replayed == []  # every projection came from the file
        assert state(loaded) == state(expected)
        # and the discovery indices were restored from it (not rebuilt), as replaying builds them
        index, replayed = loaded.parts["nodes"].index, expected.parts["nodes"].index  # type: ignore[attr-defined]
        assert index.registry is loaded.parts["nodes"].nodes  # type: ignore[attr-defined]
        assert [n and n.node_id for n in index.slots] == [n and n.node_id for n in replayed.slots]
        assert index.live == replayed.live and index.groups() == replayed.groups()
        hb = [list(i.heartbeats.ascending(0, i.heartbeats.size)) for i in (index, replayed)]
        assert hb[0] == hb[1]
        # no step of the loop encoded more than a slice, but the cut: its last changed records
        cut_calls = len(snapshot_write.sliced(live))  # the cut encodes each sliced projection once
        slices, cut = probe.calls[:-cut_calls], sum(probe.calls[-cut_calls:])
        assert max(slices, default=0) <= 16  # a slice each
        assert cut <= 8 or taken.rounds == snapshot_write.ROUNDS  # else one more round first
        assert max(probe.steps) <= max(16, cut)  # a slice, or the cut, a step of the loop

    compact_at = node_index.BLOCK
    node_index.BLOCK = 2  # slots compacted once more than 2 holes are half of them
    try:
        asyncio.run(scenario())
    finally:
        node_index.BLOCK = compact_at
