"""The archive of a SQLite log: what compactions removed, kept in files of their own.

With `[retention] archive_dir` set, a compaction writes every event it is about to remove to a
new archive file before it records anything (`write`): the file is complete, fsynced and renamed
into place, or absent. The events are stored as they were in the log (the same records, chain
hashes included), so the archive and the log together hold the whole history, and `verify`
(`verify_with_archive`) walks the chain from the first event to the head, as if nothing had been
removed: a changed archived event breaks the chain like a changed kept one.

A file `events-<first seq>-<last seq>.archive` is a sequence of frames, each a header (body
length, CRC-32 of the body: big-endian u32 each) and a body (a msgpack list of stored records, as
a log chunk holds them). A compaction that fails after writing its file leaves events that are
also still in the log: reads take each seq once, and verify checks that both copies agree.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import os
import sqlite3
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

import msgspec

from eventstore import integrity
from eventstore.base import Envelope, IntegrityError, type_matcher
from eventstore.sqlite_compact import in_runs
from eventstore.sqlite_verify import PAGE, StoredEvent, decode_chunk, to_envelope

_FRAME = struct.Struct(">II")
_FRAME_EVENTS = 256  # records per frame
_encode = msgspec.msgpack.Encoder().encode
_decode_frame = msgspec.msgpack.Decoder(list[StoredEvent]).decode
SUFFIX = ".archive"


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)


def _records_in(path: Path, spans: list[tuple[int, int]]) -> Iterator[StoredEvent]:
    """The stored records of the log at `path` whose seqs lie in `spans` (sorted, disjoint):
    one pass over the chunks they touch, each decoded once."""
    starts = [first for first, _last in spans]
    conn = _connect(path)
    try:
        row = conn.execute(
            "SELECT MAX(first_seq) FROM chunks WHERE first_seq <= ?", (spans[0][0],)
        ).fetchone()
        cur = conn.execute(
            "SELECT first_seq, last_seq, body, crc FROM chunks "
            "WHERE first_seq >= ? AND first_seq <= ? ORDER BY first_seq",
            (row[0] if row and row[0] is not None else 1, spans[-1][1]),
        )
        while rows := cur.fetchmany(PAGE):
            for chunk in rows:
                i = bisect.bisect_right(starts, chunk[1]) - 1  # the last run starting in it
                if i < 0 or spans[i][1] < chunk[0]:
                    continue  # every run ends before this chunk, or starts after it
                for rec in decode_chunk(chunk):
                    if in_runs(rec.seq, starts, spans):
                        yield rec
    finally:
        conn.close()


def write(log: Path, spans: list[tuple[int, int]], directory: Path) -> Path | None:
    """Archive the events of `spans` (blocking): the new file, or None when there is nothing."""
    if not spans:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"events-{spans[0][0]:012d}-{spans[-1][1]:012d}{SUFFIX}"
    tmp = final.with_name(final.name + ".part")
    frame: list[StoredEvent] = []
    with open(tmp, "wb") as f:

        def flush() -> None:
            body = _encode(frame)
            f.write(_FRAME.pack(len(body), integrity.checksum(body)))
            f.write(body)
            frame.clear()

        for rec in _records_in(log, spans):
            frame.append(rec)
            if len(frame) >= _FRAME_EVENTS:
                flush()
        if frame:
            flush()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def files(directory: Path) -> list[Path]:
    """The archive files of `directory`, by first seq."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


def read_file(path: Path) -> Iterator[StoredEvent]:
    """The records of one archive file; IntegrityError names the file of a damaged frame."""
    with open(path, "rb") as f:
        while header := f.read(_FRAME.size):
            if len(header) < _FRAME.size:
                raise IntegrityError(0, f"{path.name}: truncated")
            size, crc = _FRAME.unpack(header)
            body = f.read(size)
            if len(body) < size or integrity.checksum(body) != crc:
                raise IntegrityError(0, f"{path.name}: a damaged frame (checksum mismatch)")
            try:
                yield from _decode_frame(body)
            except msgspec.DecodeError as exc:
                raise IntegrityError(0, f"{path.name}: undecodable: {exc}") from None


def read(directory: Path) -> Iterator[StoredEvent]:
    """Every archived record, in seq order (files may interleave when compactions overlap)."""
    return heapq.merge(*(read_file(p) for p in files(directory)), key=lambda r: r.seq)


def _log_records(path: Path) -> Iterator[StoredEvent]:
    conn = _connect(path)
    try:
        cur = conn.execute("SELECT first_seq, last_seq, body, crc FROM chunks ORDER BY first_seq")
        while rows := cur.fetchmany(PAGE):
            for row in rows:
                if integrity.checksum(row[2]) != row[3]:
                    raise IntegrityError(row[0], f"checksum mismatch in events {row[0]}..{row[1]}")
                yield from decode_chunk(row)
    finally:
        conn.close()


def merged(first: Iterable[StoredEvent], second: Iterable[StoredEvent]) -> Iterator[StoredEvent]:
    """Both record streams in seq order, each seq once; two copies of a seq must agree."""
    last: StoredEvent | None = None
    for rec in heapq.merge(first, second, key=lambda r: r.seq):
        if last is not None and rec.seq == last.seq:
            if rec.hash != last.hash or rec.data != last.data:
                raise IntegrityError(rec.seq, "the archive and the log hold different events")
            continue
        last = rec
        yield rec


def verify_with_archive(
    log: Path, directory: Path, progress: Callable[[int, int], None] | None = None
) -> int:
    """Walk the chain of the whole history, archive and log together, from the first event:
    the head's seq, or IntegrityError at the first seq missing from both or not chaining."""
    prev, expected = integrity.GENESIS, 1
    conn = _connect(log)
    try:
        total = conn.execute("SELECT COALESCE(MAX(last_seq), 0) FROM chunks").fetchone()[0]
    finally:
        conn.close()
    for rec in merged(_log_records(log), read(directory)):
        if rec.seq != expected:
            raise IntegrityError(
                expected,
                f"events {expected}..{rec.seq - 1} are neither in the log nor in the archive",
            )
        h = integrity.chain_hash(
            prev, rec.seq, rec.stream, rec.stream_version, rec.ts, rec.id, rec.data
        )
        if h != rec.hash:
            raise IntegrityError(rec.seq, "hash chain broken (event altered, removed or reordered)")
        prev, expected = h, expected + 1
        if progress is not None and expected % 100_000 == 0:
            progress(expected - 1, total)
    if progress is not None:
        progress(expected - 1, total)
    return expected - 1


def _between(directory: Path, from_seq: int, to_seq: int | None) -> Iterator[StoredEvent]:
    for rec in read(directory):
        if rec.seq >= from_seq and (to_seq is None or rec.seq <= to_seq):
            yield rec


async def with_archive(
    events: AsyncIterator[Envelope],
    directory: Path,
    from_seq: int = 1,
    to_seq: int | None = None,
    types: Iterable[str] | None = None,
) -> AsyncIterator[Envelope]:
    """The log's events (`events`, in seq order) and the archived ones between them, each seq
    once (for `broker replay`/`export --archive`). The archive is read by a thread, a batch of
    records at a time, as the log is walked."""
    match = type_matcher(types)
    source = _between(directory, from_seq, to_seq)  # opens the files on its first step
    batch: list[StoredEvent] = []

    async def pending() -> StoredEvent | None:
        if not batch:
            batch.extend(reversed(await asyncio.to_thread(list, itertools.islice(source, 1024))))
        return batch[-1] if batch else None

    async for env in events:
        while (rec := await pending()) is not None and rec.seq <= env.seq:
            batch.pop()
            if rec.seq < env.seq and (match is None or match(rec.type)):
                yield to_envelope(rec)
        yield env
    while (rec := await pending()) is not None:
        batch.pop()
        if match is None or match(rec.type):
            yield to_envelope(rec)
