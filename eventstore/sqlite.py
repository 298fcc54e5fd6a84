"""The embedded, durable log: one SQLite file in WAL mode, written by one process with group commit.

This module holds the store's lifecycle (open, close, the connections) and its reading side.
Reads use a second connection, so they only ever see committed events. Each row carries a CRC-32
of its body and a SHA-256 hash chained to the previous row (`eventstore.integrity`).

Beside it, one concern each (as the `nats_*` modules): `eventstore.sqlite_append` the group
commit (appends, imports), `eventstore.sqlite_verify` reads a log file without the store
(`broker verify`, the checks made before the writer opens a file), `eventstore.sqlite_compact`
compaction (its gaps, their anchors), `eventstore.sqlite_head` the record of the committed head
that a log found behind it fails, `eventstore.sqlite_threads` the writer lock, the writer thread
and the background checkpointer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from eventstore import integrity, sqlite_compact
from eventstore.base import (
    Envelope,
    IntegrityError,
    Listener,
    StoreUnavailable,
    subscribe_via_listener,
    type_matcher,
)
from eventstore.sqlite_append import GroupCommit, _Pending
from eventstore.sqlite_checkpoint import read_checkpoint
from eventstore.sqlite_compact import SCHEMA as COMPACTION_SCHEMA
from eventstore.sqlite_head import HeadWriter
from eventstore.sqlite_streams import Versions, mark, unflushed
from eventstore.sqlite_threads import Checkpointer, WriterLock, WriterThread
from eventstore.sqlite_verify import (
    APPLICATION_ID,
    CHUNK_OF,
    PAGE,
    check_before_writing,
    decode_chunk,
    hash_in,
    to_envelope,
    verify_file,
    verify_log,
)
from eventstore.sqlite_verify import StoredEvent as StoredEvent  # re-exported
from eventstore.sqlite_verify import hash_at_file as hash_at_file  # re-exported
from eventstore.sqlite_verify import (
    head_of_file as head_of_file,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
"""
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


T = TypeVar("T")
FORGET_SLICE = 512  # stream versions forgotten per transaction (forget_streams)


class SqliteStore(GroupCommit):
    # WAL bytes written between background checkpoints. Each checkpoint's writes and fsync of
    # the database file slow the commits' fsyncs while it runs (same disk, same filesystem
    # journal), so they are made rare rather than small (docs/performance.md).
    checkpoint_every = 32 * 1024 * 1024
    wal_limit = 256 * 1024 * 1024  # a WAL larger than this is started over after a checkpoint

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
        # (seq, hash) a snapshot proved: open() verifies the chain after seq only (see verify_file)
        self.trusted_prefix: tuple[int, bytes] | None = None
        # Told (seconds, events) after each group commit: the commit latency metric.
        self.commit_observer: Callable[[float, int], None] | None = None
        self._lock = WriterLock(self.path)
        # Writes go through one plain sqlite3 connection owned by one worker thread, so a group
        # commit (chunks, stream versions, COMMIT) is a single hop to that thread; reads use
        # aiosqlite on a second, read-only connection and only ever see committed events.
        self._wconn: sqlite3.Connection | None = None
        self._thread: WriterThread | None = None
        self._checkpointer: Checkpointer | None = None
        # The committed head recorded outside the log (eventstore/sqlite_head.py) after each
        # commit, and synced in the background when the log's commits are (FULL or EXTRA).
        self._head_writer: HeadWriter | None = None
        self._head_sync = sync in ("FULL", "EXTRA")
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
        self._waiting = Versions({})
        self._restored_gaps = False  # `broker import` of a compacted log (restore_gap)

    # --- lifecycle ---

    async def open(self) -> None:
        if self.readonly:
            if not await asyncio.to_thread(self.path.exists):
                raise StoreUnavailable(f"no log at {self.path}")
            self._rconn = await self._connect(f"file:{self.path}?mode=ro")
            await self._load_tail(self._rconn)
            self._versions = await asyncio.to_thread(_waiting_versions, self.path)
            return
        await asyncio.to_thread(self._lock.acquire)  # creates the directory too
        self._thread = WriterThread("sqlite-writer")
        try:
            # Read-only, before the writer's connection (which would change the file's header
            # to WAL mode and add our tables, or fold a damaged WAL's readable part into the
            # file): a refused file is left as it is.
            await asyncio.to_thread(check_before_writing, self.path)
            self._wconn = await self._run(self._open_writer)
            if self.verify_on_open:
                await asyncio.to_thread(self._verify_on_open)
            self._rconn = await self._connect(f"file:{self.path}?mode=ro")
            await self._load_tail(self._rconn)
            await self._run(self._record_head, self._head, self._last_hash, self._head_sync)
        except BaseException as exc:
            await self._close_connections()
            self._lock.release()
            if isinstance(exc, sqlite3.DatabaseError):
                raise IntegrityError(1, f"the log file {self.path} is damaged: {exc}") from None
            raise
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    def _verify_on_open(self) -> None:
        """From the furthest position already verified: the snapshot's the start loads (its
        hash matched the log's) or the verified checkpoint's (a verify reached it, and the log
        still holds its event with its hash); the whole log without either. The compactions
        whose gaps the checkpoint says were checked are not read again
        (eventstore.sqlite_verify.verify_log)."""
        cp = read_checkpoint(self.path)
        trusted = self.trusted_prefix
        if cp is not None and (trusted is None or cp.seq > trusted[0]):
            trusted = (cp.seq, bytes.fromhex(cp.hash))
        if trusted is None:
            verify_file(self.path)
            return
        verify_log(self.path, trusted=trusted, compactions=cp.compactions if cp else 0)

    def _run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on the writer thread."""
        assert self._thread is not None
        return self._thread.call(fn, *args)

    def _open_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # see Checkpointer
        # Temporary tables and indices of a statement (e.g. a commit touching many streams)
        # stay in memory: a temporary file needs a file descriptor, which a busy server may
        # not have to spare at that moment (issue 14).
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.executescript(SCHEMA + COMPACTION_SCHEMA)
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        mark(conn)
        conn.commit()
        _done, waiting = unflushed(conn)  # a damaged chunk: IntegrityError, as a verify says
        self._waiting = Versions(waiting)
        self._versions = dict(waiting)
        self._head_writer = HeadWriter(self.path)
        self._head_writer.open()
        self._checkpointer = Checkpointer(
            self.path, self.synchronous, self.checkpoint_every, self.wal_limit
        )
        return conn

    async def on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(connection, *args)` on the writer thread, between two group commits (the
        compaction's transactions: eventstore.sqlite_compact); then let the checkpointer count
        what it may have written (`nbytes=` of the result when it says)."""
        if self._wconn is None or self._writer is None:
            raise StoreUnavailable("the log is not open for writing")
        return await self._run(self._call_writer, fn, args)

    async def forget_streams(self, counts: Mapping[str, int]) -> int:
        """Forget the versions of streams whose every event a compaction removed (`counts`:
        each one's number of events; eventstore.sqlite_compact.forget_streams), from the table
        and the version cache, a slice per transaction between group commits. Returns how many
        were forgotten. A send may then use such a message id again (expected version 0)."""
        items = list(counts.items())
        forgotten = 0
        for i in range(0, len(items), FORGET_SLICE):
            forgotten += await self.on_writer(self._forget_slice, items[i : i + FORGET_SLICE])
        return forgotten

    def _forget_slice(self, conn: sqlite3.Connection, items: list[tuple[str, int]]) -> int:
        dropped = sqlite_compact.forget_streams(conn, items, self._waiting.waiting())
        for stream in dropped:  # the loop reads the cache: one atomic step each
            self._versions.pop(stream, None)
        return len(dropped)

    def _call_writer(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._wconn
        assert conn is not None
        result = fn(conn, *args)
        if self._checkpointer is not None and isinstance(result, tuple) and len(result) == 3:
            try:
                self._checkpointer.wrote(conn, int(result[2]))
            except (sqlite3.Error, RuntimeError):
                log.warning("WAL checkpoint failed", exc_info=True)
        return result

    async def _connect(self, target: str) -> aiosqlite.Connection:
        try:
            conn = await aiosqlite.connect(target, uri=target.startswith("file:"))
            await conn.execute("PRAGMA query_only=1" if "mode=ro" in target else "SELECT 1")
            await conn.execute("PRAGMA temp_store=MEMORY")  # no temporary files (see the writer)
            return conn
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(1, f"the log file {self.path} is damaged: {exc}") from None

    async def _load_tail(self, conn: aiosqlite.Connection) -> None:
        try:
            async with conn.execute(
                "SELECT first_seq, last_seq, body, crc FROM chunks ORDER BY first_seq DESC LIMIT 1"
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(1, f"the log file {self.path} is damaged: {exc}") from None
        if row is not None:
            last = decode_chunk(tuple(row))[-1]  # type: ignore[arg-type]
            self._head, self._last_ts, self._last_hash = last.seq, last.ts, last.hash

    async def close(self) -> None:
        if self._writer is not None:
            self._closing = True
            self._wakeup.set()
            await self._writer
            self._writer = None
        await self._close_connections()
        self._lock.release()

    async def _close_connections(self) -> None:
        if self._rconn is not None:
            with contextlib.suppress(Exception):
                await self._rconn.close()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.close)
            self._checkpointer = None
        if self._wconn is not None:
            with contextlib.suppress(Exception):
                await self._run(self._wconn.close)
        if self._head_writer is not None:
            with contextlib.suppress(Exception):
                await self._run(self._head_writer.close)
            self._head_writer = None
        if self._thread is not None:
            self._thread.stop()
        self._wconn = self._rconn = None
        self._thread = None

    # --- reading ---

    async def read(
        self, from_seq: int = 1, to_seq: int | None = None, types: Iterable[str] | None = None
    ) -> AsyncGenerator[Envelope, None]:
        conn = self._rconn
        if conn is None:
            raise StoreUnavailable("the log is not open")
        match = type_matcher(types)
        end = self._head if to_seq is None else min(to_seq, self._head)
        next_seq = max(from_seq, 1)
        if next_seq > end:
            return
        try:
            async with conn.execute(
                "SELECT MAX(first_seq) FROM chunks WHERE first_seq <= ?", (next_seq,)
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(next_seq, f"the log file is damaged: {exc}") from None
        chunk_from = row[0] if row and row[0] is not None else 1
        while next_seq <= end:
            try:
                async with conn.execute(
                    "SELECT first_seq, last_seq, body, crc FROM chunks "
                    "WHERE first_seq >= ? AND first_seq <= ? ORDER BY first_seq LIMIT ?",
                    (chunk_from, end, PAGE),
                ) as cur:
                    rows: list[Any] = list(await cur.fetchall())
            except sqlite3.DatabaseError as exc:
                raise IntegrityError(next_seq, f"the log file is damaged: {exc}") from None
            if not rows:
                return  # the rest was compacted away (broker verify proves the gaps)
            for row in rows:
                if row[1] < next_seq:
                    continue
                for rec in decode_chunk(row):
                    if rec.seq < next_seq:
                        continue
                    if rec.seq > end:
                        return
                    # A seq skipped is a gap a compaction left; `broker verify` proves each is
                    # recorded (eventstore.sqlite_compact), reads take the kept events as stored.
                    next_seq = rec.seq + 1
                    if match is None or match(rec.type):
                        yield to_envelope(rec)
            chunk_from = rows[-1][0] + 1

    def subscribe(
        self, from_seq: int = 1, max_buffer: int = 10_000
    ) -> AsyncGenerator[Envelope, None]:
        return subscribe_via_listener(self, from_seq, max_buffer)

    async def head(self) -> int:
        return self._head

    async def hash_at(self, seq: int) -> bytes | None:
        """The chain hash stored with event `seq` (None past the head); read-only."""
        if seq == self._head:
            return self._last_hash
        if seq < 1 or seq > self._head:
            return integrity.GENESIS if seq == 0 else None
        conn = self._rconn
        if conn is None:
            raise StoreUnavailable("the log is not open")
        async with conn.execute(CHUNK_OF, (seq,)) as cur:
            row = await cur.fetchone()
        return hash_in(row, seq)  # type: ignore[arg-type]

    async def stream_version(self, stream: str) -> int:
        if stream in self._versions:
            return self._versions[stream]
        conn = self._rconn
        if conn is None:
            raise StoreUnavailable("the log is not open")
        async with conn.execute("SELECT version FROM streams WHERE stream = ?", (stream,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def _waiting_versions(path: Path) -> dict[str, int]:
    """The stream versions not in the log's table yet (eventstore.sqlite_streams), for a
    read-only open; blocking."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return unflushed(conn)[1]
    finally:
        conn.close()
