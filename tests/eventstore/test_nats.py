"""The NATS backend beyond the contract suite: several stores (instances) on one stream, exact
concurrency across them, the read paths, import, health, verify, and NATS going away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from eventstore import nats as natsmod
from eventstore import nats_read
from eventstore.base import (
    ConcurrencyError,
    Envelope,
    IntegrityError,
    StoreConfig,
    StoreUnavailable,
)
from eventstore.codec import encode_event
from eventstore.events import LogNote, UserActivated
from eventstore.nats import NatsStore
from eventstore.nats_verify import verify_stream
from eventstore.nats_wire import WireBatch, WireEvent, encode_chunk, subject_token
from tests.nats_server import NatsServer, delete_stream, require_nats, unique_stream


def note(stream: str = "s", text: str = "") -> LogNote:
    return LogNote(stream_id=stream, text=text)


async def collect(it: AsyncIterator[Envelope]) -> list[Envelope]:
    return [env async for env in it]


@pytest.fixture
async def stream_name() -> AsyncIterator[str]:
    url = require_nats()
    name = unique_stream()
    yield name
    await delete_stream(url, name)


@pytest.fixture
async def opener(stream_name: str) -> AsyncIterator[Callable[..., Any]]:
    """Open NatsStores (instances) on the test's stream; all closed at the end."""
    opened: list[NatsStore] = []

    async def open_one(url: str | None = None, **kw: Any) -> NatsStore:
        store = NatsStore(url or require_nats(), stream_name, **kw)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait for a condition another task or instance makes true (bounded, polled)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def publish_raw(
    url: str, subject: str, body: bytes, headers: dict[str, str] | None = None
) -> int:
    nc = await nats.connect(url)
    try:
        ack = await nc.jetstream().publish(subject, body, headers=headers)
        return int(ack.seq)
    finally:
        await nc.close()


def raw_chunk(stream: str, expect: dict[str, int], text: str = "raw") -> bytes:
    event = note(stream, text)
    wire = WireEvent(f"raw-{text}", stream, event.event_type, msgspec.Raw(encode_event(event)))
    return encode_chunk([WireBatch(expect, [wire])])


async def test_instances_share_one_order(opener: Callable[..., Any]) -> None:
    a, b = await opener(), await opener()
    seen_a: list[int] = []
    seen_b: list[int] = []
    a.add_listener(lambda envs: seen_a.extend(e.seq for e in envs))
    b.add_listener(lambda envs: seen_b.extend(e.seq for e in envs))
    results = await asyncio.gather(
        *(
            s.append([note(f"n{i % 7}", str(i)), note("shared", str(i))])
            for i in range(60)
            for s in (a, b)
        )
    )
    written = sorted((e for envs in results for e in envs), key=lambda e: e.seq)
    assert [e.seq for e in written] == list(range(1, 241))
    await until(lambda: len(seen_a) == 240 and len(seen_b) == 240)
    assert seen_a == seen_b == list(range(1, 241))
    assert await collect(a.read()) == await collect(b.read()) == written
    assert await a.stream_version("shared") == await b.stream_version("shared") == 120
    # a third instance opened now derives the very same envelopes
    c = await opener()
    assert await collect(c.read()) == written


async def test_racing_creations_across_instances_exactly_one_wins(
    opener: Callable[..., Any],
) -> None:
    a, b = await opener(), await opener()
    attempts = [
        s.append([note("node-1", f"{i}")], expected_version=0) for i in range(10) for s in (a, b)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(r, ConcurrencyError) for r in results if r is not wins[0])
    await until(lambda: b._index.head == a._index.head == 1)
    assert await a.stream_version("node-1") == await b.stream_version("node-1") == 1


async def test_refused_batch_is_refused_by_every_instance(
    opener: Callable[..., Any], stream_name: str
) -> None:
    """A batch whose expectation fails at its place in the stream (here published behind the
    instances' backs, as a stale writer would) gets no seq anywhere."""
    url = require_nats()
    a, b = await opener(), await opener()
    await a.append([note("y", "1")])
    refused = raw_chunk("y", {"y": 0}, "stale")
    await publish_raw(url, f"{stream_name}.{subject_token('x')}", refused)
    after = await b.append([note("z", "after")])
    assert after[0].seq == 2
    await until(lambda: a._index.head == 2)
    for store in (a, b):
        assert store.stats.refused_batches == 1
        assert await store.stream_version("y") == 1
        assert [e.event for e in await collect(store.read())] == [
            note("y", "1"),
            note("z", "after"),
        ]
    c = await opener()
    assert await collect(c.read()) == await collect(a.read())
    assert c.stats.refused_batches == 1


async def test_expectation_on_a_second_stream_is_exact(opener: Callable[..., Any]) -> None:
    """Expected versions on several streams hold even though one message has one subject."""
    a, b = await opener(), await opener()
    await a.append([note("p", "1"), note("q", "1")])
    await until(lambda: b._index.head == 2)
    results = await asyncio.gather(
        a.append([note("p", "a"), note("q", "a")], expected_version={"q": 1}),
        b.append([note("q", "b")], expected_version={"q": 1}),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    await until(lambda: a._index.head == b._index.head)
    assert await a.stream_version("q") == await b.stream_version("q") == 2


async def test_server_turns_a_stale_writer_away_before_storing(
    opener: Callable[..., Any], stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B has not seen A's creation yet: its expected-last-subject-sequence header is refused by
    NATS, B catches up and reports the conflict; nothing of B's is stored."""
    a, b = await opener(), await opener()
    gate = asyncio.Event()
    original_feed = b._on_feed
    refused = asyncio.Event()
    original_after = b._after_wrong_last

    async def held_feed(msg: Any) -> None:
        await gate.wait()
        await original_feed(msg)

    async def after_wrong_last(p: Any, last: int | None) -> None:
        refused.set()
        gate.set()
        await original_after(p, last)

    monkeypatch.setattr(b, "_on_feed", held_feed)
    monkeypatch.setattr(b, "_after_wrong_last", after_wrong_last)
    await a.append([note("node-7", "a")], expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        await b.append([note("node-7", "b")], expected_version=0)
    assert refused.is_set()
    assert info.value.actual == 1
    info_ = await a._js.stream_info(stream_name)
    assert info_.state.messages == 1  # B's losing append never reached the stream
    assert b.stats.refused_batches == 0


async def test_reads_by_direct_get_and_by_stream_reader(
    opener: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await opener()
    written: list[Envelope] = []
    for i in range(40):
        written += await a.append([note(f"s{i % 3}", str(i)), UserActivated(user_id=f"u{i}")])
    a._index.clear_cache()  # as after a restart: nothing recent in memory
    monkeypatch.setattr(nats_read, "DIRECT_READ_MAX", 4)
    assert await collect(a.read()) == written  # 40 chunks: a temporary consumer
    assert await collect(a.read(11, 14)) == written[10:14]  # 2 chunks: direct gets
    assert [e.seq for e in await collect(a.read(5, 60, types=["user.*"]))] == list(range(6, 61, 2))
    assert await collect(a.read(81)) == []


async def test_a_reader_whose_consumer_passes_over_a_message_reads_it_alone(
    opener: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-server before 2.10 moves a consumer past a purge of another subject, undelivered
    messages included: the read asks for the passed-over message by direct get and goes on."""
    a = await opener()
    written: list[Envelope] = []
    for i in range(30):
        written += await a.append([note("s", str(i))])
    a._index.clear_cache()
    monkeypatch.setattr(nats_read, "DIRECT_READ_MAX", 4)
    real_next = nats_read.StreamReader.next
    passed: list[int] = []

    async def passing_over(self: Any) -> tuple[int, str, bytes]:
        got = await real_next(self)
        if got[0] in (7, 19) and got[0] not in passed:  # as if the server moved it past them
            passed.append(got[0])
            got = await real_next(self)
        return got

    monkeypatch.setattr(nats_read.StreamReader, "next", passing_over)
    assert await collect(a.read()) == written
    assert passed == [7, 19]


async def test_the_follower_asks_again_for_messages_its_consumer_passed_over(
    opener: Callable[..., Any], stream_name: str
) -> None:
    """A purge of the heartbeats' subject while the follower's consumer has a message of
    another subject not yet delivered: nats-server before 2.10 moves the consumer past it. The
    instance asks again from its next message instead of calling the stream broken."""
    from eventstore.events import NodeHeartbeat
    from eventstore.nats_wire import removable_subject

    a = await opener()
    await a.append([NodeHeartbeat(node_id="n")])
    await a.append([note("s", "kept")])
    js, consumer, sub = a._js, a._consumer, a._sub
    await sub.unsubscribe()  # no interest: the consumer holds what comes next
    undelivered = (await js.publish(f"{stream_name}.x", raw_chunk("s", {}, "held"))).seq
    request = msgspec.json.encode({"filter": removable_subject(stream_name, 1), "seq": 2})
    resp = await js._api_request(f"{js._prefix}.STREAM.PURGE.{stream_name}", request)
    assert resp.get("purged") == 1, resp
    info = await js.consumer_info(stream_name, consumer)
    if info.delivered.stream_seq < undelivered:
        pytest.skip("this nats-server does not move consumers past a purge of another subject")
    assert info.delivered.consumer_seq == 2  # the held message was passed over, not delivered
    a._sub = await a._nc.subscribe(sub.subject, cb=sub._cb)  # interest again
    seen: list[int] = []
    a.add_listener(lambda envs: seen.extend(e.seq for e in envs))
    [after] = await a.append([note("s", "after")])
    assert after.seq == 4 and seen == [3, 4]
    assert [e.event.text for e in await collect(a.read(3))] == ["held", "after"]


async def test_restore_keeps_seqs_ids_and_times(opener: Callable[..., Any]) -> None:
    a = await opener()
    envs = [
        Envelope(1, "s", 1, 1000.0, "id-1", note("s", "1")),
        Envelope(2, "t", 1, 1000.0, "id-2", note("t", "2")),
        Envelope(3, "s", 2, 1001.5, "id-3", note("s", "3")),
    ]
    await a.restore(envs)
    assert await collect(a.read()) == envs
    b = await opener()
    assert await collect(b.read()) == envs
    with pytest.raises(IntegrityError):
        await a.restore([Envelope(9, "s", 3, 1002.0, "id-9", note("s", "9"))])


async def test_verify_reports_ok_then_a_foreign_message(
    opener: Callable[..., Any], stream_name: str
) -> None:
    url = require_nats()
    a = await opener()
    for i in range(5):
        await a.append([note("v", str(i))])
    report = await verify_stream(StoreConfig(backend="nats", url=url, stream=stream_name))
    assert report.events == 5 and report.messages == 5 and report.refused_batches == 0
    assert len(report.head_hash) == 64
    again = await verify_stream(StoreConfig(backend="nats", url=url, stream=stream_name))
    assert again.head_hash == report.head_hash
    await publish_raw(url, f"{stream_name}.intruder", b"not a chunk")
    with pytest.raises(IntegrityError) as info:
        await verify_stream(StoreConfig(backend="nats", url=url, stream=stream_name))
    assert info.value.seq == 6 and "stream message 6" in info.value.reason


async def test_health_reports_the_stream(opener: Callable[..., Any], stream_name: str) -> None:
    a = await opener()
    await a.append([note()])
    health = await a.health()
    assert health["status"] == "ok"
    assert health["stream"] == stream_name and health["stream_last_seq"] == 1
    assert health["head_seq"] == 1 and health["lag_messages"] == 0
    assert health["storage"] == "file"


async def test_unreachable_at_open(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.nats_server import free_port

    monkeypatch.setattr(natsmod, "CONNECT_TIMEOUT", 0.5)
    store = NatsStore(f"nats://127.0.0.1:{free_port()}", "NOPE")
    with pytest.raises(StoreUnavailable):
        await store.open()


async def test_stream_with_other_subjects_is_refused(opener: Callable[..., Any]) -> None:
    await opener()
    with pytest.raises(StoreUnavailable, match="subject_prefix"):
        await opener(subject_prefix="elsewhere")


async def test_nats_restart_under_load(tmp_path: Path) -> None:
    """Writes fail fast while NATS is down, reads keep answering, both instances recover by
    themselves; no acknowledged event is lost and none is applied twice."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    a = NatsStore(server.url, "RESTART")
    b = NatsStore(server.url, "RESTART")
    try:
        await a.open()
        await b.open()
        seen_b: list[int] = []
        b.add_listener(lambda envs: seen_b.extend(e.seq for e in envs))
        acked: list[Envelope] = []
        failures = 0
        stop = asyncio.Event()

        async def load(store: NatsStore, name: str) -> None:
            nonlocal failures
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    acked.extend(await store.append([note(f"{name}{i % 5}", f"{name}-{i}")]))
                except StoreUnavailable:
                    failures += 1
                    await asyncio.sleep(0.02)

        writers = [asyncio.create_task(load(s, n)) for s, n in ((a, "a"), (b, "b"))]
        await until(lambda: len(acked) >= 50)
        await asyncio.to_thread(server.stop)
        await until(lambda: not a._nc.is_connected and not b._nc.is_connected)
        with pytest.raises(StoreUnavailable):
            await a.append([note("during")])
        head = await a.head()
        assert head >= 50 and await a.stream_version("a1") >= 1  # reads still served
        assert (await a.health())["status"] == "degraded"
        await asyncio.to_thread(server.start)
        count = len(acked)
        await until(lambda: len(acked) >= count + 50, timeout=30)
        stop.set()
        await asyncio.gather(*writers)
        await until(
            lambda: a._index.head == b._index.head and a._index.head >= max(e.seq for e in acked)
        )
        log_a = await collect(a.read())
        log_b = await collect(b.read())
        assert log_a == log_b
        assert [e.seq for e in log_a] == list(range(1, len(log_a) + 1))
        by_seq = {e.seq: e for e in log_a}
        assert all(by_seq[e.seq] == e for e in acked)  # every acknowledged event is there
        assert len({e.id for e in log_a}) == len(log_a)
        assert seen_b == list(range(seen_b[0], seen_b[0] + len(seen_b)))  # no gap, no duplicate
        assert seen_b[-1] == log_a[-1].seq
        assert (await a.health())["status"] == "ok"
    finally:
        await a.close()
        await b.close()
        server.stop()


def test_subject_tokens_are_unambiguous() -> None:
    assert subject_token("node-1") == "node-1"
    assert subject_token("chl:ab_c") == "chl:ab_c"
    assert subject_token("a.b") == "~" + b"a.b".hex()
    assert subject_token("") == "~"
    assert subject_token("~") == "~7e"
    tokens: Sequence[str] = [subject_token(s) for s in ("a b", "a.b", "a*b", "a>b", "é")]
    assert len(set(tokens)) == 5 and all(" " not in t and "." not in t for t in tokens)
