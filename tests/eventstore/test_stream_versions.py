"""Stream versions kept off the commit's path (eventstore.sqlite_streams): a commit writes its
chunks only; the versions wait in memory and reach the `streams` table in slices between
commits; an open reads back what had not reached it. Whatever the flushes and crashes, every
stream's version is the one its last event carries, and expected versions hold against it."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eventstore.sqlite_streams as sqlite_streams
from eventstore.base import ConcurrencyError
from eventstore.events import LogNote
from eventstore.sqlite import SqliteStore

FILES = ("log.db", "log.db-wal", "log.db.head")


def table(path: Path) -> tuple[dict[str, int], int]:
    """The `streams` table and the header's mark, read as another process would."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = dict(conn.execute("SELECT stream, version FROM streams").fetchall())
        return rows, int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def crashed_copy(path: Path, dest: Path) -> Path:
    """The log's files copied while its store is open: what a crash would leave."""
    dest.mkdir()
    for name in FILES:
        if path.with_name(name).exists():
            shutil.copyfile(path.with_name(name), dest / name)
    return dest / path.name


def note(stream: str) -> LogNote:
    return LogNote(stream_id=stream, text="x")


@pytest.fixture
def no_flush_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_streams, "FLUSH_SECONDS", 1e9)


async def test_versions_wait_for_the_table_and_reach_it_at_close(
    tmp_path: Path, no_flush_by_time: None
) -> None:
    path = tmp_path / "log.db"
    store = SqliteStore(path)
    await store.open()
    for stream, n in (("a", 3), ("b", 1), ("a", 2)):
        await store.append([note(stream)] * n)
    assert await asyncio.to_thread(table, path) == ({}, 1)  # the chunks only: complete to 0
    assert await store.stream_version("a") == 5
    await store.close()
    assert await asyncio.to_thread(table, path) == ({"a": 5, "b": 1}, 7)  # complete to seq 6


async def test_a_stream_is_forgotten_only_at_the_version_given_and_once_in_the_table(
    tmp_path: Path, no_flush_by_time: None
) -> None:
    """`forget_streams` (a compaction's, for messages whose every event it removed) drops a
    stream's row and cached version when its version is the number of events given; not a
    stream that got more since, nor one whose version still waits for the table."""
    path = tmp_path / "log.db"
    store = SqliteStore(path)
    await store.open()
    for stream, n in (("a", 2), ("b", 1), ("c", 1)):
        await store.append([note(stream)] * n)
    assert await store.forget_streams({"a": 2}) == 0  # still waiting for the table
    await store.close()
    await store.open()  # (the close wrote the table)
    try:
        assert await store.stream_version("a") == 2  # cached
        assert await store.forget_streams({"a": 2, "b": 2, "z": 1}) == 1  # b has 1 event
        assert await asyncio.to_thread(table, path) == ({"b": 1, "c": 1}, 5)
        assert [await store.stream_version(s) for s in "abc"] == [0, 1, 1]
        [env] = await store.append([note("a")], 0)  # its expected version is 0 again
        assert env.stream_version == 1
        await store.append([note("c")])  # c: 1 in the table, 2 waiting
        assert await store.forget_streams({"c": 1}) == 0
        assert await store.stream_version("c") == 2
    finally:
        await store.close()


async def test_a_crash_before_the_flush_loses_no_version(
    tmp_path: Path, no_flush_by_time: None
) -> None:
    path = tmp_path / "log.db"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.append([note("a"), note("b"), note("a")])
        await store.append([note("a")], expected_version=2)
        copy = await asyncio.to_thread(crashed_copy, path, tmp_path / "crash")
    finally:
        await store.close()
    assert (await asyncio.to_thread(table, copy))[0] == {}
    again = SqliteStore(copy)
    await again.open()
    try:
        assert await again.stream_version("a") == 3
        with pytest.raises(ConcurrencyError):
            await again.append([note("a")], expected_version=2)
        with pytest.raises(ConcurrencyError):
            await again.append([note("b")], expected_version=0)  # b exists
        [env] = await again.append([note("a")], expected_version=3)
        assert env.stream_version == 4
    finally:
        await again.close()
    reader = SqliteStore(copy, readonly=True)
    await reader.open()
    assert await reader.stream_version("a") == 4
    await reader.close()


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(0, 5), st.integers(1, 3), st.booleans()),
            st.tuples(st.just("crash")),
            st.tuples(st.just("reopen")),
        ),
        min_size=1,
        max_size=30,
    ),
    flush_streams=st.integers(1, 4),
    slice_len=st.integers(1, 3),
)
def test_versions_match_the_log_whatever_the_flushes_and_crashes(
    steps: list[tuple[object, ...]], flush_streams: int, slice_len: int
) -> None:
    """Appends to six streams (with or without their expected version, sometimes a wrong
    one), flushes of a few streams in slices of one to three, crashes (a copy of the open
    log's files opened instead) and clean reopens: the versions always follow the model."""
    saved = sqlite_streams.FLUSH_STREAMS, sqlite_streams.SLICE, sqlite_streams.FLUSH_SECONDS
    sqlite_streams.FLUSH_STREAMS, sqlite_streams.SLICE = flush_streams, slice_len
    sqlite_streams.FLUSH_SECONDS = 1e9
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_scenario(Path(tmp), steps))
    finally:
        sqlite_streams.FLUSH_STREAMS, sqlite_streams.SLICE, sqlite_streams.FLUSH_SECONDS = saved


async def _scenario(root: Path, steps: list[tuple[object, ...]]) -> None:
    model: dict[str, int] = {}
    path = root / "0" / "log.db"
    path.parent.mkdir()
    store = SqliteStore(path)
    await store.open()
    try:
        for i, step in enumerate(steps, 1):
            if step[0] == "append":
                _, k, n, wrong = step
                stream = f"s{k}"
                have = model.get(stream, 0)
                expected = have + 1 if wrong else have
                if wrong:
                    with pytest.raises(ConcurrencyError):
                        await store.append([note(stream)] * n, expected_version=expected)
                else:
                    envs = await store.append([note(stream)] * n, expected_version=expected)
                    assert [e.stream_version for e in envs] == list(range(have + 1, have + n + 1))
                    model[stream] = have + n
            else:
                if step[0] == "crash":
                    path = await asyncio.to_thread(crashed_copy, path, root / str(i))
                await store.close()
                store = SqliteStore(path)
                await store.open()
            for k in range(6):
                assert await store.stream_version(f"s{k}") == model.get(f"s{k}", 0)
    finally:
        await store.close()
    rows, mark = await asyncio.to_thread(table, path)
    assert rows == model and mark == await store.head() + 1
