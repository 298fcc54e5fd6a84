"""One contract suite for every EventStore backend (STYLE.md 5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventstore import open_store
from eventstore.base import (
    ConcurrencyError,
    Envelope,
    EventNotEncodable,
    EventStore,
    StoreConfig,
    SubscriberTooSlow,
)
from eventstore.events import LogNote, NodeHeartbeat, UserActivated
from tests.nats_server import delete_stream, require_nats, unique_stream

BACKENDS = ["memory", "sqlite", "nats"]  # nats: skipped without a server, failed in CI


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    config = StoreConfig(backend=request.param, path=str(tmp_path / "log.db"))
    if request.param == "nats":  # a real nats-server; a stream of its own per test
        config = StoreConfig(backend="nats", url=require_nats(), stream=unique_stream())
    s = open_store(config)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
        if request.param == "nats":
            await delete_stream(config.url, config.stream)


def note(stream: str = "s", text: str = "") -> LogNote:
    return LogNote(stream_id=stream, text=text)


async def collect(it: AsyncIterator[Envelope]) -> list[Envelope]:
    return [env async for env in it]


async def test_empty_log(store: EventStore) -> None:
    assert await store.head() == 0
    assert await collect(store.read()) == []
    assert await store.stream_version("nope") == 0


async def test_append_returns_gap_free_envelopes(store: EventStore) -> None:
    first = await store.append([note("a", "1"), note("b", "2")])
    second = await store.append([note("a", "3")])
    assert [e.seq for e in first + second] == [1, 2, 3]
    assert [(e.stream, e.stream_version) for e in first + second] == [("a", 1), ("b", 1), ("a", 2)]
    assert len({e.id for e in first + second}) == 3
    assert first[0].ts <= first[1].ts <= second[0].ts
    assert await store.head() == 3
    assert await store.stream_version("a") == 2
    read = await collect(store.read())
    assert read == first + second
    assert read[2].event == note("a", "3")
    assert read[0].type == "system.note"


async def test_read_ranges_and_type_filters(store: EventStore) -> None:
    await store.append([note("a", str(i)) for i in range(5)])
    await store.append([UserActivated(user_id="u1")])
    assert [e.seq for e in await collect(store.read(2, 4))] == [2, 3, 4]
    assert [e.seq for e in await collect(store.read(5))] == [5, 6]
    assert [e.seq for e in await collect(store.read(types=["user.activated"]))] == [6]
    assert [e.seq for e in await collect(store.read(types=["user.*"]))] == [6]
    assert len(await collect(store.read(types=["system.*", "user.activated"]))) == 6
    assert await collect(store.read(7)) == []


async def test_expected_version_refuses_stale_writes(store: EventStore) -> None:
    await store.append([note("a")], expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        await store.append([note("a")], expected_version=0)
    assert info.value.actual == 1
    await store.append([note("a")], expected_version=1)
    with pytest.raises(ConcurrencyError):
        await store.append([note("b"), note("a")], expected_version={"a": 1})
    assert await store.head() == 2  # nothing of the refused batch was recorded
    assert await store.stream_version("b") == 0


async def test_racing_creations_exactly_one_wins(store: EventStore) -> None:
    results = await asyncio.gather(
        *(store.append([note("node-1", str(i))], expected_version=0) for i in range(20)),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(r, ConcurrencyError) for r in results if r not in wins)
    assert await store.stream_version("node-1") == 1


async def test_concurrent_appenders_all_resolved_gap_free(store: EventStore) -> None:
    results = await asyncio.gather(*(store.append([note(f"s{i}", str(i))]) for i in range(500)))
    seqs = sorted(env.seq for envs in results for env in envs)
    assert seqs == list(range(1, 501))
    logged = await collect(store.read())
    assert [e.seq for e in logged] == seqs
    by_seq = {env.seq: env for envs in results for env in envs}
    assert all(by_seq[e.seq] == e for e in logged)


async def test_an_unencodable_event_fails_its_own_append_only(store: EventStore) -> None:
    """An integer outside msgpack's range (a free-form field) is refused with EventNotEncodable
    naming the event and the value's path; the appends beside it, in the same group commit,
    are recorded."""
    too_big = NodeHeartbeat(node_id="n1", metrics={"cpu": 2**64})
    too_small = LogNote(stream_id="c", data={"x": [1, {"y": -(2**63) - 1}]})
    results = await asyncio.gather(
        store.append([note("a", "before")]),
        store.append([note("b", "same append"), too_big]),
        store.append([too_small]),
        store.append([note("d", "after")]),
        return_exceptions=True,
    )
    assert isinstance(results[1], EventNotEncodable)
    assert str(results[1]) == "node.heartbeat: integer out of range at metrics.cpu"
    assert isinstance(results[2], EventNotEncodable)
    assert str(results[2]) == "system.note: integer out of range at data.x[1].y"
    good = [env for r in (results[0], results[3]) if isinstance(r, list) for env in r]
    assert [e.seq for e in good] == [1, 2]
    assert await collect(store.read()) == good
    assert await store.stream_version("b") == 0 and await store.stream_version("n1") == 0
    assert [e.seq for e in await store.append([note("a", "next")])] == [3]


async def test_listeners_see_every_batch_in_order_before_append_returns(store: EventStore) -> None:
    seen: list[int] = []
    store.add_listener(lambda envs: seen.extend(e.seq for e in envs))
    envs = await store.append([note(), note()])
    assert seen == [1, 2] == [e.seq for e in envs]
    await asyncio.gather(*(store.append([note()]) for _ in range(50)))
    assert seen == list(range(1, 53))


async def test_subscribe_history_then_live(store: EventStore) -> None:
    await store.append([note(text=str(i)) for i in range(10)])
    got: list[int] = []

    async def follow() -> None:
        async for env in store.subscribe(3):
            got.append(env.seq)
            if env.seq == 15:
                return

    task = asyncio.create_task(follow())
    for i in range(5):
        await store.append([note(text=f"live{i}")])
    await asyncio.wait_for(task, 10)
    assert got == list(range(3, 16))


async def test_subscribe_handover_race_no_gap_no_duplicate(store: EventStore) -> None:
    """Appends racing the history/live hand-over are delivered exactly once, in order."""
    await store.append([note(text=str(i)) for i in range(300)])
    total = 300 + 40 * 5

    async def writer() -> None:
        for _ in range(40):
            await asyncio.gather(*(store.append([note()]) for _ in range(5)))

    async def reader() -> list[int]:
        seqs: list[int] = []
        async for env in store.subscribe(1, max_buffer=100_000):
            seqs.append(env.seq)
            if env.seq == total:
                return seqs
        return seqs

    reading = asyncio.create_task(reader())
    await writer()
    seqs = await asyncio.wait_for(reading, 20)
    assert seqs == list(range(1, total + 1))


async def test_slow_subscriber_is_cut_off(store: EventStore) -> None:
    sub = store.subscribe(1, max_buffer=10)
    first = asyncio.create_task(sub.__anext__())
    await store.append([note()])
    assert (await asyncio.wait_for(first, 10)).seq == 1
    for _ in range(20):  # the subscriber is not reading: its buffer overflows
        await store.append([note()])
    with pytest.raises(SubscriberTooSlow):
        async for _ in sub:
            pass
