"""The log file read without the store (blocking, read-only): `broker verify`, the hash and
the head at a seq, and the checks made before the writer touches a file.

A log is a SQLite database with two tables (`SCHEMA` in eventstore.sqlite): `chunks`, the events
in msgpack chunks (`StoredEvent`s) with a CRC-32 each, and `streams`, each stream's version.
Its header carries `APPLICATION_ID`.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from eventstore import integrity
from eventstore.base import Envelope, IntegrityError, StoreError
from eventstore.codec import decode_event
from eventstore.sqlite_head import check_head, read_head

# Our logs say so in their header (PRAGMA application_id, "BRKL"); logs made before it was set
# have 0 there and exactly our tables.
APPLICATION_ID = 0x42524B4C
_OLD_TABLES = frozenset({"chunks", "streams"})
_TABLES = _OLD_TABLES | {"gaps", "compactions"}  # the last two: eventstore.sqlite_compact
PAGE = 64  # chunks fetched per read query


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


_chunk_decoder = msgspec.msgpack.Decoder(list[StoredEvent])
ChunkRow = tuple[int, int, bytes, int]


def decode_chunk(row: ChunkRow) -> list[StoredEvent]:
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


def to_envelope(rec: StoredEvent) -> Envelope:
    try:
        event = decode_event(rec.data)
    except Exception as exc:  # msgspec.DecodeError, ValidationError
        raise IntegrityError(rec.seq, f"undecodable event: {exc}") from None
    return Envelope(rec.seq, rec.stream, rec.stream_version, rec.ts, rec.id, event)


class Verified(msgspec.Struct):
    head: int  # the last seq verified (the log's head when the read began)
    compactions: int  # the newest compaction whose gaps were checked (0: none)


def verify_file(
    path: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
    *,
    trusted: tuple[int, bytes] | None = None,
) -> int:
    """Check the whole log at `path`: contiguous seqs, chunk checksums, every event's chain hash,
    and that every event decodes. Returns the number of events; raises IntegrityError naming the
    first bad seq. A log behind its recorded committed head (`eventstore.sqlite_head`) fails.

    `trusted=(seq, hash)` verifies from seq + 1 only: the prefix up to `seq` was verified when
    `hash` was read from the log (a snapshot's position); the stored hash at `seq` must equal it."""
    return verify_log(path, progress, trusted=trusted).head


def verify_log(
    path: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
    *,
    trusted: tuple[int, bytes] | None = None,
    compactions: int = 0,
) -> Verified:
    """`verify_file`, in one read transaction (a consistent view of a log being written and
    compacted), saying also how far the compactions were checked. `compactions`, with
    `trusted`: the compactions up to that seq had their gaps checked by the verify that
    established `trusted` (a verified checkpoint: broker/upkeep/verification.py); their gaps,
    all inside the trusted prefix, are not read again, so that a verify from the checkpoint
    does not grow with the years of compactions before it."""
    record = read_head(path)  # before the log, which only grows after it
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise IntegrityError(1, f"cannot open the log: {exc}") from None
    try:
        with contextlib.suppress(sqlite3.DatabaseError):  # damage: _verify_chunks names it
            _check_identity(conn, Path(path))
        try:
            conn.execute("BEGIN")  # one snapshot of the log for the whole walk
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(1, f"the log file is damaged: {exc}") from None
        checked = compactions if trusted is not None and compactions <= trusted[0] else 0
        n, newest = _verify_chunks(conn, progress, trusted, checked)
        _check_recorded_head(conn, path, record, n)
        return Verified(n, newest)
    finally:
        conn.close()


def _check_recorded_head(
    conn: sqlite3.Connection,
    path: str | os.PathLike[str],
    record: tuple[int, bytes] | None,
    log_head: int,
) -> None:
    if record is None:
        return
    try:
        row = conn.execute(CHUNK_OF, (record[0],)).fetchone() if log_head >= record[0] else None
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(record[0], f"the log file is damaged: {exc}") from None
    check_head(path, record, log_head, hash_in(row, record[0]) if row is not None else None)


def check_before_writing(path: Path) -> None:
    """Refuse, before anything is written, a file that is not one of our logs (another
    application's database is left as it is) and a log behind its recorded committed head
    (`eventstore.sqlite_head`: acknowledged events were lost). Blocking; read-only."""
    record = read_head(path)  # before the log
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        empty = True
    if empty:  # a new log; or, with a recorded head, a log that was lost
        check_head(path, record, 0, None)
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = _check_identity(conn, path)
            row = conn.execute(CHUNK_OF, (2**62,)).fetchone() if "chunks" in names else None
            _check_recorded_head(conn, path, record, 0 if row is None else int(row[1]))
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(1, f"the log file {path} is damaged: {exc}") from None


def _check_identity(conn: sqlite3.Connection, path: Path) -> set[str]:
    """Our tables' names; StoreError if the database is not one of our logs (nor empty)."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    names = {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        )
    }
    ours = app_id == APPLICATION_ID or (app_id == 0 and names in (set(), _OLD_TABLES, _TABLES))
    if ours and names <= _TABLES:
        return names
    shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
    raise StoreError(
        f"{path} is not an event log of this broker (another application's database: "
        f"application_id {app_id:#x}, tables {shown or 'none'}); it was left untouched: "
        "point [store] path at the broker's log or at a new file"
    )


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
        row = conn.execute(CHUNK_OF, (seq,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return hash_in(row, seq)


def head_of_file(path: str | os.PathLike[str]) -> int | None:
    """The last seq of the log at `path`: 0 when there is no log or it is empty, None when the
    file cannot be read as a log (opening it says why); blocking, read-only."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return 0
    except FileNotFoundError:
        return 0
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(CHUNK_OF, (2**62,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return 0 if row is None else int(row[1])


CHUNK_OF = (
    "SELECT first_seq, last_seq, body, crc FROM chunks WHERE first_seq <= ? "
    "ORDER BY first_seq DESC LIMIT 1"
)


def hash_in(row: ChunkRow | None, seq: int) -> bytes | None:
    if row is None or not row[0] <= seq <= row[1]:
        return None
    records = decode_chunk(row)
    i = seq - row[0]
    if i >= len(records) or records[i].seq != seq:  # a compacted chunk: events are missing
        i = bisect.bisect_left([r.seq for r in records], seq)
        if i >= len(records) or records[i].seq != seq:
            return None
    return records[i].hash


def _verify_chunks(
    conn: sqlite3.Connection,
    progress: Callable[[int, int], None] | None,
    trusted: tuple[int, bytes] | None = None,
    checked: int = 0,
) -> tuple[int, int]:
    """Walk the chain from the start (or the trusted seq's chunk) and check the compactions'
    records after `checked` (`_check_compactions`); the head's seq and the newest compaction
    checked, or IntegrityError at the first bad seq."""
    expected = 1
    prev = integrity.GENESIS
    trusted_seq, trusted_hash = trusted or (0, integrity.GENESIS)
    compactions: dict[int, Any] = {}  # seq -> log.compacted event met on the walk
    try:
        compacted = _has_gaps(conn)
        total = conn.execute("SELECT COALESCE(MAX(last_seq), 0) FROM chunks").fetchone()[0]
        if trusted_seq > 0:
            row = conn.execute(CHUNK_OF, (trusted_seq,)).fetchone()
            expected = row[0] if row is not None else 1
        start = expected
        gaps = _gaps_from(conn, start) if compacted else iter(())
        gap = next(gaps, None)
        crossed = (0, -1)  # the last gap jumped over: its events may still be stored
        cur = conn.execute(
            "SELECT first_seq, last_seq, body, crc FROM chunks WHERE first_seq >= ? "
            "ORDER BY first_seq",
            (expected,),
        )
        while rows := cur.fetchmany(PAGE):
            for first, last, body, crc in rows:
                try:
                    records = _chunk_decoder.decode(body)
                except msgspec.DecodeError as exc:
                    raise IntegrityError(
                        first, f"undecodable events {first}..{last}: {exc}"
                    ) from None
                if not records or records[0].seq != first:
                    raise IntegrityError(first, f"event missing (chunk {first}..{last})")
                if records[-1].seq != last:
                    raise IntegrityError(
                        min(records[-1].seq + 1, last), f"event missing (chunk {first}..{last})"
                    )
                for rec in records:
                    if rec.seq < expected:
                        if crossed[0] <= rec.seq <= crossed[1]:
                            continue  # inside a recorded gap, awaiting removal
                        raise IntegrityError(
                            rec.seq, f"event out of order (found after seq {expected - 1})"
                        )
                    while rec.seq > expected or (gap is not None and gap[0] == rec.seq):
                        if gap is None or gap[0] != expected:
                            raise IntegrityError(
                                expected,
                                f"events {expected}..{rec.seq - 1} missing, and no compaction "
                                "recorded their removal",
                            )
                        prev, expected, crossed = gap[2], gap[1] + 1, (gap[0], gap[1])
                        gap = next(gaps, None)
                    if rec.seq < expected:
                        continue  # the first event of a gap not yet removed
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
                    env = to_envelope(rec)
                    if rec.type == COMPACTED:
                        compactions[rec.seq] = env.event
                    prev = h
                    expected += 1
                if integrity.checksum(body) != crc:
                    raise IntegrityError(first, f"checksum mismatch in events {first}..{last}")
            if progress is not None:
                progress(expected - 1, total)
        if gap is not None:
            raise IntegrityError(gap[0], f"a gap {gap[0]}..{gap[1]} is recorded past the log's end")
        if expected - 1 < trusted_seq:
            raise IntegrityError(expected, f"event missing (the log ends before {trusted_seq})")
        newest = checked
        if compacted:
            newest = _check_compactions(conn, compactions, start, trusted_seq, checked)
        return expected - 1, newest
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(expected, f"the log file is damaged: {exc}") from None


COMPACTED = "log.compacted"
# A compaction whose gaps are still being recorded (compactions.done = RECORDING) removed nothing
# yet: its gaps are not gaps (eventstore.sqlite_compact); a crash leaves them to be forgotten.
RECORDING = -1
LIVE_GAPS = f"compaction NOT IN (SELECT seq FROM compactions WHERE done = {RECORDING})"


def _has_gaps(conn: sqlite3.Connection) -> bool:
    return (
        conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='gaps'").fetchone()
        is not None
    )


def _gaps_from(conn: sqlite3.Connection, seq: int) -> Any:
    cur = conn.execute(
        f"SELECT first_seq, last_seq, anchor FROM gaps WHERE first_seq >= ? AND {LIVE_GAPS} "
        "ORDER BY first_seq",
        (seq,),
    )
    while rows := cur.fetchmany(1024):
        yield from rows


def _check_compactions(
    conn: sqlite3.Connection, met: dict[int, Any], start: int, trusted_seq: int, checked: int
) -> int:
    """Every recorded gap belongs to a `log.compacted` event of the log, lies below what it
    could remove, and each compaction's gaps are exactly those its event recorded (their
    anchors' digest). Gaps before `start` (not walked) made by a compaction after the trusted
    seq get their link checked: the kept event after each chains from its anchor.

    The compactions up to `checked` (<= the trusted seq) were checked before: their gaps lie
    below it, inside the trusted prefix; one that reaches the trusted seq is a forged one (the
    walk would have jumped over kept events). Returns the newest compaction checked."""
    forged = conn.execute(
        f"SELECT first_seq, last_seq, compaction FROM gaps WHERE first_seq >= ? "
        f"AND compaction <= ? AND last_seq >= ? AND {LIVE_GAPS} ORDER BY first_seq LIMIT 1",
        (start, checked, trusted_seq),
    ).fetchone()
    if forged is not None:
        lo, hi, comp = forged
        raise IntegrityError(lo, f"gap {lo}..{hi} is past what compaction {comp} could remove")
    newest = checked
    cur = conn.execute(
        f"SELECT compaction, first_seq, last_seq, anchor FROM gaps WHERE compaction > ? "
        f"AND {LIVE_GAPS} ORDER BY compaction, first_seq",
        (checked,),
    )
    group: list[tuple[int, int, bytes]] = []
    current = None
    links: list[tuple[int, bytes]] = []
    while True:
        rows = cur.fetchmany(4096)
        for comp, first, last, anchor in rows:
            if comp != current and group:
                _check_compaction(conn, current, group, met)  # type: ignore[arg-type]
                group = []
            current = newest = comp
            group.append((first, last, anchor))
            if first < start and comp > trusted_seq:
                links.append((last, anchor))
        if not rows:
            break
    if group:
        _check_compaction(conn, current, group, met)  # type: ignore[arg-type]
    for last, anchor in sorted(links):
        _check_link(conn, last, anchor)
    return newest


def _event_at(conn: sqlite3.Connection, seq: int) -> Any:
    row = conn.execute(CHUNK_OF, (seq,)).fetchone()
    if row is None or not row[0] <= seq <= row[1]:
        return None
    for rec in decode_chunk(row):
        if rec.seq == seq:
            return to_envelope(rec).event if rec.type == COMPACTED else None
    return None


def _check_compaction(
    conn: sqlite3.Connection, seq: int, gaps: list[tuple[int, int, bytes]], met: dict[int, Any]
) -> None:
    first = gaps[0][0]
    event = met.get(seq) or _event_at(conn, seq)
    if event is None:
        raise IntegrityError(
            first,
            f"events {first}..{gaps[0][1]} were removed with no compaction recorded "
            f"(no log.compacted event at seq {seq})",
        )
    for lo, hi, _anchor in gaps:
        if hi >= event.up_to:
            raise IntegrityError(lo, f"gap {lo}..{hi} is past what compaction {seq} could remove")
    if len(gaps) != event.gaps or integrity.anchors_digest(gaps) != event.anchors_digest:
        raise IntegrityError(
            first, f"the gaps of compaction {seq} differ from the ones its event recorded"
        )


def _check_link(conn: sqlite3.Connection, last: int, anchor: bytes) -> None:
    """The kept event right after a gap ending at `last` chains from its anchor."""
    row = conn.execute(CHUNK_OF, (last + 1,)).fetchone()
    if row is None or row[1] <= last:
        row = conn.execute(
            "SELECT first_seq, last_seq, body, crc FROM chunks WHERE first_seq > ? "
            "ORDER BY first_seq LIMIT 1",
            (last,),
        ).fetchone()
    if row is None:
        return
    for rec in decode_chunk(row):
        if rec.seq <= last:
            continue
        if rec.seq != last + 1:
            return  # another gap follows at once: its own anchor takes over
        h = integrity.chain_hash(
            anchor, rec.seq, rec.stream, rec.stream_version, rec.ts, rec.id, rec.data
        )
        if h != rec.hash:
            raise IntegrityError(rec.seq, "hash chain broken after a compacted gap")
        return
