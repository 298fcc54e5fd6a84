"""The embedded, durable log: one SQLite file in WAL mode, written by one process with group commit.

One writer task drains every pending append into a single transaction, commits (fsync with
`synchronous=FULL`), calls the listeners, then resolves every waiter. Reads use a second
connection, so they only ever see committed events. Each row carries a CRC-32 of its body and a
SHA-256 hash chained to the previous row (`eventstore.integrity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import aiosqlite

from eventstore import integrity
from eventstore.base import (
    ConcurrencyError,
    Envelope,
    ExpectedVersion,
    IntegrityError,
    Listener,
    StoreLocked,
    StoreUnavailable,
    resolve_expected,
    subscribe_via_listener,
    type_matcher,
)
from eventstore.codec import decode_event, encode_event
from eventstore.events import BaseEvent

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    stream TEXT NOT NULL,
    stream_version INTEGER NOT NULL,
    type TEXT NOT NULL,
    ts REAL NOT NULL,
    data BLOB NOT NULL,
    crc INTEGER NOT NULL,
    hash BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_stream ON events (stream, stream_version);
"""
_COLUMNS = "seq, id, stream, stream_version, type, ts, data, crc, hash"
_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_PAGE = 2000
_VERSION_CACHE_LIMIT = 200_000
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

Row = tuple[int, str, str, int, str, float, bytes, int, bytes]
_Pending = tuple[Sequence[BaseEvent], ExpectedVersion, "asyncio.Future[list[Envelope]]"]


class WriterLock:
    """An exclusive advisory lock on `<log>.lock`: only one process writes a log."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise StoreLocked(
                f"the log {self.path.with_suffix('')} is held for writing by another process "
                f"(pid {holder}); stop it first (read-only commands such as verify, replay and "
                "export work beside it)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _row_to_envelope(row: Row) -> Envelope:
    seq, event_id, stream, version, _type, ts, data, crc, _hash = row
    if integrity.checksum(data) != crc:
        raise IntegrityError(seq, "checksum mismatch (the event's bytes were altered)")
    try:
        event = decode_event(data)
    except Exception as exc:  # msgspec.DecodeError, ValidationError
        raise IntegrityError(seq, f"undecodable event: {exc}") from None
    return Envelope(seq, stream, version, ts, event_id, event)


def verify_file(
    path: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Check every row of the log at `path`: contiguous seqs, checksums, the hash chain and that
    each body decodes. Returns the number of events; raises IntegrityError at the first bad seq."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise IntegrityError(1, f"cannot open the log: {exc}") from None
    try:
        return _verify_rows(conn, progress)
    finally:
        conn.close()


def _verify_rows(conn: sqlite3.Connection, progress: Callable[[int, int], None] | None) -> int:
    try:
        total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        cur = conn.execute(f"SELECT {_COLUMNS} FROM events ORDER BY seq")
        prev = integrity.GENESIS
        expected_seq = 1
        while True:
            rows = cur.fetchmany(_PAGE)
            if not rows:
                break
            for row in rows:
                seq, event_id, stream, version, _type, ts, data, crc, stored_hash = row
                if seq != expected_seq:
                    raise IntegrityError(
                        expected_seq, f"event missing (next stored event is seq {seq})"
                    )
                if integrity.checksum(data) != crc:
                    raise IntegrityError(seq, "checksum mismatch (the event's bytes were altered)")
                h = integrity.chain_hash(prev, seq, stream, version, ts, event_id, data)
                if h != stored_hash:
                    raise IntegrityError(
                        seq, "hash chain broken (event altered, removed or reordered)"
                    )
                try:
                    decode_event(data)
                except Exception as exc:
                    raise IntegrityError(seq, f"undecodable event: {exc}") from None
                prev = h
                expected_seq += 1
            if progress is not None:
                progress(expected_seq - 1, total)
        return expected_seq - 1
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(expected_seq, f"the log file is damaged: {exc}") from None


class SqliteStore:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        readonly: bool = False,
        verify_on_open: bool = True,
    ) -> None:
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {sync!r}")
        self.path = Path(path)
        self.synchronous = sync
        self.readonly = readonly
        self.verify_on_open = verify_on_open
        self._lock = WriterLock(self.path)
        self._wconn: aiosqlite.Connection | None = None
        self._rconn: aiosqlite.Connection | None = None
        self._listeners: list[Listener] = []
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._head = 0
        self._last_hash = integrity.GENESIS
        self._last_ts = 0.0
        self._versions: dict[str, int] = {}

    # --- lifecycle ---

    async def open(self) -> None:
        if self.readonly:
            if not await asyncio.to_thread(self.path.exists):
                raise StoreUnavailable(f"no log at {self.path}")
            self._rconn = await self._connect(f"file:{self.path}?mode=ro")
            await self._load_tail(self._rconn)
            return
        await asyncio.to_thread(self._lock.acquire)  # creates the directory too
        try:
            self._wconn = await self._connect(str(self.path))
            await self._wconn.execute("PRAGMA journal_mode=WAL")
            await self._wconn.execute(f"PRAGMA synchronous={self.synchronous}")
            await self._wconn.executescript(SCHEMA)
            await self._wconn.commit()
            if self.verify_on_open:
                await asyncio.to_thread(verify_file, self.path)
            await self._load_tail(self._wconn)
            self._rconn = await self._connect(f"file:{self.path}?mode=ro")
        except BaseException:
            await self._close_connections()
            self._lock.release()
            raise
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    async def _connect(self, target: str) -> aiosqlite.Connection:
        try:
            conn = await aiosqlite.connect(target, uri=target.startswith("file:"))
            await conn.execute("PRAGMA query_only=1" if "mode=ro" in target else "SELECT 1")
            return conn
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(1, f"the log file {self.path} is damaged: {exc}") from None

    async def _load_tail(self, conn: aiosqlite.Connection) -> None:
        try:
            async with conn.execute(
                "SELECT seq, ts, hash FROM events ORDER BY seq DESC LIMIT 1"
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(1, f"the log file {self.path} is damaged: {exc}") from None
        if row is not None:
            self._head, self._last_ts, self._last_hash = row[0], row[1], row[2]

    async def close(self) -> None:
        if self._writer is not None:
            self._closing = True
            self._wakeup.set()
            await self._writer
            self._writer = None
        await self._close_connections()
        self._lock.release()

    async def _close_connections(self) -> None:
        for conn in (self._wconn, self._rconn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._wconn = self._rconn = None

    # --- writing ---

    async def append(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Envelope]:
        if self._writer is None or self._closing:
            raise StoreUnavailable("the log is not open for writing")
        if not events:
            return []
        fut: asyncio.Future[list[Envelope]] = asyncio.get_running_loop().create_future()
        self._pending.append((events, expected_version, fut))
        self._wakeup.set()
        return await fut

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            if batch:
                try:
                    await self._commit_batch(batch)
                except Exception as exc:  # never let the writer die: fail this batch only
                    log.exception("append batch failed")
                    err = StoreUnavailable(f"the log could not be written: {exc}")
                    for _events, _expected, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
            if self._closing and not self._pending:
                return

    async def _versions_of(self, streams: set[str]) -> None:
        """Make sure the cache knows the version of every stream in `streams`."""
        missing = [s for s in streams if s not in self._versions]
        if not missing:
            return
        if len(self._versions) + len(missing) > _VERSION_CACHE_LIMIT:
            self._versions.clear()
        assert self._wconn is not None
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found: dict[str, int] = {}
            async with self._wconn.execute(
                f"SELECT stream, MAX(stream_version) FROM events WHERE stream IN ({marks}) "
                "GROUP BY stream",
                chunk,
            ) as cur:
                async for stream, version in cur:
                    found[stream] = version
            for s in chunk:
                self._versions[s] = found.get(s, 0)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        conn = self._wconn
        assert conn is not None
        streams: set[str] = set()
        for events, _expected, fut in batch:
            if not fut.done():
                streams.update(e.stream for e in events)
        await self._versions_of(streams)

        overlay: dict[str, int] = {}
        versions = self._versions
        seq, prev = self._head, self._last_hash
        ts = max(time.time(), self._last_ts)
        ids = os.urandom(16 * sum(len(ev) for ev, _, _ in batch)).hex()
        id_pos = 0
        rows: list[Row] = []
        accepted: list[tuple[asyncio.Future[list[Envelope]], list[Envelope]]] = []
        chain = integrity.chain_hash
        crc = integrity.checksum
        for events, expected, fut in batch:
            if fut.done():  # the caller went away before we started: record nothing for it
                continue
            conflict = None
            for stream, want in resolve_expected(events, expected).items():
                have = overlay.get(stream, versions.get(stream, 0))
                if have != want:
                    conflict = ConcurrencyError(stream, want, have)
                    break
            if conflict is not None:
                fut.set_exception(conflict)
                continue
            envs: list[Envelope] = []
            for event in events:
                stream = event.stream
                version = overlay.get(stream, versions.get(stream, 0)) + 1
                overlay[stream] = version
                seq += 1
                event_id = ids[id_pos : id_pos + 32]
                id_pos += 32
                data = encode_event(event)
                prev = chain(prev, seq, stream, version, ts, event_id, data)
                rows.append(
                    (seq, event_id, stream, version, event.type_name(), ts, data, crc(data), prev)
                )
                envs.append(Envelope(seq, stream, version, ts, event_id, event))
            accepted.append((fut, envs))
        if not rows:
            return
        try:
            await conn.executemany(_INSERT, rows)
            await conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.rollback()
            raise
        self._head, self._last_hash, self._last_ts = seq, prev, ts
        versions.update(overlay)
        recorded = [env for _, envs in accepted for env in envs]
        for listener in list(self._listeners):
            try:
                listener(recorded)
            except Exception:
                log.exception("log listener failed")
        for fut, envs in accepted:
            if not fut.done():
                fut.set_result(envs)

    async def restore(self, envelopes: Sequence[Envelope]) -> None:
        """Write already-recorded envelopes as they are (seq, ts, id kept): for `broker import`.

        They must continue the log exactly (first seq = head + 1, contiguous, stream versions
        in order); the hash chain is recomputed."""
        conn = self._wconn
        if conn is None or self._writer is None:
            raise StoreUnavailable("the log is not open for writing")
        if not envelopes:
            return
        seq, prev, last_ts = self._head, self._last_hash, self._last_ts
        streams = {env.stream for env in envelopes}
        await self._versions_of(streams)
        overlay: dict[str, int] = {}
        rows: list[Row] = []
        for env in envelopes:
            seq += 1
            if env.seq != seq:
                raise IntegrityError(seq, f"import out of order: got seq {env.seq}")
            version = overlay.get(env.stream, self._versions.get(env.stream, 0)) + 1
            if env.stream_version != version:
                raise IntegrityError(
                    env.seq,
                    f"stream {env.stream!r} version {env.stream_version}, expected {version}",
                )
            overlay[env.stream] = version
            last_ts = max(last_ts, env.ts)
            data = encode_event(env.event)
            prev = integrity.chain_hash(prev, seq, env.stream, version, env.ts, env.id, data)
            rows.append(
                (
                    seq,
                    env.id,
                    env.stream,
                    version,
                    env.type,
                    env.ts,
                    data,
                    integrity.checksum(data),
                    prev,
                )
            )
        try:
            await conn.executemany(_INSERT, rows)
            await conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.rollback()
            raise
        self._head, self._last_hash, self._last_ts = seq, prev, last_ts
        self._versions.update(overlay)
        for listener in list(self._listeners):
            listener(envelopes)

    # --- reading ---

    async def read(
        self, from_seq: int = 1, to_seq: int | None = None, types: Iterable[str] | None = None
    ) -> AsyncIterator[Envelope]:
        conn = self._rconn
        if conn is None:
            raise StoreUnavailable("the log is not open")
        match = type_matcher(types)
        end = self._head if to_seq is None else min(to_seq, self._head)
        next_seq = max(from_seq, 1)
        while next_seq <= end:
            try:
                async with conn.execute(
                    f"SELECT {_COLUMNS} FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq",
                    (next_seq, min(end, next_seq + _PAGE - 1)),
                ) as cur:
                    rows: list[Any] = list(await cur.fetchall())
            except sqlite3.DatabaseError as exc:
                raise IntegrityError(next_seq, f"the log file is damaged: {exc}") from None
            if not rows:
                raise IntegrityError(next_seq, "event missing")
            for env in _decode_page(rows, next_seq, match):
                yield env
            next_seq = rows[-1][0] + 1

    def subscribe(self, from_seq: int = 1, max_buffer: int = 10_000) -> AsyncIterator[Envelope]:
        return subscribe_via_listener(self, from_seq, max_buffer)

    async def head(self) -> int:
        return self._head

    async def stream_version(self, stream: str) -> int:
        if stream in self._versions:
            return self._versions[stream]
        conn = self._rconn
        if conn is None:
            raise StoreUnavailable("the log is not open")
        async with conn.execute(
            "SELECT MAX(stream_version) FROM events WHERE stream = ?", (stream,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0] or 0) if row else 0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def _decode_page(
    rows: list[Any], first_seq: int, match: Callable[[str], bool] | None
) -> Iterator[Envelope]:
    expected = first_seq
    for row in rows:
        if row[0] != expected:
            raise IntegrityError(expected, f"event missing (next stored event is seq {row[0]})")
        expected += 1
        if match is None or match(row[4]):
            yield _row_to_envelope(row)
