"""Snapshots: snapshot + tail equals a full replay; start-up loads the newest valid snapshot and
ignores a damaged, stale or foreign one; the SQLite chain is verified from the snapshot on."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.app import create_app
from broker.config import Config, SnapshotsConfig
from broker.keys import RUNTIME, SNAPSHOTS
from broker.runtime import build_projections
from broker.upkeep import snapshots
from broker.upkeep.snapshot_file import read_body, read_header
from broker.upkeep.snapshot_write import encode_parts, slice_decoders, write_snapshot
from broker.upkeep.snapshots import WINDOW, Snapshotter, snapshot_paths, window_ranges
from eventstore.base import IntegrityError
from eventstore.events import BaseEvent, LogNote, UpdatePublished, UpdateWithdrawn
from eventstore.memory import MemoryStore
from eventstore.sqlite import SqliteStore, hash_at_file, verify_file
from projections.base import Projection, Projections
from projections.snapshots import Unsupported, check_fields, encoder
from projections.tenants import TenantsProjection
from projections.updates import UpdatesProjection
from tests.conftest import make_config
from tests.helpers.events import event_strategy, history
from tests.helpers.snapshots import run_app, state

Client = TestClient  # type: ignore[type-arg]


def config_in(tmp_path: Path, every: int = 100_000) -> Config:
    config = make_config(tmp_path)
    config.snapshots = SnapshotsConfig(every=every, keep=2, min_interval=0)
    return config


# --- snapshot + tail == full replay ---


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event_strategy(), max_size=60),
    cut=st.floats(0, 1),
)
def test_snapshot_plus_tail_equals_full_replay(events: list[BaseEvent], cut: float) -> None:
    async def scenario() -> None:
        store = MemoryStore()
        await store.open()
        for e in events:
            await store.append([e])
        envs = [env async for env in store.read()]
        k = int(len(envs) * cut)
        full = build_projections()
        full.apply_many(envs)
        # the snapshot at k, through its file, as start-up reads it
        at_k = build_projections()
        at_k.apply_many(envs[:k])
        body = await through_a_file(at_k)  # (messages: its delivery queue is replayed)
        loaded = await Snapshotter(Config())._restore(store, build_projections(), k, body)
        assert loaded.seq == k
        assert state(loaded) == state(at_k)
        # A snapshot of the loaded state, its nodes not decoded yet (their bytes written as
        # they were read), saves the records one of the replayed state saves.
        again = await through_a_file(loaded)
        assert saved(again) == saved(body)
        loaded.apply_many(envs[k:])
        assert state(loaded) == state(full)

    asyncio.run(scenario())


async def through_a_file(projections: Projections) -> Any:
    """Write `projections` as a snapshot file and read it back as start-up does."""

    async def hash_at(seq: int) -> bytes:
        return seq.to_bytes(32, "big")

    with tempfile.TemporaryDirectory() as directory:
        taken = await write_snapshot(projections, Path(directory), hash_at, dict, keep=1)
        assert taken is not None and taken.seq == projections.seq
        header = await asyncio.to_thread(read_header, taken.path)
        assert header.log_hash == await hash_at(projections.seq)
        wanted = slice_decoders(build_projections())
        return await asyncio.to_thread(read_body, taken.path, header, wanted)


def saved(body: Any) -> dict[str, dict[str, bytes]]:
    """The records of a snapshot's sliced projections, each as its file holds it."""
    return {
        name: {key: encoder.encode(record) for key, record in records.items()}
        for name, records in body.records.items()
    }


@dataclass
class _Sharing(Projection):
    """Two fields holding the same objects (a dict and a list of its values)."""

    name = "sharing"
    by_id: dict[str, list[int]] = field(default_factory=dict)
    ordered: list[list[int]] = field(default_factory=list)


def test_shared_objects_are_not_saved_field_by_field() -> None:
    sharing = _Sharing()
    sharing.by_id["a"] = [1]
    sharing.ordered.append(sharing.by_id["a"])
    with pytest.raises(Unsupported, match="share objects"):
        check_fields(sharing)  # loaded back field by field, the two copies would part ways
    parts, skipped = encode_parts(Projections([sharing]))
    assert "sharing" in skipped and not parts


def test_the_updates_projection_rebuilds_its_shared_list_at_load() -> None:
    updates = UpdatesProjection()
    for seq, version in enumerate(["1.0.0", "1.1.0", "1.0.1"], 1):
        updates.handlers()[UpdatePublished](
            _env(
                seq,
                UpdatePublished(
                    update_id=f"u{seq}", version=version, changelog="", sha256="0" * 64, file_size=1
                ),
            )
        )
    parts, skipped = encode_parts(Projections([updates]))
    assert not skipped
    restored = UpdatesProjection()
    restored.restore(parts["updates"].data)
    assert restored.state() == updates.state()
    assert [u.version for u in restored.available] == ["1.1.0", "1.0.1", "1.0.0"]
    # a withdrawal then finds the very object in `available`, as in the live projection
    restored.handlers()[UpdateWithdrawn](_env(4, UpdateWithdrawn(update_id="u2")))
    assert [u.version for u in restored.available] == ["1.0.1", "1.0.0"]


def _env(seq: int, event: BaseEvent) -> Any:
    from eventstore.base import Envelope

    return Envelope(seq, event.stream, 1, 1000.0 + seq, f"id{seq}", event)


# --- start-up ---


async def full_replay(config: Config) -> dict[str, Any]:
    store = SqliteStore(config.store.path, readonly=True)
    await store.open()
    projections = build_projections(config.delivery)
    projections.apply_many([env async for env in store.read()])
    await store.close()
    return state(projections)


async def test_start_up_loads_the_snapshot_and_replays_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tenants declared not snapshottable: rebuilt by replaying only its windows of the log
    monkeypatch.setattr(TenantsProjection, "snapshottable", False)
    config = config_in(tmp_path, every=100)
    first = await run_app(config, history(450))
    assert first["boot"].seq == 0
    directory = Snapshotter(config).directory
    files = await asyncio.to_thread(snapshot_paths, directory)
    assert len(files) == 2  # periodic ones pruned to `keep`, the newest written at shutdown
    assert files[0][0] == first["head"]
    second = await run_app(config)
    boot = second["boot"]
    assert boot.seq == first["head"] and not boot.ignored
    assert "tenants" in boot.replayed and "users" not in boot.replayed
    assert second["at_start"] == first["final"] == await full_replay(config)
    # where each projection's events are, so a replayed one reads only those windows
    assert first["windows"] == first["exact"] and second["windows"] == second["exact"]


def test_window_ranges() -> None:
    w = WINDOW
    assert window_ranges([], 10 * w) == []
    assert window_ranges([0], 10) == [(1, 10)]
    assert window_ranges([0, 1, 3], 10 * w) == [(1, 2 * w - 1), (3 * w, 4 * w - 1)]
    assert window_ranges([2, 5], 2 * w + 7) == [(2 * w, 2 * w + 7)]


async def test_a_damaged_snapshot_falls_back_to_the_older_one(tmp_path: Path) -> None:
    config = config_in(tmp_path, every=100)
    first = await run_app(config, history(250))
    directory = Snapshotter(config).directory
    (newest_seq, newest), (older_seq, _older) = await asyncio.to_thread(snapshot_paths, directory)
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    second = await run_app(config)
    boot = second["boot"]
    assert boot.seq == older_seq < newest_seq
    assert boot.ignored and "damaged" in boot.ignored[0][1]
    assert second["at_start"] == first["final"]


async def test_garbage_and_foreign_snapshots_are_ignored(tmp_path: Path) -> None:
    a = config_in(tmp_path / "a")
    first_a = await run_app(a, history(300, seed=1))
    b = config_in(tmp_path / "b")
    first_b = await run_app(b, history(300, seed=2))
    dir_a, dir_b = Snapshotter(a).directory, Snapshotter(b).directory
    shutil.rmtree(dir_b)
    shutil.copytree(dir_a, dir_b)  # A's snapshot, same seq, on B's log: not B's history
    (dir_b / "snapshot-999999999999.msgpack").write_bytes(b"not a snapshot at all")
    second = await run_app(b)
    boot = second["boot"]
    assert boot.seq == 0 and len(boot.ignored) == 2
    reasons = " ".join(r for _, r in boot.ignored)
    assert "bad magic" in reasons and "differs" in reasons
    assert second["at_start"] == first_b["final"] != first_a["final"]


async def test_a_log_behind_the_newest_snapshot_is_refused(tmp_path: Path) -> None:
    """The log was lost, emptied or replaced by a shorter one: starting would serve an empty
    or older state as if healthy. It is refused, and a lost log is not created anew."""
    a = config_in(tmp_path / "a")
    first = await run_app(a, history(300, seed=1))
    directory = Snapshotter(a).directory
    newest = (await asyncio.to_thread(snapshot_paths, directory))[0][0]
    assert newest == first["head"]
    c = config_in(tmp_path / "c")  # a shorter log beside A's snapshots
    short = (await run_app(c, history(10, seed=3)))["head"]
    await asyncio.to_thread(shutil.rmtree, Snapshotter(c).directory)
    await asyncio.to_thread(shutil.copytree, directory, Snapshotter(c).directory)
    expected = rf"the log ends at seq {short} but snapshot \S+ covers up to seq {newest}: the log "
    with pytest.raises(IntegrityError, match=expected + "was lost or replaced"):
        await run_app(c)
    log = Path(a.store.path)
    for name in (log.name, log.name + "-wal", log.name + "-shm", log.name + ".head"):
        await asyncio.to_thread(log.with_name(name).unlink, True)  # the log is lost
    with pytest.raises(IntegrityError, match=rf"the log ends at seq 0 but .* up to seq {newest}"):
        await run_app(a)
    assert not await asyncio.to_thread(log.exists)


async def test_disabled_snapshots_write_nothing(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    config.snapshots.enabled = False
    await run_app(config, history(20))
    assert not await asyncio.to_thread(snapshot_paths, Snapshotter(config).directory)


# --- the chain is verified after the snapshot's seq only ---


async def test_verify_from_a_trusted_position(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteStore(path)
    await store.open()
    for i in range(0, 10_000, 1000):
        await store.append([LogNote(text=str(j)) for j in range(i, i + 1000)])
    h = await store.hash_at(6000)
    assert h is not None and h == await asyncio.to_thread(hash_at_file, path, 6000)
    assert await store.hash_at(10_000) == await asyncio.to_thread(hash_at_file, path, 10_000)
    assert await store.hash_at(10_001) is None
    await store.close()
    assert await asyncio.to_thread(verify_file, path, trusted=(6000, h)) == 10_000
    with pytest.raises(IntegrityError, match="trusted"):
        await asyncio.to_thread(verify_file, path, trusted=(6000, bytes(32)))
    with pytest.raises(IntegrityError, match="ends before"):
        await asyncio.to_thread(verify_file, path, trusted=(20_000, h))
    assert await asyncio.to_thread(hash_at_file, path, 20_000) is None
    assert await asyncio.to_thread(hash_at_file, tmp_path / "nope.db", 1) is None


class _Log:
    """Records what the snapshotter logs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = exception = _record


class Clocked:
    """A started server whose snapshotter runs on a clock the test moves (`clock[0]`)."""

    def __init__(self, client: Client) -> None:
        self.snap, self.runtime = client.app[SNAPSHOTS], client.app[RUNTIME]
        self.clock = [1000.0]
        self.snap.now = lambda: self.clock[0]
        self.snap.last_at = self.clock[0]

    async def append(self, n: int) -> None:
        """`n` events, one commit each, each followed by the snapshot it started, if any."""
        for i in range(n):
            await self.runtime.record([LogNote(stream_id="s", text=str(i))])
            await self.snap.wait()


@contextlib.asynccontextmanager
async def clocked(config: Config) -> AsyncIterator[Clocked]:
    async with TestClient(TestServer(create_app(config))) as client:
        yield Clocked(client)


async def test_a_failing_snapshot_backs_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot that cannot be written is retried after `every` more events and a delay
    doubling from 1 s, logged once per failure: not on every append (it was, at 100% CPU)."""
    config = config_in(tmp_path, every=10)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where the snapshot directory should be")
    config.snapshots.directory = str(blocker)
    attempts: list[int] = []
    write = snapshots.write_snapshot

    async def counting(projections: Projections, *args: Any) -> Any:
        attempts.append(projections.seq)
        return await write(projections, *args)

    monkeypatch.setattr(snapshots, "write_snapshot", counting)
    logged = _Log()
    monkeypatch.setattr(snapshots, "log", logged)
    async with clocked(config) as server:
        snap, clock, append = server.snap, server.clock, server.append

        def failures() -> list[dict[str, Any]]:
            return [f for e, f in logged.events if e == "snapshot_failed"]

        await append(200)
        assert len(attempts) == 1 and snap.failures == 1
        assert failures() == [{"failures": 1, "retry_after_events": 10, "retry_after_seconds": 1.0}]
        clock[0] += 1.5  # past the delay, and more than `every` events since: one more try
        await append(1)
        assert len(attempts) == 2 and failures()[-1]["retry_after_seconds"] == 2.0
        clock[0] += 1.5  # not yet past the doubled delay
        await append(30)
        assert len(attempts) == 2
        clock[0] += 1.0
        await append(1)
        assert len(attempts) == 3 and failures()[-1]["retry_after_seconds"] == 4.0
        clock[0] += 10.0
        await append(5)  # past the delay, but fewer than `every` events since the failure
        assert len(attempts) == 3
        await append(5)
        assert len(attempts) == 4 and len(failures()) == 4
        blocker.unlink()  # the directory can be made again: the next try succeeds
        clock[0] += 100.0
        await append(10)
        assert len(attempts) == 5 and snap.failures == 0
        assert await asyncio.to_thread(snapshot_paths, blocker)


async def test_snapshots_are_due_by_events_or_time_but_never_too_often(tmp_path: Path) -> None:
    """`every` events or `interval` seconds with something new, never within `min_interval`."""
    config = config_in(tmp_path, every=50)
    config.snapshots.interval, config.snapshots.min_interval = 100.0, 10.0
    async with clocked(config) as server:
        snap, runtime, clock, append = server.snap, server.runtime, server.clock, server.append
        await append(60)  # past `every`, but within min_interval of the start
        assert snap.last_seq == 0
        clock[0] += 10.0
        await append(1)  # now due by events
        first = snap.last_seq
        assert first == await runtime.store.head()
        clock[0] += 50.0
        await append(5)  # few events, before `interval`: not due
        assert snap.last_seq == first
        clock[0] += 50.0
        await append(1)  # `interval` passed with something new: due by time
        assert snap.last_seq == await runtime.store.head() > first
