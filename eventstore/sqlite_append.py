"""The writing side of the SQLite log (eventstore.sqlite): group commit.

`append` queues its events and wakes the writer thread if it is idle. The writer thread drains
every pending append into a single transaction (the expected versions decided, then chunks of
msgpack records, each with its CRC-32 and chain hash, then COMMIT: the fsync), and hands the
outcome back to the loop, which calls the listeners, then resolves every waiter. The versions a
commit gives its streams reach the `streams` table later, between commits
(eventstore.sqlite_streams). Appends made while a commit is on its way to the disk go into the
next one, which the writer thread starts as soon as the last is done: a busy log costs the loop
one hand-back per commit, not a round trip (docs/performance.md, "The commit's loop side").
`restore` writes already-recorded envelopes as they are (`broker import`).

A mixin of `SqliteStore`, which owns the connections, the writer thread and the lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec

from eventstore import integrity, sqlite_compact
from eventstore.base import (
    ConcurrencyError,
    Envelope,
    EventNotEncodable,
    ExpectedVersion,
    IntegrityError,
    Listener,
    StoreUnavailable,
    resolve_expected,
)
from eventstore.codec import encode_event, encode_events
from eventstore.events import BaseEvent
from eventstore.sqlite_head import HeadWriter
from eventstore.sqlite_streams import Versions
from eventstore.sqlite_threads import Checkpointer, WriterThread
from eventstore.sqlite_verify import ChunkRow

log = logging.getLogger("eventstore.sqlite")
T = TypeVar("T")

_INSERT_CHUNK = "INSERT INTO chunks (first_seq, last_seq, body, crc) VALUES (?, ?, ?, ?)"
_CHUNK_EVENTS = 4096  # at most this many events per stored chunk
_VERSION_CACHE_LIMIT = 200_000


class _Unencodable(Exception):
    """An event of the batch could not be encoded: nothing was recorded; the batch is decided
    again without the appends holding such an event (they get EventNotEncodable)."""


_chunk_encoder = msgspec.msgpack.Encoder()
_Pending = tuple[Sequence[BaseEvent], ExpectedVersion, "asyncio.Future[list[Envelope]]"]


_Outcome = tuple["asyncio.Future[list[Envelope]]", "list[Envelope] | BaseException"]


def _refuse_unencodable(batch: list[_Pending]) -> list[_Outcome]:
    """The appends of `batch` holding an event that cannot be encoded, each with its
    EventNotEncodable."""
    found: list[_Outcome] = []
    for events, _expected, fut in batch:
        try:
            encode_events(events)
        except EventNotEncodable as exc:
            found.append((fut, exc))
    return found


class GroupCommit:
    """Appends and imports (see the module doc)."""

    _wconn: sqlite3.Connection | None
    commit_observer: Callable[[float, int], None] | None
    _checkpointer: Checkpointer | None
    _head_writer: HeadWriter | None
    _head_sync: bool
    _listeners: list[Listener]
    # Appends waiting for the writer thread. Only the loop appends (at the end) and only the
    # writer thread takes (from the front: a slice, then `del`), each step atomic under the GIL.
    _pending: list[_Pending]
    _wakeup: asyncio.Event
    _writer: asyncio.Task[None] | None
    _thread: WriterThread | None
    _closing: bool
    _head: int  # the loop's view: the last envelope its listeners saw
    _last_hash: bytes
    _last_ts: float
    # The latest version of streams (a cache, and every version not in the table yet): set
    # and replaced by the writer thread only; the loop reads it.
    _versions: dict[str, int]
    _waiting: Versions  # the writer thread's versions on their way to the table
    _restored_gaps: bool
    # The writer thread's own end of the log, ahead of the loop's view while a commit's
    # outcome is on its way to the loop; None until its first commit after `open`.
    _w_seq: int | None = None
    _w_hash: bytes = b""
    _w_ts: float = 0.0
    _kicked = False  # a drain of `_pending` is queued or running on the writer thread

    def _run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        raise NotImplementedError

    async def append(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Envelope]:
        if self._writer is None or self._closing or self._thread is None:
            raise StoreUnavailable("the log is not open for writing")
        if not events:
            return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Envelope]] = loop.create_future()
        self._pending.append((events, expected_version, fut))
        if not self._kicked:  # the writer thread is idle, or about to be: wake it
            self._kicked = True
            self._thread.post(self._drain, loop)
        return await fut

    async def _write_loop(self) -> None:
        """Lives while the store is open; at close, waits for the writer thread to have
        committed (and handed back) every append made before."""
        while not self._closing:
            await self._wakeup.wait()
            self._wakeup.clear()
        await self._run(self._flush_versions, True)
        self._w_seq = None

    # --- on the writer thread ---

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit every waiting append, a batch per transaction, until none is left: appends
        made while a commit is on its way to the disk are taken by the next one here, without
        a round trip through the loop."""
        pending = self._pending
        while True:
            n = len(pending)
            if not n:
                if self._flush_versions():  # a slice of stream versions, while nothing waits
                    continue
                self._kicked = False  # an append after this line wakes us again
                if not pending:
                    return
                continue
            batch = pending[:n]
            del pending[:n]
            try:
                self._commit_batch(loop, batch)
            except Exception as exc:  # never let the writer die: fail this batch only
                log.exception("append batch failed")
                err = StoreUnavailable(f"the log could not be written: {exc}")
                _hand_back(loop, self._committed, [], b"", 0.0, [(p[2], err) for p in batch])
            if self._waiting.pressing():  # appends never pause: between commits too
                self._flush_versions()

    def _writer_tail(self) -> int:
        if self._w_seq is None:
            self._w_seq, self._w_hash, self._w_ts = self._head, self._last_hash, self._last_ts
        return self._w_seq

    def _versions_of(self, streams: Iterable[str]) -> None:
        """Make sure the cache knows the version of every stream in `streams`."""
        missing = [s for s in streams if s not in self._versions]
        if not missing:
            return
        if len(self._versions) + len(missing) > _VERSION_CACHE_LIMIT:
            fresh = self._waiting.waiting()  # not in the table yet: always kept
            fresh.update(self._lookup(missing))
            self._versions = fresh  # one step: the loop never sees it half filled
        else:
            self._versions.update(self._lookup(missing))

    def _lookup(self, streams: list[str]) -> dict[str, int]:
        assert self._wconn is not None
        found = dict.fromkeys(streams, 0)
        for i in range(0, len(streams), 500):
            chunk = streams[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                self._wconn.execute(
                    f"SELECT stream, version FROM streams WHERE stream IN ({marks})", chunk
                ).fetchall()
            )
        return found

    def _commit_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        """Decide `batch` (expected versions), record the accepted appends in one transaction,
        and hand every outcome back to the loop (`_committed`)."""
        refused: list[_Outcome] = []
        while True:
            live = [p for p in batch if not p[2].done()]  # a caller gone: record nothing
            envelopes, overlay, accepted, conflicts = self._decide(live)
            if not envelopes:
                _hand_back(loop, self._committed, [], b"", 0.0, refused + conflicts)
                return
            try:
                prev, seconds = self._write(envelopes, overlay)
            except _Unencodable as exc:  # nothing was recorded: again without the culprits
                bad = _refuse_unencodable(live)
                if not bad:
                    raise StoreUnavailable(f"the log could not be written: {exc}") from None
                refused += bad
                culprits = {fut for fut, _err in bad}
                batch = [p for p in live if p[2] not in culprits]
                continue
            outcomes = refused + conflicts
            outcomes += [(fut, envelopes[start:end]) for fut, start, end in accepted]
            _hand_back(loop, self._committed, envelopes, prev, seconds, outcomes)
            return

    def _decide(
        self, batch: list[_Pending]
    ) -> tuple[
        list[Envelope],
        dict[str, int],
        list[tuple[asyncio.Future[list[Envelope]], int, int]],
        list[_Outcome],
    ]:
        """The envelopes of the appends of `batch` whose expected versions hold, the versions
        they give their streams, which envelopes are whose, and the conflicts."""
        streams: set[str] = set()
        streams_of: list[list[str]] = []  # each append's events' streams, computed once
        for events, _expected, _fut in batch:
            names = [e.stream for e in events]
            streams_of.append(names)
            streams.update(names)
        self._versions_of(streams)  # a stream unknown to the cache is asked of the table
        known = self._versions

        overlay: dict[str, int] = {}  # the versions this commit gives its streams
        seq = self._writer_tail()
        ts = max(time.time(), self._w_ts)
        ids = os.urandom(16 * sum(len(ev) for ev, _, _ in batch)).hex()
        id_pos = 0
        envelopes: list[Envelope] = []
        accepted: list[tuple[asyncio.Future[list[Envelope]], int, int]] = []
        conflicts: list[_Outcome] = []
        for (events, expected, fut), names in zip(batch, streams_of, strict=True):
            conflict = None
            for stream, want in resolve_expected(events, expected).items():
                have = overlay.get(stream)
                if have is None:
                    have = known.get(stream, 0)
                if have != want:
                    conflict = ConcurrencyError(stream, want, have)
                    break
            if conflict is not None:
                conflicts.append((fut, conflict))
                continue
            start = len(envelopes)
            for event, stream in zip(events, names, strict=True):
                version = overlay[stream] = overlay.get(stream, known.get(stream, 0)) + 1
                seq += 1
                envelopes.append(
                    Envelope(seq, stream, version, ts, ids[id_pos : id_pos + 32], event)
                )
                id_pos += 32
            accepted.append((fut, start, len(envelopes)))
        return envelopes, overlay, accepted, conflicts

    def _write(
        self,
        envelopes: list[Envelope],
        versions: dict[str, int],
    ) -> tuple[bytes, float]:
        """Store `envelopes` (continuing the log) in one transaction and move the writer's end
        of the log on, and the stream `versions` they give on their way to the table; the
        chain hash of the last envelope and the seconds the transaction took."""
        assert self._wconn is not None
        self._writer_tail()
        prev = self._w_hash
        # The hot loop: `integrity.chain_hash` inlined, and each record built as a tuple, which
        # msgpack-encodes exactly as the array-like StoredEvent it is read back as.
        sha256, header, encode = hashlib.sha256, integrity.header, encode_event
        records: list[tuple[int, str, str, int, float, str, bytes, bytes]] = []
        append = records.append
        # Each event is encoded here, once: one that cannot be encoded fails the batch before
        # anything is written, and the batch is decided again without the appends holding one
        # (_commit_batch); the happy path pays only for the `try`.
        try:
            for env in envelopes:
                event, seq, stream, version, ts, event_id = (
                    env.event,
                    env.seq,
                    env.stream,
                    env.stream_version,
                    env.ts,
                    env.id,
                )
                data = encode(event)
                prev = sha256(
                    b"".join(
                        (
                            prev,
                            header(seq, version, ts),
                            event_id.encode(),
                            b"\0",
                            stream.encode(),
                            b"\0",
                            data,
                        )
                    )
                ).digest()
                append((seq, event_id, stream, version, ts, event.event_type, data, prev))
        except (OverflowError, TypeError, ValueError, RecursionError, msgspec.EncodeError) as exc:
            raise _Unencodable(str(exc)) from None
        rows: list[ChunkRow] = []
        for i in range(0, len(records), _CHUNK_EVENTS):
            part = records[i : i + _CHUNK_EVENTS]
            body = _chunk_encoder.encode(part)
            rows.append((part[0][0], part[-1][0], body, integrity.checksum(body)))
        t0 = time.perf_counter()
        self._commit_rows(rows, envelopes[-1].seq, prev)
        seconds = time.perf_counter() - t0
        last = envelopes[-1]
        self._w_seq, self._w_hash, self._w_ts = last.seq, prev, max(self._w_ts, last.ts)
        self._versions.update(versions)
        self._waiting.committed(versions)
        return prev, seconds

    # --- back on the loop ---

    def _committed(
        self, envelopes: list[Envelope], prev: bytes, seconds: float, outcomes: list[_Outcome]
    ) -> None:
        """A commit's outcome, on the loop, in commit order: the loop's view of the log moves
        on, the listeners see the envelopes, then every append of the batch is answered."""
        if envelopes:
            last = envelopes[-1]
            self._head, self._last_hash = last.seq, prev
            self._last_ts = max(self._last_ts, last.ts)
            if self.commit_observer is not None:  # the commit latency metric (monitoring)
                self.commit_observer(seconds, len(envelopes))
            for listener in list(self._listeners):
                try:
                    listener(envelopes)
                except Exception:
                    log.exception("log listener failed")
        for fut, outcome in outcomes:
            if fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

    def _commit_rows(
        self,
        rows: list[ChunkRow],
        head: int,
        head_hash: bytes,
    ) -> None:
        """One transaction on the writer thread: chunks, COMMIT (the fsync); then the record
        of the new head (`head`, `head_hash`), before the append returns."""
        conn = self._wconn
        assert conn is not None
        try:
            if len(rows) == 1:
                conn.execute(_INSERT_CHUNK, rows[0])
            else:
                conn.executemany(_INSERT_CHUNK, rows)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        self._record_head(head, head_hash, self._head_sync)
        self._wrote(sum(len(row[2]) for row in rows))

    def _wrote(self, nbytes: int) -> None:
        """Tell the checkpointer (after a commit: its errors are not the commit's)."""
        if self._checkpointer is not None and self._wconn is not None:
            try:
                self._checkpointer.wrote(self._wconn, nbytes)
            except (sqlite3.Error, RuntimeError):
                log.warning("WAL checkpoint failed", exc_info=True)

    def _flush_versions(self, everything: bool = False) -> bool:
        """Writer thread, between commits: the next slice of stream versions to the table when
        a flush is due (all of them: `everything`, at close); whether one was written. A
        failure is logged; the versions stay waiting (an open reads them back from the
        chunks)."""
        waiting, conn = self._waiting, self._wconn
        if conn is None:
            return False
        wrote = False
        try:
            while waiting.due() or everything and (waiting.unflushed or waiting.flushing):
                self._wrote(waiting.flush_step(conn, self._writer_tail()))
                wrote = True
                if not everything:
                    break
        except sqlite3.Error:
            log.warning("stream versions could not be written", exc_info=True)
            return False
        return wrote

    async def restore_gap(self, first: int, last: int, anchor: bytes, compaction: int) -> None:
        """Record a gap of an exported compacted log (`broker import`): seqs `first`..`last`
        were removed by the compaction at seq `compaction`; the next event chains from `anchor`,
        the chain hash of the last removed one (eventstore.sqlite_compact)."""
        if self._wconn is None or self._writer is None:
            raise StoreUnavailable("the log is not open for writing")
        await self._run(self._restore_gap, first, last, anchor, compaction)
        self._head, self._last_hash = last, anchor

    def _restore_gap(self, first: int, last: int, anchor: bytes, compaction: int) -> None:
        head = self._writer_tail()
        if first != head + 1 or last < first or compaction <= last or len(anchor) != 32:
            raise IntegrityError(
                first, f"import out of order: gap {first}..{last} after seq {head}"
            )
        assert self._wconn is not None
        sqlite_compact.record_imported_gap(self._wconn, first, last, anchor, compaction)
        self._w_seq, self._w_hash = last, anchor
        self._restored_gaps = True

    def _record_head(self, seq: int, chain: bytes, sync: bool) -> None:
        """Record the committed head (writer thread). A failure does not fail the append, whose
        events are committed: the record lags behind the log, which is allowed."""
        writer = self._head_writer
        if writer is None or seq <= writer.seq:
            return
        try:
            writer.write(seq, chain)
            if sync:
                writer.sync_soon()
        except OSError:
            log.warning("the log's head record could not be written", exc_info=True)

    async def restore(self, envelopes: Sequence[Envelope]) -> None:
        """Write already-recorded envelopes as they are (seq, ts, id kept): for `broker import`.

        They must continue the log exactly (first seq = head + 1, contiguous, stream versions
        in order), except across the gaps of a compacted log restored before them
        (`restore_gap`): there a stream's version may jump, as the compaction left it. The hash
        chain is recomputed (from a gap's anchor after a gap: the kept events' hashes come out
        as they were)."""
        if self._wconn is None or self._writer is None:
            raise StoreUnavailable("the log is not open for writing")
        if not envelopes:
            return
        await self._run(self._restore, asyncio.get_running_loop(), list(envelopes))

    def _restore(self, loop: asyncio.AbstractEventLoop, envelopes: list[Envelope]) -> None:
        """The writer thread's side of `restore`: the listeners see the envelopes before the
        call returns (`_committed` is handed back ahead of the call's own result)."""
        self._versions_of({env.stream for env in envelopes})
        overlay: dict[str, int] = {}
        seq = self._writer_tail()
        for env in envelopes:
            seq += 1
            if env.seq != seq:
                raise IntegrityError(seq, f"import out of order: got seq {env.seq}")
            version = overlay.get(env.stream, self._versions.get(env.stream, 0)) + 1
            if self._restored_gaps and env.stream_version > version:
                version = env.stream_version  # the versions between were compacted away
            if env.stream_version != version:
                raise IntegrityError(
                    env.seq,
                    f"stream {env.stream!r} at version {env.stream_version}, expected {version}",
                )
            overlay[env.stream] = version
        try:
            prev, seconds = self._write(envelopes, overlay)
        except _Unencodable as exc:
            encode_events([env.event for env in envelopes])  # raises EventNotEncodable
            raise StoreUnavailable(f"the log could not be written: {exc}") from None
        _hand_back(loop, self._committed, envelopes, prev, seconds, [])
        while self._waiting.pressing() and self._flush_versions():
            pass  # an import's new streams go to the table as fast as they come


def _hand_back(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Schedule `fn(*args)` on `loop` from the writer thread (nothing if the loop is closed:
    nobody waits)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
