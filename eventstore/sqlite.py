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
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import aiosqlite
import msgspec

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
_INSERT_CHUNK = "INSERT INTO chunks (first_seq, last_seq, body, crc) VALUES (?, ?, ?, ?)"
_UPSERT_STREAM = (
    "INSERT INTO streams (stream, version) VALUES (?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET version = excluded.version"
)
_CHUNK_EVENTS = 4096  # at most this many events per stored chunk
_PAGE = 64  # chunks fetched per read query
_VERSION_CACHE_LIMIT = 200_000
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class StoredEvent(msgspec.Struct, array_like=True, gc=False):
    """One event as stored inside a chunk: the envelope fields, the event's msgpack bytes and
    its chain hash."""

    seq: int
    id: str
    stream: str
    stream_version: int
    ts: float
    type: str
    data: bytes
    hash: bytes


_chunk_encoder = msgspec.msgpack.Encoder()
_chunk_decoder = msgspec.msgpack.Decoder(list[StoredEvent])
ChunkRow = tuple[int, int, bytes, int]
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


def _decode_chunk(row: ChunkRow) -> list[StoredEvent]:
    first, last, body, crc = row
    if integrity.checksum(body) != crc:
        raise IntegrityError(first, f"checksum mismatch in events {first}..{last}")
    try:
        records = _chunk_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise IntegrityError(first, f"undecodable events {first}..{last}: {exc}") from None
    if not records or records[0].seq != first or records[-1].seq != last:
        raise IntegrityError(first, f"events {first}..{last} do not match their chunk")
    return records


def _to_envelope(rec: StoredEvent) -> Envelope:
    try:
        event = decode_event(rec.data)
    except Exception as exc:  # msgspec.DecodeError, ValidationError
        raise IntegrityError(rec.seq, f"undecodable event: {exc}") from None
    return Envelope(rec.seq, rec.stream, rec.stream_version, rec.ts, rec.id, event)


def verify_file(
    path: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
    *,
    trusted: tuple[int, bytes] | None = None,
) -> int:
    """Check the whole log at `path`: contiguous seqs, chunk checksums, every event's chain hash,
    and that every event decodes. Returns the number of events; raises IntegrityError naming the
    first bad seq.

    `trusted=(seq, hash)` verifies from seq + 1 only: the prefix up to `seq` was verified when
    `hash` was read from the log (a snapshot's position); the stored hash at `seq` must equal it."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise IntegrityError(1, f"cannot open the log: {exc}") from None
    try:
        return _verify_chunks(conn, progress, trusted)
    finally:
        conn.close()


def hash_at_file(path: str | os.PathLike[str], seq: int) -> bytes | None:
    """The chain hash stored with event `seq` in the log at `path` (None if there is no such
    event or no log); blocking, read-only."""
    if seq < 1:
        return integrity.GENESIS if seq == 0 else None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(_CHUNK_OF, (seq,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return _hash_in(row, seq)


_CHUNK_OF = (
    "SELECT first_seq, last_seq, body, crc FROM chunks WHERE first_seq <= ? "
    "ORDER BY first_seq DESC LIMIT 1"
)


def _hash_in(row: ChunkRow | None, seq: int) -> bytes | None:
    if row is None or not row[0] <= seq <= row[1]:
        return None
    rec = _decode_chunk(row)[seq - row[0]]
    return rec.hash if rec.seq == seq else None


def _verify_chunks(
    conn: sqlite3.Connection,
    progress: Callable[[int, int], None] | None,
    trusted: tuple[int, bytes] | None = None,
) -> int:
    expected = 1
    prev = integrity.GENESIS
    trusted_seq, trusted_hash = trusted or (0, integrity.GENESIS)
    try:
        total = conn.execute("SELECT COALESCE(MAX(last_seq), 0) FROM chunks").fetchone()[0]
        if trusted_seq > 0:
            row = conn.execute(_CHUNK_OF, (trusted_seq,)).fetchone()
            expected = row[0] if row is not None else 1
        cur = conn.execute(
            "SELECT first_seq, last_seq, body, crc FROM chunks WHERE first_seq >= ? "
            "ORDER BY first_seq",
            (expected,),
        )
        while rows := cur.fetchmany(_PAGE):
            for first, last, body, crc in rows:
                if first != expected:
                    raise IntegrityError(
                        expected, f"event missing (next stored event is seq {first})"
                    )
                try:
                    records = _chunk_decoder.decode(body)
                except msgspec.DecodeError as exc:
                    raise IntegrityError(
                        first, f"undecodable events {first}..{last}: {exc}"
                    ) from None
                for rec in records:
                    if rec.seq != expected:
                        raise IntegrityError(
                            expected, f"event missing or out of order (found seq {rec.seq})"
                        )
                    if rec.seq <= trusted_seq:  # verified before: take its hash as it is
                        if rec.seq == trusted_seq and rec.hash != trusted_hash:
                            raise IntegrityError(rec.seq, "hash differs from the trusted one")
                        prev = rec.hash
                        expected += 1
                        continue
                    h = integrity.chain_hash(
                        prev, rec.seq, rec.stream, rec.stream_version, rec.ts, rec.id, rec.data
                    )
                    if h != rec.hash:
                        raise IntegrityError(
                            rec.seq, "hash chain broken (event altered, removed or reordered)"
                        )
                    _to_envelope(rec)
                    prev = h
                    expected += 1
                if expected - 1 != last:
                    raise IntegrityError(expected, f"event missing (chunk {first}..{last})")
                if integrity.checksum(body) != crc:
                    raise IntegrityError(first, f"checksum mismatch in events {first}..{last}")
            if progress is not None:
                progress(expected - 1, total)
        if expected - 1 < trusted_seq:
            raise IntegrityError(expected, f"event missing (the log ends before {trusted_seq})")
        return expected - 1
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(expected, f"the log file is damaged: {exc}") from None


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
        # (seq, hash) a snapshot proved: open() verifies the chain after seq only (see verify_file)
        self.trusted_prefix: tuple[int, bytes] | None = None
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
                await asyncio.to_thread(verify_file, self.path, trusted=self.trusted_prefix)
            await self._load_tail(self._wconn)
            self._rconn = await self._connect(f"file:{self.path}?mode=ro")
        except BaseException as exc:
            await self._close_connections()
            self._lock.release()
            if isinstance(exc, sqlite3.DatabaseError):
                raise IntegrityError(1, f"the log file {self.path} is damaged: {exc}") from None
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
                "SELECT first_seq, last_seq, body, crc FROM chunks ORDER BY first_seq DESC LIMIT 1"
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(1, f"the log file {self.path} is damaged: {exc}") from None
        if row is not None:
            last = _decode_chunk(tuple(row))[-1]  # type: ignore[arg-type]
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

    async def _versions_of(self, streams: Iterable[str]) -> None:
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
                f"SELECT stream, version FROM streams WHERE stream IN ({marks})", chunk
            ) as cur:
                async for stream, version in cur:
                    found[stream] = version
            for s in chunk:
                self._versions[s] = found.get(s, 0)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        streams: set[str] = set()
        for events, _expected, fut in batch:
            if not fut.done():
                streams.update(e.stream for e in events)
        await self._versions_of(streams)

        overlay: dict[str, int] = {}
        versions = self._versions
        seq = self._head
        ts = max(time.time(), self._last_ts)
        ids = os.urandom(16 * sum(len(ev) for ev, _, _ in batch)).hex()
        id_pos = 0
        envelopes: list[Envelope] = []
        accepted: list[tuple[asyncio.Future[list[Envelope]], int, int]] = []
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
            start = len(envelopes)
            for event in events:
                stream = event.stream
                version = overlay[stream] = overlay.get(stream, versions.get(stream, 0)) + 1
                seq += 1
                envelopes.append(
                    Envelope(seq, stream, version, ts, ids[id_pos : id_pos + 32], event)
                )
                id_pos += 32
            accepted.append((fut, start, len(envelopes)))
        if not envelopes:
            return
        await self._write(envelopes, overlay)
        for fut, start, end in accepted:
            if not fut.done():
                fut.set_result(envelopes[start:end])

    async def _write(self, envelopes: list[Envelope], versions: dict[str, int]) -> None:
        """Store `envelopes` (continuing the log) and the new stream `versions` in one
        transaction, then update the in-memory tail and call the listeners."""
        conn = self._wconn
        assert conn is not None
        prev = self._last_hash
        # The hot loop: `integrity.chain_hash` inlined, and each record built as a tuple, which
        # msgpack-encodes exactly as the array-like StoredEvent it is read back as.
        sha256, header, encode = hashlib.sha256, integrity.header, encode_event
        records: list[tuple[int, str, str, int, float, str, bytes, bytes]] = []
        append = records.append
        for env in envelopes:
            event, seq, stream, version, ts, event_id = (
                env.event, env.seq, env.stream, env.stream_version, env.ts, env.id,
            )
            data = encode(event)
            prev = sha256(
                b"".join(
                    (prev, header(seq, version, ts), event_id.encode(), b"\0", stream.encode(),
                     b"\0", data)
                )
            ).digest()
            append((seq, event_id, stream, version, ts, event.event_type, data, prev))
        rows: list[ChunkRow] = []
        for i in range(0, len(records), _CHUNK_EVENTS):
            part = records[i : i + _CHUNK_EVENTS]
            body = _chunk_encoder.encode(part)
            rows.append((part[0][0], part[-1][0], body, integrity.checksum(body)))
        try:
            await conn.executemany(_INSERT_CHUNK, rows)
            await conn.executemany(_UPSERT_STREAM, versions.items())
            await conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.rollback()
            raise
        last = envelopes[-1]
        self._head, self._last_hash, self._last_ts = last.seq, prev, max(self._last_ts, last.ts)
        self._versions.update(versions)
        for listener in list(self._listeners):
            try:
                listener(envelopes)
            except Exception:
                log.exception("log listener failed")

    async def restore(self, envelopes: Sequence[Envelope]) -> None:
        """Write already-recorded envelopes as they are (seq, ts, id kept): for `broker import`.

        They must continue the log exactly (first seq = head + 1, contiguous, stream versions
        in order); the hash chain is recomputed."""
        if self._wconn is None or self._writer is None:
            raise StoreUnavailable("the log is not open for writing")
        if not envelopes:
            return
        await self._versions_of({env.stream for env in envelopes})
        overlay: dict[str, int] = {}
        seq = self._head
        for env in envelopes:
            seq += 1
            if env.seq != seq:
                raise IntegrityError(seq, f"import out of order: got seq {env.seq}")
            version = overlay.get(env.stream, self._versions.get(env.stream, 0)) + 1
            if env.stream_version != version:
                raise IntegrityError(
                    env.seq,
                    f"stream {env.stream!r} at version {env.stream_version}, expected {version}",
                )
            overlay[env.stream] = version
        await self._write(list(envelopes), overlay)

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
                    (chunk_from, end, _PAGE),
                ) as cur:
                    rows: list[Any] = list(await cur.fetchall())
            except sqlite3.DatabaseError as exc:
                raise IntegrityError(next_seq, f"the log file is damaged: {exc}") from None
            if not rows:
                raise IntegrityError(next_seq, "event missing")
            for row in rows:
                if row[1] < next_seq:
                    continue
                if row[0] > next_seq:
                    raise IntegrityError(next_seq, f"event missing (next stored is {row[0]})")
                for rec in _decode_chunk(row):
                    if rec.seq < next_seq:
                        continue
                    if rec.seq > end:
                        return
                    if rec.seq != next_seq:
                        raise IntegrityError(next_seq, "event missing or out of order")
                    next_seq += 1
                    if match is None or match(rec.type):
                        yield _to_envelope(rec)
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
        async with conn.execute(_CHUNK_OF, (seq,)) as cur:
            row = await cur.fetchone()
        return _hash_in(row, seq)  # type: ignore[arg-type]

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
