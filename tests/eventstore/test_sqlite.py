"""SQLite backend specifics: integrity checks, the writer lock, import, group commit."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from eventstore.base import ConcurrencyError, Envelope, IntegrityError, StoreError, StoreLocked
from eventstore.events import LogNote
from eventstore.sqlite import APPLICATION_ID, SqliteStore, StoredEvent, verify_file
from eventstore.sqlite_checkpoint import checkpoint_path, write_checkpoint
from eventstore.sqlite_head import read_head


async def make_log(path: Path, n: int = 50) -> list[Envelope]:
    store = SqliteStore(path)
    await store.open()
    try:
        envs: list[Envelope] = []
        for i in range(0, n, 10):
            envs += await store.append(
                [LogNote(stream_id=f"s{j % 3}", text=f"event {j}") for j in range(i, i + 10)]
            )
        return envs
    finally:
        await store.close()


def _sql(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(sql, args).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


async def sql(path: Path, statement: str, *args: object) -> list[tuple[object, ...]]:
    """Run one statement on the file from outside the store (a worker thread: not in the loop)."""
    return await asyncio.to_thread(_sql, path, statement, *args)


async def verify(path: Path) -> int:
    return await asyncio.to_thread(verify_file, path)


async def test_verify_passes_on_a_good_log(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path)
    assert await verify(path) == 50


async def edit_records(
    path: Path, edit: Callable[[list[StoredEvent]], None], fix_crc: bool
) -> None:
    """Decode every stored chunk, let `edit` change the records, write them back."""
    rows = await sql(path, "SELECT first_seq, body FROM chunks")
    for first, body in rows:
        records = msgspec.msgpack.decode(body, type=list[StoredEvent])  # type: ignore[arg-type]
        edit(records)
        new = msgspec.msgpack.encode(records)
        if new != body:
            crc = zlib.crc32(new) if fix_crc else zlib.crc32(body)
            await sql(
                path, "UPDATE chunks SET body = ?, crc = ? WHERE first_seq = ?", new, crc, first
            )


def flip(seq: int) -> Callable[[list[StoredEvent]], None]:
    def edit(records: list[StoredEvent]) -> None:
        for rec in records:
            if rec.seq == seq:
                data = bytearray(rec.data)
                data[-1] ^= 0x01
                rec.data = bytes(data)

    return edit


async def test_flipped_bit_names_its_seq_and_blocks_start(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path)
    await edit_records(path, flip(17), fix_crc=False)
    with pytest.raises(IntegrityError) as info:
        await verify(path)
    assert info.value.seq == 17
    with pytest.raises(IntegrityError) as info:
        await SqliteStore(path).open()
    assert info.value.seq == 17


async def test_the_start_verifies_from_the_verified_checkpoint(tmp_path: Path) -> None:
    """A verify that reached seq 30 spares the start the events up to it (as a snapshot's
    position does), not those after it; a checkpoint the log no longer matches counts for
    nothing."""
    path = tmp_path / "log.db"
    await make_log(path)
    await asyncio.to_thread(write_checkpoint, path, 30)
    await edit_records(path, flip(17), fix_crc=True)  # altered, its chunk's checksum made right
    store = SqliteStore(path)
    await store.open()  # from the checkpoint on: 17 is not read again
    await store.close()
    await edit_records(path, flip(37), fix_crc=True)
    with pytest.raises(IntegrityError) as info:
        await SqliteStore(path).open()
    assert info.value.seq == 37
    await asyncio.to_thread(write_checkpoint, path, 10)
    await edit_records(path, flip(37), fix_crc=True)  # 37 as it was
    with pytest.raises(IntegrityError) as info:
        await SqliteStore(path).open()
    assert info.value.seq == 17
    saved = checkpoint_path(path)
    saved.write_bytes(saved.read_bytes().replace(b'"seq":10', b'"seq":20'))
    with pytest.raises(IntegrityError) as info:  # 20's hash is not the one it names: ignored
        await SqliteStore(path).open()
    assert info.value.seq == 17


async def test_flipped_bit_with_matching_checksum_breaks_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path)
    await edit_records(path, flip(23), fix_crc=True)
    with pytest.raises(IntegrityError) as info:
        await verify(path)
    assert info.value.seq == 23
    assert "hash chain" in info.value.reason


async def test_removed_event_is_found(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path)

    def drop(records: list[StoredEvent]) -> None:
        records[:] = [r for r in records if r.seq != 30]

    await edit_records(path, drop, fix_crc=True)
    with pytest.raises(IntegrityError) as info:
        await verify(path)
    assert info.value.seq == 30


async def test_removed_chunk_is_found(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path)
    await sql(path, "DELETE FROM chunks WHERE first_seq = 21")
    with pytest.raises(IntegrityError) as info:
        await verify(path)
    assert info.value.seq == 21


async def test_reordered_events_are_found(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path)

    def swap(records: list[StoredEvent]) -> None:
        for i, rec in enumerate(records):
            if rec.seq == 12:
                a, b = records[i], records[i + 1]
                a.data, b.data = b.data, a.data

    await edit_records(path, swap, fix_crc=True)
    with pytest.raises(IntegrityError) as info:
        await verify(path)
    assert info.value.seq == 12


async def test_removed_tail_continues_from_what_is_there_once_the_loss_is_accepted(
    tmp_path: Path,
) -> None:
    # Dropping the last chunk leaves a valid prefix, but acknowledged events are gone: the
    # recorded head (log.db.head) refuses it. Once the operator accepts the loss (removes the
    # record), the next append chains onto what is really there.
    path = tmp_path / "log.db"
    await make_log(path)
    await sql(path, "DELETE FROM chunks WHERE first_seq = 41")
    with pytest.raises(IntegrityError, match=r"events 41\.\.50 missing"):
        await verify(path)
    with pytest.raises(IntegrityError, match=r"events 41\.\.50 missing"):
        await SqliteStore(path).open()
    (tmp_path / "log.db.head").unlink()
    assert await verify(path) == 40
    store = SqliteStore(path)
    await store.open()
    envs = await store.append([LogNote(text="after")])
    await store.close()
    assert envs[0].seq == 41
    assert await verify(path) == 41


async def test_truncated_file_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path, 2000)
    # Fold the WAL into the main file, then cut the file in half.
    await sql(path, "PRAGMA wal_checkpoint(TRUNCATE)")
    await sql(path, "VACUUM")
    await asyncio.to_thread(os.truncate, path, path.stat().st_size // 2)
    with pytest.raises(IntegrityError) as info:
        await verify(path)
    assert "damaged" in str(info.value) or "missing" in str(info.value)
    with pytest.raises(IntegrityError):
        await SqliteStore(path).open()


async def test_second_writer_is_refused_readers_work(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path, 10)
    first = SqliteStore(path)
    await first.open()
    try:
        with pytest.raises(StoreLocked) as info:
            await SqliteStore(path).open()
        assert "held for writing" in str(info.value)
        reader = SqliteStore(path, readonly=True)
        await reader.open()
        assert len([e async for e in reader.read()]) == 10
        await reader.close()
        assert await verify(path) == 10
    finally:
        await first.close()
    second = SqliteStore(path)  # released on close
    await second.open()
    await second.close()


async def test_reopen_continues_seq_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    before = await make_log(path, 20)
    store = SqliteStore(path)
    await store.open()
    assert await store.head() == 20
    assert await store.stream_version("s0") == 7
    more = await store.append([LogNote(stream_id="s0", text="x")], expected_version=7)
    assert more[0].seq == 21 and more[0].stream_version == 8
    assert [e async for e in store.read(1, 20)] == before
    await store.close()
    assert await verify(path) == 21


async def test_restore_keeps_envelopes_and_chain(tmp_path: Path) -> None:
    src = tmp_path / "a.db"
    envs = await make_log(src, 30)
    dst = SqliteStore(tmp_path / "b.db")
    await dst.open()
    await dst.restore(envs[:12])
    await dst.restore(envs[12:])
    got = [e async for e in dst.read()]
    await dst.close()
    assert got == envs
    assert await verify(tmp_path / "b.db") == 30


async def test_group_commit_batches_concurrent_appends(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "log.db")
    await store.open()
    commits: list[int] = []
    store.add_listener(lambda batch: commits.append(len(batch)))
    try:
        results = await asyncio.gather(
            *(store.append([LogNote(stream_id=f"n{i}")]) for i in range(500))
        )
    finally:
        await store.close()
    assert sorted(e.seq for r in results for e in r) == list(range(1, 501))
    assert sum(commits) == 500
    assert len(commits) < 500  # many appends shared one transaction
    assert await verify(tmp_path / "log.db") == 500


def test_synchronous_setting_is_validated() -> None:
    with pytest.raises(ValueError):
        SqliteStore("x.db", synchronous="SOMETIMES")


async def test_claimed_new_stream_that_exists_on_disk_is_refused(tmp_path: Path) -> None:
    """After a restart the version cache is empty: a stream claimed new (expected version 0)
    is first taken to be new, and the file's own constraint refuses it if it already exists,
    without failing the other appends committed with it."""
    path = tmp_path / "log.db"
    await make_log(path, 10)  # streams s0, s1, s2 exist
    store = SqliteStore(path)
    await store.open()
    try:
        results = await asyncio.gather(
            store.append([LogNote(stream_id="s1", text="dup")], expected_version=0),
            store.append([LogNote(stream_id="fresh", text="new")], expected_version=0),
            store.append([LogNote(stream_id="s2", text="plain")]),
            return_exceptions=True,
        )
        assert isinstance(results[0], ConcurrencyError) and results[0].actual == 3
        assert [e.stream_version for e in results[1]] == [1]  # type: ignore[union-attr]
        assert [e.stream_version for e in results[2]] == [4]  # type: ignore[union-attr]
        assert [e.seq for e in results[1] + results[2]] == [11, 12]  # type: ignore[operator]
    finally:
        await store.close()
    assert await verify(path) == 12


async def test_wal_is_checkpointed_in_the_background_and_kept_bounded(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    wal = tmp_path / "log.db-wal"
    store = SqliteStore(path)
    store.checkpoint_every = 32 * 1024
    # Appending one batch at a time, each checkpoint finishes before the next commit and SQLite
    # starts the WAL over by itself; a limit below one round's size makes the writer's own
    # restart (for WALs that concurrent commits keep ahead of the checkpoints) run too.
    store.wal_limit = 16 * 1024
    await store.open()
    ckpt = store._checkpointer
    assert ckpt is not None

    async def settled() -> None:  # the checkpoint thread has done what it was handed
        await asyncio.to_thread(ckpt._executor.submit(lambda: None).result)

    sizes: list[int] = []
    try:
        for i in range(300):  # ~3 MB of events; without checkpoints the WAL holds all of it
            await store.append([LogNote(stream_id="s", text=f"{i}:" + "x" * 1000)] * 10)
            await settled()
            sizes.append(wal.stat().st_size)
    finally:
        await store.close()
    assert ckpt.done >= 10  # checkpoints ran, in their own thread
    assert ckpt.restarts >= 10  # the WAL went past its limit and was started over
    assert max(sizes) < 1024 * 1024  # bounded: the limit plus what one round writes
    assert await verify(path) == 3000
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        assert len([e async for e in reopened.read()]) == 3000
    finally:
        await reopened.close()


async def test_a_failing_checkpoint_does_not_fail_the_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "log.db")
    await store.open()
    assert store._checkpointer is not None

    def broken(conn: sqlite3.Connection, nbytes: int) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store._checkpointer, "wrote", broken)
    try:
        envs = await store.append([LogNote(stream_id="s", text="kept")])
        assert envs[0].seq == 1 and await store.head() == 1
    finally:
        await store.close()
    assert await verify(tmp_path / "log.db") == 1


async def test_every_connection_keeps_temporary_data_in_memory(tmp_path: Path) -> None:
    """A temporary file needs a free file descriptor: a commit must not depend on one."""
    store = SqliteStore(tmp_path / "log.db")
    store.checkpoint_every = 1  # the background checkpointer opens its connection at once
    await store.open()
    try:
        await store.append([LogNote(stream_id=f"s{i}") for i in range(20)])
        assert store._wconn is not None and store._rconn is not None
        wconn, ckpt = store._wconn, store._checkpointer
        assert await store._run(lambda: wconn.execute("PRAGMA temp_store").fetchone()[0]) == 2
        async with store._rconn.execute("PRAGMA temp_store") as cur:
            assert (await cur.fetchone()) == (2,)  # 2 = MEMORY
        assert ckpt is not None
        await asyncio.to_thread(ckpt._executor.submit(lambda: None).result)
        assert ckpt._conn is not None
        ckpt_conn = ckpt._conn
        assert (
            await asyncio.to_thread(
                ckpt._executor.submit(
                    lambda: ckpt_conn.execute("PRAGMA temp_store").fetchone()[0]
                ).result
            )
            == 2
        )
    finally:
        await store.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "schema",
    [
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'a')",
        # our tables' names, another application's id
        "CREATE TABLE chunks (x); CREATE TABLE streams (y); PRAGMA application_id = 7",
        # our tables and one more
        "CREATE TABLE chunks (x); CREATE TABLE streams (y); CREATE TABLE extra (z)",
    ],
)
async def test_another_applications_database_is_refused_and_left_untouched(
    tmp_path: Path, schema: str
) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.executescript(schema)
    conn.commit()
    conn.close()
    before = _digest(path)
    with pytest.raises(StoreError, match="not an event log of this broker") as info:
        await SqliteStore(path).open()
    assert not isinstance(info.value, IntegrityError)
    with pytest.raises(StoreError, match="not an event log of this broker"):
        await verify(path)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "app.db.lock"]


async def test_new_logs_carry_our_application_id_and_older_logs_still_open(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path, 10)
    assert await sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    await sql(path, "PRAGMA application_id = 0")  # a log made before the id was set
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.head() == 10
        await store.append([LogNote(text="more")])
    finally:
        await store.close()
    assert await sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert await verify(path) == 11


# --- the recorded head: a log behind it lost acknowledged events ---


async def copy_while_open(path: Path, dest: Path, commits: int) -> None:
    """Write `commits` commits of 5 events, then copy the log, its WAL (not checkpointed: the
    store checkpoints only every 32 MiB, and closing would fold it in) and its head record
    while the store is still open: the state a crash would leave."""
    store = SqliteStore(path)
    await store.open()
    try:
        for i in range(commits):
            await store.append([LogNote(stream_id=f"s{i % 3}", text=f"{i}-{j}") for j in range(5)])
        dest.mkdir()
        for name in ("log.db", "log.db-wal", "log.db.head"):
            if path.with_name(name).exists():
                await asyncio.to_thread(shutil.copyfile, path.with_name(name), dest / name)
    finally:
        await store.close()


def _last_seq_read_only(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # never checkpoints the WAL
    try:
        return int(conn.execute("SELECT MAX(last_seq) FROM chunks").fetchone()[0])
    finally:
        conn.close()


async def test_a_flipped_byte_in_the_wal_is_found_at_open_and_by_verify(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    await copy_while_open(tmp_path / "log.db", copy, commits=10)
    path, wal = copy / "log.db", copy / "log.db-wal"
    data = bytearray(wal.read_bytes())
    assert len(data) > 4096 * 10  # the commits are in the WAL, frame after frame
    data[len(data) * 2 // 3] ^= 0x01  # in a frame of a later commit: SQLite stops there
    wal.write_bytes(bytes(data))
    damaged = hashlib.sha256(bytes(data)).digest()
    # SQLite alone sees a shorter log, valid to the last event: the lost tail is invisible
    head = await asyncio.to_thread(_last_seq_read_only, path)
    assert 0 < head < 50
    with pytest.raises(IntegrityError) as info:
        await SqliteStore(path).open()
    assert info.value.seq == head + 1
    assert f"events {head + 1}..50 missing: {50 - head} acknowledged events lost" in str(info.value)
    with pytest.raises(IntegrityError, match=rf"events {head + 1}\.\.50 missing"):
        await verify(path)
    with pytest.raises(IntegrityError, match=rf"events {head + 1}\.\.50 missing"):
        await SqliteStore(path).open()  # refused again: the WAL was left as it was
    assert hashlib.sha256(wal.read_bytes()).digest() == damaged


async def test_a_record_behind_the_log_is_fine_and_moves_on(tmp_path: Path) -> None:
    # The record is written after the commit: a crash in between leaves it behind the log.
    path = tmp_path / "log.db"
    await copy_while_open(path, tmp_path / "early", commits=4)  # record at seq 20
    store = SqliteStore(path)
    await store.open()
    await store.append([LogNote(text="21")])
    await store.close()
    early = tmp_path / "early" / "log.db.head"
    await asyncio.to_thread(shutil.copyfile, early, tmp_path / "log.db.head")
    assert (await asyncio.to_thread(read_head, path) or (0,))[0] == 20
    assert await verify(path) == 21
    store = SqliteStore(path)
    await store.open()
    await store.close()
    assert (await asyncio.to_thread(read_head, path) or (0,))[0] == 21


async def test_a_replaced_log_is_refused_by_the_hash_at_the_recorded_head(tmp_path: Path) -> None:
    await make_log(tmp_path / "a.db", 20)
    await make_log(tmp_path / "b.db", 30)  # another history, longer
    await asyncio.to_thread(shutil.copyfile, tmp_path / "b.db", tmp_path / "a.db")
    with pytest.raises(IntegrityError, match="chain hash differs") as info:
        await SqliteStore(tmp_path / "a.db").open()
    assert info.value.seq == 20
    with pytest.raises(IntegrityError, match="chain hash differs"):
        await verify(tmp_path / "a.db")


async def test_a_lost_log_file_is_refused_and_not_created_again(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await make_log(path, 10)
    path.unlink()
    with pytest.raises(IntegrityError, match=r"events 1\.\.10 missing"):
        await SqliteStore(path).open()
    assert not path.exists()


async def _writer_held(store: SqliteStore) -> tuple[threading.Event, asyncio.Future[bool]]:
    """Hold the writer thread in a call until the returned event is set (the call's future
    resolves after)."""
    gate, entered = threading.Event(), threading.Event()

    def hold() -> bool:
        entered.set()
        return gate.wait(10)

    held = store._run(hold)
    await asyncio.to_thread(entered.wait, 10)
    return gate, held


async def _pending(store: SqliteStore, n: int) -> None:
    """Until `n` appends are queued for the writer thread (each task runs to its first await)."""
    while len(store._pending) < n:
        await asyncio.sleep(0)


async def test_appends_queued_while_the_writer_is_busy_share_its_next_commit(
    tmp_path: Path,
) -> None:
    """The writer thread takes every append queued meanwhile into one transaction; the loop
    calls the listeners with it before any of its appends is answered."""
    store = SqliteStore(tmp_path / "log.db")
    await store.open()
    tasks: list[asyncio.Task[list[Envelope]]] = []
    answered_at_listener: list[list[bool]] = []
    store.add_listener(lambda batch: answered_at_listener.append([t.done() for t in tasks]))
    try:
        gate, held = await _writer_held(store)
        tasks += [
            asyncio.create_task(store.append([LogNote(stream_id=f"n{i % 3}")])) for i in range(7)
        ]
        await _pending(store, 7)
        gate.set()
        assert await held
        results = await asyncio.gather(*tasks)
    finally:
        await store.close()
    assert answered_at_listener == [[False] * 7]  # one commit, seen before any answer
    assert [e.seq for r in results for e in r] == list(range(1, 8))
    assert [r[0].stream_version for r in results] == [1, 1, 1, 2, 2, 2, 3]
    assert await verify(tmp_path / "log.db") == 7


async def test_an_append_cancelled_before_the_writer_takes_it_records_nothing(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "log.db")
    await store.open()
    try:
        gate, held = await _writer_held(store)
        gone = asyncio.create_task(store.append([LogNote(stream_id="gone")]))
        kept = asyncio.create_task(store.append([LogNote(stream_id="kept")]))
        await _pending(store, 2)
        gone.cancel()
        gate.set()
        assert await held
        assert [e.stream for e in await kept] == ["kept"]
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert [e.seq for e in await store.append([LogNote(stream_id="next")])] == [2]
        assert await store.stream_version("gone") == 0
    finally:
        await store.close()
    assert await verify(tmp_path / "log.db") == 2


async def test_close_commits_and_answers_the_appends_made_before_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "log.db")
    await store.open()
    gate, held = await _writer_held(store)
    tasks = [asyncio.create_task(store.append([LogNote(stream_id=f"c{i}")])) for i in range(5)]
    await _pending(store, 5)
    closing = asyncio.create_task(store.close())
    while not store._closing:
        await asyncio.sleep(0)
    with pytest.raises(StoreError):  # refused once closing, as before
        await store.append([LogNote(stream_id="late")])
    gate.set()
    assert await held
    await closing
    results = await asyncio.gather(*tasks)
    assert sorted(e.seq for r in results for e in r) == [1, 2, 3, 4, 5]
    assert await verify(tmp_path / "log.db") == 5
