"""Compaction (broker/upkeep/compaction.py, eventstore/sqlite_compact.py): what goes, what stays,
and that a start-up after it rebuilds the state from before it; `verify` after it."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import broker.runtime as runtime_module
import broker.upkeep.compaction as compaction_module
import broker.upkeep.snapshots as snapshots_module
from broker.config import Config, LogConfig, ServerConfig
from broker.upkeep.compaction import offline
from broker.upkeep.snapshots import Snapshotter
from eventstore import open_store
from eventstore.base import IntegrityError, StoreConfig
from eventstore.events import (
    BaseEvent,
    ChallengeUsed,
    MessageDeadLettered,
    MessageExpired,
    MessageRead,
    MessageRedriven,
    MessageSent,
    MessagesRead,
    NodeHeartbeat,
    NodeRegistered,
    TelemetryRecorded,
)
from eventstore.sqlite_verify import verify_file
from tests.helpers.history import envelopes

DAY = 86400.0
T0 = 1_700_000_000.0
NODES = ("n1", "n2", "n3")
KEY = "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----"


def make_config(tmp: Path) -> Config:
    return Config(
        server=ServerConfig(data_dir=str(tmp / "data")),
        store=StoreConfig(path=str(tmp / "data" / "events.db")),
        log=LogConfig(level="warning"),
    )


@pytest.fixture
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The messages projection keeps 3 finished messages (100,000 by default), so that
    histories of a few dozen events reach past its window."""
    real = runtime_module.build_projections

    def build(delivery: Any = None) -> Any:
        projections = real(delivery)
        projections.parts["messages"].retain_completed = 3  # type: ignore[attr-defined]
        return projections

    for module in (runtime_module, snapshots_module, compaction_module):
        monkeypatch.setattr(module, "build_projections", build)


async def load(config: Config, items: list[tuple[float, BaseEvent]]) -> None:
    store = open_store(config.store)
    await store.open()
    try:
        await store.restore(envelopes(items))  # type: ignore[attr-defined]
    finally:
        await store.close()


async def states(config: Config) -> tuple[dict[str, Any], int]:
    """Every projection's state after a start-up (snapshot + tail), and the head."""
    snapshotter = Snapshotter(config)
    store, projections = await snapshotter.open_log()
    try:
        return {n: p.state() for n, p in projections.parts.items()}, await store.head()
    finally:
        await store.close()


async def compact(config: Config, now: float, dry_run: bool = False) -> Any:
    async with offline(config) as compactor:
        compactor.clock = lambda: now
        before = {n: p.state() for n, p in compactor.runtime.projections.parts.items()}
        report = await compactor.compact(dry_run=dry_run)
    return before, report


# --- histories ---


def registrations() -> list[tuple[float, BaseEvent]]:
    return [
        (T0, NodeRegistered(node_id=n, name=n, node_type="sensor", public_key=KEY)) for n in NODES
    ]


ids = itertools.count()


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[float, BaseEvent]]:
    """Registrations, then heartbeats, samples, challenges and messages (sent, read one by one
    or in batches, expired, dead-lettered, redriven) over 30 days, in time order."""
    items = registrations()
    ts = T0
    sent: list[str] = []
    for _ in range(draw(st.integers(0, 80))):
        ts += draw(st.floats(0, 2 * DAY))
        kind = draw(
            st.sampled_from(["hb", "tel", "chl", "send", "read", "batch", "exp", "dead", "redrive"])
        )
        node = draw(st.sampled_from(NODES))
        if kind == "hb":
            event: BaseEvent = NodeHeartbeat(node_id=node, status="ok")
        elif kind == "tel":
            event = TelemetryRecorded(
                tenant_id="t1", uptime=ts, active_users=1, exercises_completed_today=0
            )
        elif kind == "chl":
            event = ChallengeUsed(challenge_id=f"chl:{next(ids)}", node_id=node)
        elif kind == "send" or not sent:
            mid = f"m{next(ids)}"
            sent.append(mid)
            to = tuple(draw(st.sets(st.sampled_from(NODES), min_size=1, max_size=2)))
            key = draw(st.sampled_from([None, None, "k1"]))
            event = MessageSent(
                message_id=mid, from_node="n1", to_nodes=to, message_type="t", idempotency_key=key
            )
        else:
            mid = draw(st.sampled_from(sent))
            if kind == "read":
                event = MessageRead(message_id=mid, node_id=node)
            elif kind == "batch":
                more = draw(st.lists(st.sampled_from(sent), max_size=2))
                event = MessagesRead(node_id=node, message_ids=[mid, *more])
            elif kind == "exp":
                event = MessageExpired(message_id=mid, node_ids=[node])
            elif kind == "dead":
                event = MessageDeadLettered(message_id=mid, node_id=node, attempts=3)
            else:
                event = MessageRedriven(message_id=mid, node_id=node)
        items.append((ts, event))
    return items


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=histories(), age=st.floats(0, 40))
def test_a_start_after_compaction_rebuilds_the_state_from_before(
    tmp_path_factory: pytest.TempPathFactory, small_window: None, history: Any, age: float
) -> None:
    tmp = tmp_path_factory.mktemp("compact")
    config = make_config(tmp)

    async def run() -> None:
        await load(config, history)
        before, report = await compact(config, history[-1][0] + age * DAY)
        after, head = await states(config)
        assert after == before
        assert head >= len(history)
        await asyncio.to_thread(verify_file, config.store.path)
        # a second compaction (its cut now past the first's own event) keeps the state too
        await compact(config, history[-1][0] + age * DAY)
        assert (await states(config))[0] == before
        await asyncio.to_thread(verify_file, config.store.path)

    asyncio.run(run())


async def test_old_samples_go_the_newest_per_stream_and_audit_events_stay(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    items = registrations()
    for day in range(20):
        for n in NODES:
            items.append((T0 + day * DAY, NodeHeartbeat(node_id=n)))
        items.append((T0 + day * DAY, ChallengeUsed(challenge_id=f"chl:{day}", node_id="n1")))
    # n3 stopped on day 1: its last heartbeat is old, and stays
    items = [
        i
        for i in items
        if not (i[1].stream == "n3" and i[0] > T0 + DAY and isinstance(i[1], NodeHeartbeat))
    ]
    await load(config, items)
    now = T0 + 20 * DAY
    _, dry = await compact(config, now, dry_run=True)
    before, report = await compact(config, now)
    assert dry.removed == report.removed
    # heartbeats older than 7 days go, but n3's last one; challenges older than a day
    assert report.removed["node.heartbeat"] == 2 * 13 + 1
    assert report.removed["auth.challenge_used"] == 19
    assert report.kept_by_type["node.registered"] == 3
    store = open_store(config.store, readonly=True)
    await store.open()
    try:
        kept = [env async for env in store.read(1)]
    finally:
        await store.close()
    assert {e.type for e in kept} >= {"node.registered", "log.compacted"}
    beats = [e for e in kept if e.type == "node.heartbeat" and e.stream == "n3"]
    assert len(beats) == 1
    assert (await states(config))[0] == before
    assert await asyncio.to_thread(verify_file, config.store.path) >= len(items)


async def test_messages_let_go_are_forgotten_and_their_ids_may_be_sent_again(
    tmp_path: Path, small_window: None
) -> None:
    """Messages read and let go (past `retain_completed`) and older than their retention go
    with every event of theirs, and so do their stream versions: the `streams` table keeps no
    row a message at a time for ever, and the id (an idempotency key's) may be sent again."""
    config = make_config(tmp_path)
    items = registrations()
    for i in range(5):  # m0 and m1 are let go (3 completed are kept), m2-m4 stay
        sent = MessageSent(message_id=f"m{i}", from_node="n1", to_nodes=("n2",), message_type="t")
        items += [(T0 + i, sent), (T0 + i, MessageRead(message_id=f"m{i}", node_id="n2"))]
    pending = MessageSent(message_id="p", from_node="n1", to_nodes=("n3",), message_type="t")
    items.append((T0 + 9, pending))
    await load(config, items)
    _, dry = await compact(config, T0 + 20 * DAY, dry_run=True)
    before, report = await compact(config, T0 + 20 * DAY)
    assert dry.streams_forgotten == report.streams_forgotten == 2
    assert report.removed["message.sent"] == 2 and report.removed["message.read"] == 2
    store = open_store(config.store)
    await store.open()
    try:
        versions = {s: await store.stream_version(s) for s in ("m0", "m1", "m2", "p")}
        assert versions == {"m0": 0, "m1": 0, "m2": 2, "p": 1}
        again = MessageSent(message_id="m0", from_node="n1", to_nodes=("n2",), message_type="t")
        [env] = await store.append([again], 0)
        assert env.stream_version == 1
    finally:
        await store.close()
    assert (await states(config))[0]["messages"] != before["messages"]  # m0 is back, queued
    await asyncio.to_thread(verify_file, config.store.path)


async def _compacted_log(tmp_path: Path) -> Config:
    config = make_config(tmp_path)
    items = registrations()
    for day in range(12):
        for n in NODES:
            items.append((T0 + day * DAY, NodeHeartbeat(node_id=n)))
    await load(config, items)
    await compact(config, T0 + 12 * DAY)
    return config


def _edit(path: str, fn: Any) -> None:
    """Rewrite the log's rows with `fn(conn)` (a test's tampering), checksums kept valid."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        fn(conn)
        conn.commit()
    finally:
        conn.close()


def _records(conn: Any) -> list[Any]:
    from eventstore.sqlite_verify import decode_chunk

    rows = conn.execute("SELECT first_seq, last_seq, body, crc FROM chunks ORDER BY first_seq")
    return [rec for row in rows.fetchall() for rec in decode_chunk(row)]


def _rewrite(conn: Any, records: list[Any]) -> None:
    import msgspec

    from eventstore import integrity

    conn.execute("DELETE FROM chunks")
    body = msgspec.msgpack.encode(records)
    conn.execute(
        "INSERT INTO chunks VALUES (?, ?, ?, ?)",
        (records[0].seq, records[-1].seq, body, integrity.checksum(body)),
    )


async def test_verify_after_compaction_names_the_seq_of_a_flipped_bit(tmp_path: Path) -> None:
    config = await _compacted_log(tmp_path)
    await asyncio.to_thread(verify_file, config.store.path)

    def flip(conn: Any) -> None:
        records = _records(conn)
        target = next(r for r in records if r.type == "node.heartbeat")
        target.data = target.data.replace(b"n", b"m", 1)
        _rewrite(conn, records)
        flip.seq = target.seq  # type: ignore[attr-defined]

    await asyncio.to_thread(_edit, config.store.path, flip)
    with pytest.raises(IntegrityError) as info:
        await asyncio.to_thread(verify_file, config.store.path)
    assert info.value.seq == flip.seq  # type: ignore[attr-defined]


async def test_verify_reports_a_gap_no_compaction_recorded(tmp_path: Path) -> None:
    config = await _compacted_log(tmp_path)

    def drop(conn: Any) -> None:
        records = _records(conn)
        last_beats = [r for r in records if r.type == "node.heartbeat"]
        victim = last_beats[-1]  # a kept event
        drop.seq = victim.seq  # type: ignore[attr-defined]
        _rewrite(conn, [r for r in records if r.seq != victim.seq])

    await asyncio.to_thread(_edit, config.store.path, drop)
    with pytest.raises(IntegrityError) as info:
        await asyncio.to_thread(verify_file, config.store.path)
    assert info.value.seq == drop.seq  # type: ignore[attr-defined]
    assert "no compaction recorded" in info.value.reason


async def test_verify_reports_a_reordered_kept_event(tmp_path: Path) -> None:
    config = await _compacted_log(tmp_path)

    def swap(conn: Any) -> None:
        records = _records(conn)
        a, b = records[-2], records[-1]
        a.seq, b.seq = b.seq, a.seq
        records[-2], records[-1] = b, a
        swap.seq = records[-2].seq  # type: ignore[attr-defined]
        _rewrite(conn, records)

    await asyncio.to_thread(_edit, config.store.path, swap)
    with pytest.raises(IntegrityError) as info:
        await asyncio.to_thread(verify_file, config.store.path)
    assert info.value.seq == swap.seq  # type: ignore[attr-defined]


async def test_verify_reports_a_gap_record_changed(tmp_path: Path) -> None:
    config = await _compacted_log(tmp_path)

    def widen(conn: Any) -> None:
        first, last = conn.execute(
            "SELECT first_seq, last_seq FROM gaps ORDER BY first_seq"
        ).fetchone()
        conn.execute("UPDATE gaps SET anchor = ? WHERE first_seq = ?", (bytes(32), first))
        widen.seq = last + 1  # type: ignore[attr-defined]

    await asyncio.to_thread(_edit, config.store.path, widen)
    with pytest.raises(IntegrityError) as info:
        await asyncio.to_thread(verify_file, config.store.path)
    assert info.value.seq == widen.seq  # type: ignore[attr-defined]


ROOT = Path(__file__).resolve().parents[2]


async def _load_in_small_chunks(config: Config, items: list[tuple[float, BaseEvent]]) -> None:
    store = open_store(config.store)
    await store.open()
    try:
        envs = envelopes(items)
        for i in range(0, len(envs), 20):  # many small chunks: many transactions to kill
            await store.restore(envs[i : i + 20])  # type: ignore[attr-defined]
    finally:
        await store.close()


async def _check_after_kill(config: Config, acked: list[int]) -> None:
    await asyncio.to_thread(verify_file, config.store.path)
    state, head = await states(config)
    assert head >= max(acked, default=0)
    store = open_store(config.store, readonly=True)
    await store.open()
    try:
        live = [env.seq async for env in store.read(1) if env.stream == "live"]
    finally:
        await store.close()
    assert set(acked) <= set(live)  # every acknowledged append is there
    # the next compaction finishes what was left, and the state holds
    await compact(config, T0 + 30 * DAY)
    assert (await states(config))[0]["nodes"] == state["nodes"]
    await asyncio.to_thread(verify_file, config.store.path)


def test_kill_9_at_any_moment_of_a_compaction_leaves_a_log_that_starts_and_verifies(
    tmp_path: Path,
) -> None:
    import os
    import random
    import signal
    import subprocess
    import sys

    rng = random.Random(16)
    items = registrations()
    for hour in range(20 * 24):
        items += [(T0 + hour * 3600, NodeHeartbeat(node_id=n)) for n in NODES]
    for round_no in range(6):
        tmp = tmp_path / f"r{round_no}"
        config = make_config(tmp)
        asyncio.run(_load_in_small_chunks(config, items))
        kill_at = rng.randint(0, 60)  # progress lines seen before the kill (0: at the start)
        child = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("compaction_child.py")),
                str(tmp / "data"),
            ],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            text=True,
        )
        assert child.stdout is not None
        acked: list[int] = []
        seen = 0
        for line in child.stdout:
            word, _, value = line.partition(" ")
            if word == "acked":
                acked.append(int(value))
            elif word == "progress":
                seen += 1
            if seen >= kill_at or word == "done":
                break
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        asyncio.run(_check_after_kill(config, acked))
