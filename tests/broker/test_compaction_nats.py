"""Compaction on the NATS backend (eventstore/nats_compact.py, broker/upkeep/compaction.py),
against the real nats-server: removable events go to subjects of their own and are purged up to
the snapshot taken first; an instance starting after it, from that snapshot plus the tail, has
the state of the instance that compacted; verify passes, and reports messages gone that no
compaction recorded; an instance without a covering snapshot refuses the stream; a compaction
interrupted between its record and its purge is finished by the next one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from broker.config import Config
from broker.upkeep.compaction import Report, offline
from broker.upkeep.snapshot_store import index_from
from broker.upkeep.snapshots import Snapshotter
from eventstore.base import IntegrityError
from eventstore.events import BaseEvent, NodeHeartbeat
from eventstore.nats import NatsStore
from eventstore.nats_verify import verify_stream
from eventstore.nats_wire import removable_subject, subject_token
from tests.helpers.events import history
from tests.helpers.snapshots import state
from tests.nats_server import nats_config, private_stream

DAY = 86400.0


@pytest.fixture
async def stream() -> AsyncIterator[tuple[str, str]]:
    async with private_stream("COMPACT") as found:
        yield found


async def record_each(runtime: Any, events: list[BaseEvent]) -> None:
    """One append per event, as the broker records heartbeats (alone, without expectation)."""
    for event in events:
        await runtime.record([event])


async def subject_messages(url: str, stream: str, subject: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))
    finally:
        await nc.close()


async def compacted(config: Config, events: list[BaseEvent]) -> tuple[Report, dict[str, Any]]:
    """An instance records `events`, compacts as if 30 days later, and stops (a snapshot last);
    its report and its state after the compaction."""
    async with offline(config) as compactor:
        await record_each(compactor.runtime, events)
        compactor.clock = lambda: time.time() + 30 * DAY
        report = await compactor.compact()
        return report, state(compactor.runtime.projections)


async def started(config: Config) -> tuple[int, dict[str, Any], int]:
    """A new instance's start-up: the snapshot seq it started from, its state, its head."""
    snapshotter = Snapshotter(config)
    store, projections = await snapshotter.open_log()
    try:
        return snapshotter.boot.seq, state(projections), await store.head()
    finally:
        await store.close()


async def test_compaction_purges_heartbeats_and_a_new_instance_joins_after_it(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    events = history(240)
    beats = sum(isinstance(e, NodeHeartbeat) for e in events)
    assert beats > 5
    heartbeats = removable_subject(name, 1)
    dry = None
    async with offline(nats_config(tmp_path / "a", url, name)) as compactor:
        await record_each(compactor.runtime, events)
        assert await subject_messages(url, name, heartbeats) == beats  # on their own subject
        compactor.clock = lambda: time.time() + 30 * DAY
        dry = await compactor.compact(dry_run=True)
        report = await compactor.compact()
        live = state(compactor.runtime.projections)
        head = await compactor.runtime.store.head()
    assert dry.removed == report.removed and dry.removed_total == report.removed_total
    assert report.removed["node.heartbeat"] == beats  # each was recorded before the snapshot
    assert report.compaction_seq == head and report.up_to == head - 1
    assert report.log_bytes_after < report.log_bytes_before
    assert await subject_messages(url, name, heartbeats) == 0
    # a new instance (its own data_dir) starts from the snapshot and ends in the same state
    seq, joined, joined_head = await started(nats_config(tmp_path / "b", url, name))
    assert seq == head and joined_head == head and joined == live
    # more events after the compaction (one more heartbeat too), then another new instance
    tail = [*history(60, seed=3), NodeHeartbeat(node_id="node-1", metrics={})]
    async with offline(nats_config(tmp_path / "c", url, name)) as other:
        await record_each(other.runtime, tail)
        after = state(other.runtime.projections)
        assert other.runtime.projections.seq == head + len(tail)
        # (before this instance's snapshot at its stop)
        seq, joined, joined_head = await started(nats_config(tmp_path / "d", url, name))
    assert seq == head and joined_head == head + len(tail) and joined == after
    # verify: every kept event present and intact, the removed ones recorded
    config = nats_config(tmp_path / "e", url, name)
    checked = await verify_stream(config.store, None, index_from(config))
    assert checked.events == head + len(tail)
    assert checked.removed_events == report.removed_total and checked.compactions == 1
    assert checked.snapshot is not None


async def test_without_a_covering_snapshot_the_stream_is_refused(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    report, _live = await compacted(nats_config(tmp_path / "a", url, name), history(120))
    assert report.removed_total > 0
    with pytest.raises(IntegrityError, match="are gone"):
        await started(nats_config(tmp_path / "b", url, name, enabled=False))
    with pytest.raises(IntegrityError, match="are gone"):
        await verify_stream(nats_config(tmp_path / "c", url, name).store)  # no snapshot


async def test_verify_reports_messages_gone_without_a_record(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    config = nats_config(tmp_path / "a", url, name)
    events = [*history(120), NodeHeartbeat(node_id="node-9", metrics={"cpu": 1.0})]
    async with offline(config) as compactor:
        await record_each(compactor.runtime, events)
        store = compactor.runtime.store
        assert isinstance(store, NatsStore)
        # a kept event's message (a main subject), before the snapshot taken at the end
        kept = next(e for e in events if e.event_type == "node.registered")
        kept_subject = f"{name}.{subject_token(kept.stream)}"
        first_kept = [env.seq async for env in store.read(1, types=["node.registered"])][0]
    await delete_first(url, name, kept_subject)
    with pytest.raises(IntegrityError, match="no compaction recorded its removal") as caught:
        await verify_stream(config.store, None, index_from(config))
    assert caught.value.seq == first_kept


async def delete_first(url: str, stream: str, subject: str) -> None:
    """Purge the first message of `subject` as an operator could: no compaction records it."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        first = await js.get_msg(stream, seq=1, subject=subject, next=True)
        await js.purge_stream(stream, subject=subject, seq=(first.seq or 0) + 1)
    finally:
        await nc.close()


async def test_a_compaction_interrupted_after_its_record_is_finished_by_the_next(
    tmp_path: Path, stream: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, name = stream
    config = nats_config(tmp_path / "a", url, name)
    heartbeats = removable_subject(name, 1)
    events = history(150)
    async with offline(config) as compactor:
        await record_each(compactor.runtime, events)
        compactor.clock = lambda: time.time() + 30 * DAY
        store = compactor.runtime.store
        real = NatsStore.purge

        async def crash(self: NatsStore, bounds: Any) -> int:
            if not bounds:  # the first step (nothing recorded yet) goes through
                return await real(self, bounds)
            raise RuntimeError("killed between the record and the purge")

        monkeypatch.setattr(NatsStore, "purge", crash)
        with pytest.raises(RuntimeError):
            await compactor.compact()
        monkeypatch.setattr(NatsStore, "purge", real)
        beats = await subject_messages(url, name, heartbeats)
        assert beats > 0  # recorded, not purged: reads pass over them already
        assert not [env async for env in store.read(1, types=["node.heartbeat"])]
        live = state(compactor.runtime.projections)
        report = await compactor.compact()  # finishes the purge first
        assert report.removed_total == 0
        assert await subject_messages(url, name, heartbeats) == 0
        head = await store.head()
    seq, joined, joined_head = await started(nats_config(tmp_path / "b", url, name))
    assert joined_head == head and joined == live
    assert (await verify_stream(config.store, None, index_from(config))).compactions == 1


async def test_serve_compacts_a_nats_stream_on_its_schedule_and_on_request(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from broker.app import create_app
    from broker.keys import COMPACTOR, RUNTIME
    from tests.broker.identity.helpers import operator_token
    from tests.broker.operators_window.conftest import bearer

    url, name = stream
    config = nats_config(tmp_path, url, name)
    config.retention.every = 0.05  # seconds
    heartbeats = removable_subject(name, 1)

    async def removed(store: Any) -> int:
        """Heartbeats removed, as the log's log.compacted events say."""
        found = [env.event async for env in store.read(1, types=["log.compacted"])]
        return sum(e.removed.get("node.heartbeat", 0) for e in found)

    async with TestClient(TestServer(create_app(config))) as client:
        compactor, runtime = client.app[COMPACTOR], client.app[RUNTIME]
        compactor.clock = lambda: time.time() + 10 * DAY
        # a kept event after the heartbeats: the snapshot's message is past them
        await record_each(runtime, [*(NodeHeartbeat(node_id="a") for _ in range(3)), note()])
        for _ in range(100):  # compactions run before the appends removed nothing
            compactor.completed.clear()
            await asyncio.wait_for(compactor.completed.wait(), timeout=30)
            if await removed(runtime.store) == 3:
                break
        assert await subject_messages(url, name, heartbeats) == 0
        await record_each(runtime, [*(NodeHeartbeat(node_id="b") for _ in range(2)), note()])
        admin = await operator_token(client, "root", ["admin"])
        resp = await client.post("/api/v1/admin/log/compact", headers=bearer(admin))
        report = await resp.json()
        assert resp.status == 200 and not report["dry_run"], report
        assert await removed(runtime.store) == 5  # by it, or by the schedule just before
        assert await subject_messages(url, name, heartbeats) == 0
        resp = await client.get("/api/v1/admin/log", headers=bearer(admin))
        view = await resp.json()
        assert resp.status == 200 and view["backend"] == "nats" and view["log_bytes"] > 0, view
        last = view["last_compaction"]
        assert last is not None and last["removed"].get("node.heartbeat", 0) > 0, view
        assert view["removed_events"] == sum(last["removed"].values())


def note() -> BaseEvent:
    from eventstore.events import LogNote

    return LogNote(stream_id="notes", text="kept")


async def test_a_stream_that_denies_purges_keeps_working_without_compaction(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    """A stream created before compaction on NATS (deny_purge, which JetStream cannot lift):
    it is read and written as before; compaction says why it cannot run; verify warns."""
    from nats.js import api

    from broker.errors import CompactionUnavailable

    url, name = stream
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(
            api.StreamConfig(
                name=name,
                subjects=[f"{name}.*"],
                storage=api.StorageType.FILE,
                deny_delete=True,
                deny_purge=True,
                allow_direct=True,
            )
        )
    finally:
        await nc.close()
    config = nats_config(tmp_path / "a", url, name)
    async with offline(config) as compactor:
        await record_each(compactor.runtime, history(40))
        compactor.clock = lambda: time.time() + 30 * DAY
        with pytest.raises(CompactionUnavailable, match="denies purges"):
            await compactor.compact()
        head = await compactor.runtime.store.head()
    checked = await verify_stream(config.store, None, index_from(config))
    assert checked.events == head and checked.removed_events == 0
    assert any("denies purges" in w for w in checked.warnings)
