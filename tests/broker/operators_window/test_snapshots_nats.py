"""Snapshots on the NATS backend, against the real nats-server: kept in the stream's object store
bucket, a new instance (its own data_dir) starts from the newest one plus the stream's tail, and
ends in the state of a full replay; a damaged, foreign or garbage snapshot is passed over with
the reason and the instance still starts; optimistic concurrency holds after such a start."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config
from broker.keys import RUNTIME, SNAPSHOTS
from broker.upkeep.snapshot_store import bucket_name
from broker.upkeep.snapshots import Snapshotter
from eventstore.base import ConcurrencyError
from eventstore.events import LogNote
from eventstore.nats import NatsStore
from tests.helpers.events import history
from tests.helpers.snapshots import run_app, state
from tests.nats_server import delete_stream, nats_config, private_stream, unique_stream


@pytest.fixture
async def stream() -> AsyncIterator[tuple[str, str]]:
    async with private_stream("SNAP") as found:
        yield found


async def objects(url: str, stream: str) -> dict[str, bytes]:
    """The snapshots in the stream's bucket, by name."""
    nc = await nats.connect(url)
    try:
        obs = await nc.jetstream().object_store(bucket_name(stream))
        infos = await obs.list(ignore_deletes=True)
        return {i.name: (await obs.get(i.name)).data or b"" for i in infos}
    finally:
        await nc.close()


async def put(url: str, stream: str, name: str, data: bytes) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            obs = await js.object_store(bucket_name(stream))
        except nats.js.errors.BucketNotFoundError:
            obs = await js.create_object_store(bucket_name(stream))
        await obs.put(name, io.BytesIO(data))
    finally:
        await nc.close()


async def with_snapshots(config: Config, events: list[Any], every: int) -> dict[str, Any]:
    """Start an instance, append `events` taking a snapshot after every `every`, stop it."""
    app = create_app(config)
    async with TestClient(TestServer(app)) as client:
        runtime, snapshotter = client.app[RUNTIME], client.app[SNAPSHOTS]
        for i in range(0, len(events), every):
            await runtime.record(events[i : i + every])
            assert await snapshotter.take() is not None
        head, final = await runtime.store.head(), state(runtime.projections)
        return {"head": head, "final": final, "boot": snapshotter.boot}


async def test_a_new_instance_starts_from_the_snapshot_plus_the_tail(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    first = await with_snapshots(nats_config(tmp_path / "a", url, name), history(300), 100)
    assert first["boot"].seq == 0 and not first["boot"].ignored  # no bucket yet: nothing to say
    saved = await objects(url, name)
    assert sorted(saved) == ["snapshot-000000000200.msgpack", "snapshot-000000000300.msgpack"]
    # another instance appends a tail and writes no snapshot
    tail = history(120, seed=3)
    second = await run_app(nats_config(tmp_path / "b", url, name, enabled=False), tail)
    assert second["head"] == first["head"] + len(tail)
    # a new instance, on a fresh data_dir: the snapshot, then only the tail
    joined = await run_app(nats_config(tmp_path / "c", url, name))
    boot = joined["boot"]
    assert boot.seq == first["head"] and not boot.ignored and not boot.replayed
    assert boot.path.startswith(f"nats:{bucket_name(name)}/")
    assert 0 < boot.log_from < second["head"]  # the store consumed the stream from there on
    full = await run_app(nats_config(tmp_path / "d", url, name, enabled=False))
    assert full["boot"].seq == 0
    assert joined["at_start"] == second["final"] == full["at_start"]
    assert joined["windows"] == joined["exact"]


async def test_a_damaged_snapshot_falls_back_to_the_older_one(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    first = await with_snapshots(nats_config(tmp_path / "a", url, name), history(250), 100)
    saved = sorted(await objects(url, name))
    newest, older = saved[-1], saved[-2]
    data = bytearray((await objects(url, name))[newest])
    data[-10] ^= 0xFF
    await put(url, name, newest, bytes(data))
    joined = await run_app(nats_config(tmp_path / "b", url, name))
    boot = joined["boot"]
    assert boot.path.endswith(older) and 0 < boot.seq < first["head"]
    assert len(boot.ignored) == 1 and "damaged" in boot.ignored[0][1]
    assert joined["at_start"] == first["final"]


async def test_foreign_and_garbage_snapshots_are_ignored(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    other = unique_stream("SNAP")
    try:
        first_a = await run_app(nats_config(tmp_path / "a", url, other), history(300, seed=1))
        first_b = await run_app(
            nats_config(tmp_path / "b", url, name, enabled=False), history(300, seed=2)
        )
        # A's snapshot (same seq) in B's bucket: not B's stream; and one that is not a snapshot
        for key, data in (await objects(url, other)).items():
            await put(url, name, key, data)
        await put(url, name, "snapshot-999999999999.msgpack", b"not a snapshot at all")
        joined = await run_app(nats_config(tmp_path / "c", url, name))
    finally:
        await delete_stream(url, other)
    boot = joined["boot"]
    assert boot.seq == 0 and len(boot.ignored) == 2
    reasons = " ".join(r for _, r in boot.ignored)
    assert "bad magic" in reasons and "not the one it was taken at" in reasons
    assert joined["at_start"] == first_b["final"] != first_a["final"]


async def test_concurrency_holds_after_joining_from_a_snapshot(
    tmp_path: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    notes = [LogNote(stream_id="ledger", text=str(i)) for i in range(5)]
    await run_app(nats_config(tmp_path / "a", url, name), [*notes, *history(50)])
    config = nats_config(tmp_path / "b", url, name)
    snapshotter = Snapshotter(config)
    store, _projections = await snapshotter.open_log()
    try:
        assert snapshotter.boot.seq > 0 and snapshotter.boot.log_from > 0
        assert isinstance(store, NatsStore)
        assert await store.stream_version("ledger") == 5  # from the loaded index
        with pytest.raises(ConcurrencyError):
            await store.append([LogNote(stream_id="ledger", text="stale")], expected_version=4)
        envs = await store.append([LogNote(stream_id="ledger", text="ok")], expected_version=5)
        assert envs[0].stream_version == 6
    finally:
        await store.close()


async def test_snapshots_go_over_the_logs_tls(tmp_path: Path) -> None:
    """The snapshot bucket is reached with the log's TLS settings (a tls:// URL and its CA)."""
    from tests.helpers.nats_tls import tls_args
    from tests.nats_server import NatsServer
    from tests.tlscerts import TestCA

    ca = TestCA(tmp_path / "pki")
    with NatsServer(tmp_path / "nats", extra_args=tls_args(ca.issue("nats"))) as server:
        url = server.url.replace("nats://", "tls://")

        def cfg(where: str) -> Config:
            config = nats_config(tmp_path / where, url, "TLS_SNAP")
            config.store.tls_ca = str(ca.path)
            return config

        first = await with_snapshots(cfg("a"), history(100), 100)
        joined = await run_app(cfg("b"))
    assert joined["boot"].seq == first["head"] == 100 and not joined["boot"].ignored
    assert joined["at_start"] == first["final"]
