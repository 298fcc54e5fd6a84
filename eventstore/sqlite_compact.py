"""Compaction of a SQLite log: what may go is found by a read-only scan, and removed in place.

A compaction removes runs of events (gaps) from the chunks. Each gap is recorded in the `gaps`
table with its *anchor*, the chain hash of its last removed event: the kept event after the gap
chains from it, so `broker verify` still proves every kept event (eventstore.sqlite_verify). The
gaps of one compaction are recorded, in one transaction, before any chunk is rewritten, and each
names the `log.compacted` event that announced them (its seq). Then the chunks are rewritten in
small transactions on the writer thread, between group commits: appends go on meanwhile.

Kill -9 at any moment leaves a log that opens and verifies: before the gaps are recorded nothing
changed (a `log.compacted` event without gaps removed nothing); after, a chunk is either as it
was or rewritten (one transaction each), and events still present inside a recorded gap are
only awaiting removal, which the next compaction finishes (`unfinished`, then `purge`).

The scan reads the stored records without decoding the events (only the envelope fields), except
`message.read_batch`, whose message ids it needs.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from eventstore import integrity
from eventstore.codec import decode_event
from eventstore.sqlite_verify import (
    LIVE_GAPS,
    PAGE,
    RECORDING,
    ChunkRow,
    StoredEvent,
    decode_chunk,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS gaps (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    anchor BLOB NOT NULL,
    compaction INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS compactions (
    seq INTEGER PRIMARY KEY,
    done INTEGER NOT NULL
);
"""

MESSAGE_TYPES = frozenset(
    {"message.sent", "message.read", "message.expired", "message.dead_lettered", "message.redriven"}
)
READ_BATCH = "message.read_batch"
_encode_chunk = msgspec.msgpack.Encoder().encode
T = TypeVar("T")
Gap = tuple[int, int, bytes]  # first seq, last seq, anchor (chain hash of the last)


@dataclass
class MessageHistory:
    seqs: list[int] = field(default_factory=list)
    last_ts: float = 0.0


@dataclass
class Scan:
    """What a scan of the events before `cut` found."""

    cut: int
    # candidates by type: seqs old enough to go (for keep-newest types, not the newest of
    # their stream)
    candidates: dict[str, list[int]] = field(default_factory=dict)
    messages: dict[str, MessageHistory] = field(default_factory=dict)
    batches: list[tuple[int, float, list[str]]] = field(default_factory=list)
    sizes: dict[str, list[int]] = field(default_factory=dict)  # type -> [count, bytes]


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _chunks(conn: sqlite3.Connection, below: int) -> Iterable[ChunkRow]:
    cur = conn.execute(
        "SELECT first_seq, last_seq, body, crc FROM chunks WHERE first_seq < ? ORDER BY first_seq",
        (below,),
    )
    while rows := cur.fetchmany(PAGE):
        yield from rows


def scan(
    path: Path,
    cut: int,
    plain: dict[str, float],
    keep_newest: dict[str, float],
    messages_before: float | None,
    progress: Callable[[int, int], None] | None = None,
) -> Scan:
    """Scan the events with a seq below `cut` (blocking, read-only). `plain` and `keep_newest`
    map event types to the time before which they may go (the newest event of each stream of a
    `keep_newest` type stays); message events are gathered by message when `messages_before` is
    set, for the caller to decide (it knows which messages are closed)."""
    result = Scan(cut)
    newest: dict[tuple[str, str], int] = {}
    old: dict[str, list[tuple[int, str]]] = {t: [] for t in keep_newest}
    for t in plain:
        result.candidates[t] = []
    sizes = result.sizes
    conn = _connect(path)
    try:
        for row in _chunks(conn, cut):
            for rec in decode_chunk(row):
                if rec.seq >= cut:
                    break
                t = rec.type
                size = sizes.get(t)
                if size is None:
                    size = sizes[t] = [0, 0]
                size[0] += 1
                size[1] += len(rec.data) + 100  # envelope and hash, roughly
                if t in keep_newest:
                    newest[(t, rec.stream)] = rec.seq
                    if rec.ts < keep_newest[t]:
                        old[t].append((rec.seq, rec.stream))
                elif t in plain:
                    if rec.ts < plain[t]:
                        result.candidates[t].append(rec.seq)
                elif messages_before is not None and t in MESSAGE_TYPES:
                    hist = result.messages.get(rec.stream)
                    if hist is None:
                        hist = result.messages[rec.stream] = MessageHistory()
                    hist.seqs.append(rec.seq)
                    hist.last_ts = max(hist.last_ts, rec.ts)
                elif messages_before is not None and t == READ_BATCH and rec.ts < messages_before:
                    ids = list(getattr(decode_event(rec.data), "message_ids", []))
                    result.batches.append((rec.seq, rec.ts, ids))
            if progress is not None:
                progress(min(row[1], cut - 1), cut - 1)
    finally:
        conn.close()
    for t, items in old.items():
        result.candidates[t] = [s for s, stream in items if newest[(t, stream)] != s]
    return result


def runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted seqs as runs of consecutive numbers."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def anchor_runs(path: Path, spans: list[tuple[int, int]]) -> list[Gap]:
    """The runs with the stored chain hash of each one's last event (blocking, read-only)."""
    gaps: list[Gap] = []
    if not spans:
        return gaps
    ends = [last for _first, last in spans]
    conn = _connect(path)
    try:
        found: dict[int, bytes] = {}
        for row in _chunks(conn, ends[-1] + 1):
            if row[1] < ends[0]:
                continue
            lo = bisect.bisect_left(ends, row[0])
            hi = bisect.bisect_right(ends, row[1])
            if lo == hi:
                continue
            for rec in decode_chunk(row):
                found[rec.seq] = rec.hash
    finally:
        conn.close()
    for first, last in spans:
        gaps.append((first, last, found[last]))
    return gaps


# --- writer thread (on the store's writing connection) ---


RECORDED, DONE = 0, 1  # compactions.done, after RECORDING (eventstore.sqlite_verify)
GAP_BATCH = 2000  # gap records per transaction: appends wait for one at most


def start_recording(conn: sqlite3.Connection, compaction: int) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO compactions (seq, done) VALUES (?, ?)", (compaction, RECORDING)
    )
    conn.commit()


def record_batch(conn: sqlite3.Connection, compaction: int, gaps: list[Gap]) -> None:
    try:
        conn.executemany(
            "INSERT INTO gaps (first_seq, last_seq, anchor, compaction) VALUES (?, ?, ?, ?)",
            [(f, last, a, compaction) for f, last, a in gaps],
        )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def record_imported_gap(
    conn: sqlite3.Connection, first: int, last: int, anchor: bytes, compaction: int
) -> None:
    """A gap of an imported compacted log (`broker import`), with its compaction marked done:
    nothing of it is stored to remove."""
    try:
        conn.execute(
            "INSERT INTO gaps (first_seq, last_seq, anchor, compaction) VALUES (?, ?, ?, ?)",
            (first, last, anchor, compaction),
        )
        conn.execute(
            "INSERT OR REPLACE INTO compactions (seq, done) VALUES (?, ?)", (compaction, DONE)
        )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def forget_streams(
    conn: sqlite3.Connection, counts: list[tuple[str, int]], waiting: Container[str]
) -> list[str]:
    """Delete the `streams` rows of streams whose every event a compaction removed (a message's,
    once it is let go): each (stream, number of events) pair's row goes only if the stream's
    version is that number, so a stream that got an event since stays, as does one whose newest
    version still waits for the table (`waiting`). One transaction; the streams dropped."""
    dropped = []
    try:
        for stream, count in counts:
            if stream in waiting:
                continue
            cur = conn.execute(
                "DELETE FROM streams WHERE stream = ? AND version = ?", (stream, count)
            )
            if cur.rowcount:
                dropped.append(stream)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return dropped


def live_gaps(path: Path) -> list[tuple[int, int, bytes, int]]:
    """(first seq, last seq, anchor, compaction) of every gap of the log at `path`, in seq
    order (for `broker export`); blocking, read-only."""
    conn = _connect(path)
    try:
        try:
            return conn.execute(
                "SELECT first_seq, last_seq, anchor, compaction FROM gaps "
                f"WHERE {LIVE_GAPS} ORDER BY first_seq"
            ).fetchall()
        except sqlite3.OperationalError:  # a log from before compaction: no such table
            return []
    finally:
        conn.close()


def set_state(conn: sqlite3.Connection, compactions: list[int], state: int) -> None:
    conn.executemany(
        "UPDATE compactions SET done = ? WHERE seq = ?", [(state, c) for c in compactions]
    )
    conn.commit()


def abandon_partial(conn: sqlite3.Connection) -> None:
    """Forget the gaps of a compaction whose recording a crash interrupted: nothing of it was
    removed (removal starts once every gap is recorded); its `log.compacted` event stays, a
    compaction that removed nothing."""
    conn.execute(
        "DELETE FROM gaps WHERE compaction IN (SELECT seq FROM compactions WHERE done = ?)",
        (RECORDING,),
    )
    conn.execute("DELETE FROM compactions WHERE done = ?", (RECORDING,))
    conn.commit()


def unfinished(conn: sqlite3.Connection) -> list[int]:
    return [
        s
        for (s,) in conn.execute(
            "SELECT seq FROM compactions WHERE done = ? ORDER BY seq", (RECORDED,)
        )
    ]


def purge_page(
    conn: sqlite3.Connection, after: int, below: int, max_chunks: int
) -> tuple[int, int, int]:
    """Remove, in one transaction, the stored events inside recorded gaps from up to
    `max_chunks` chunks starting after first seq `after` (and below `below`). Returns the last
    chunk's first seq looked at (0 when none is left), the events removed, the bytes written."""
    rows = conn.execute(
        "SELECT first_seq, last_seq, body, crc FROM chunks WHERE first_seq > ? AND first_seq < ? "
        "ORDER BY first_seq LIMIT ?",
        (after, below, max_chunks),
    ).fetchall()
    if not rows:
        return 0, 0, 0
    lo, hi = rows[0][0], max(r[1] for r in rows)
    gaps = conn.execute(
        "SELECT first_seq, last_seq FROM gaps WHERE last_seq >= ? AND first_seq <= ? "
        f"AND {LIVE_GAPS} ORDER BY first_seq",
        (lo, hi),
    ).fetchall()
    removed = written = 0
    if gaps:
        starts = [g[0] for g in gaps]
        try:
            for row in rows:
                first, last = row[0], row[1]
                i = bisect.bisect_right(starts, last) - 1
                if i < 0 or gaps[i][1] < first:  # gaps are disjoint: the last may reach it
                    continue  # no gap touches this chunk
                records = decode_chunk(row)
                kept = [r for r in records if not in_runs(r.seq, starts, gaps)]
                if len(kept) == len(records):
                    continue
                removed += len(records) - len(kept)
                conn.execute("DELETE FROM chunks WHERE first_seq = ?", (first,))
                if kept:
                    body = _encode_chunk(kept)
                    written += len(body)
                    conn.execute(
                        "INSERT INTO chunks (first_seq, last_seq, body, crc) VALUES (?, ?, ?, ?)",
                        (kept[0].seq, kept[-1].seq, body, integrity.checksum(body)),
                    )
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    return rows[-1][0], removed, written


def in_runs(seq: int, starts: list[int], gaps: list[tuple[int, int]]) -> bool:
    """Whether `seq` lies in one of `gaps` (sorted, disjoint; `starts`: their first seqs)."""
    i = bisect.bisect_right(starts, seq) - 1
    return i >= 0 and gaps[i][1] >= seq


def purge_bound(conn: sqlite3.Connection) -> int:
    """One past the last seq inside a recorded gap (0 without gaps)."""
    row = conn.execute(f"SELECT MAX(last_seq) FROM gaps WHERE {LIVE_GAPS}").fetchone()
    return int(row[0]) + 1 if row and row[0] is not None else 0


def chunk_count(conn: sqlite3.Connection, below: int) -> int:
    return int(
        conn.execute("SELECT COUNT(*) FROM chunks WHERE first_seq < ?", (below,)).fetchone()[0]
    )


def gap_summary(path: Path) -> tuple[int, int]:
    """(gap rows, seqs inside them) of the log at `path`; blocking, read-only."""
    conn = _connect(path)
    try:
        try:
            row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(last_seq - first_seq + 1), 0) FROM gaps "
                f"WHERE {LIVE_GAPS}"
            ).fetchone()
        except sqlite3.OperationalError:  # a log from before compaction: no such table
            return 0, 0
        return int(row[0]), int(row[1])
    finally:
        conn.close()


__all__ = ["StoredEvent", "Scan", "Gap", "scan", "runs", "anchor_runs"]


def used_bytes(path: Path) -> int:
    """Bytes the log occupies: its file's pages less the free ones (a compaction frees pages,
    which new events reuse; the file itself does not shrink), plus the WAL. Blocking."""
    try:
        conn = _connect(path)
    except sqlite3.Error:
        return 0
    try:
        pages, free, size = (
            int(conn.execute(f"PRAGMA {name}").fetchone()[0])
            for name in ("page_count", "freelist_count", "page_size")
        )
    except sqlite3.Error:
        return 0
    finally:
        conn.close()
    try:
        wal = Path(f"{path}-wal").stat().st_size
    except FileNotFoundError:
        wal = 0
    return (pages - free) * size + wal


class Writer(Protocol):
    async def on_writer(self, fn: Callable[..., T], *args: Any) -> T: ...


async def apply(
    store: Writer,
    compaction: int,
    gaps: list[Gap],
    progress: Callable[[int, int], None] | None = None,
    batch_chunks: int = 16,
) -> int:
    """Record `gaps` for the `log.compacted` event at seq `compaction` (a few thousand per
    transaction; a crash meanwhile leaves them ignored, then forgotten), then remove them."""
    await store.on_writer(start_recording, compaction)
    for i in range(0, len(gaps), GAP_BATCH):
        await store.on_writer(record_batch, compaction, gaps[i : i + GAP_BATCH])
    await store.on_writer(set_state, [compaction], RECORDED)
    return await finish(store, progress, batch_chunks)


async def finish(
    store: Writer,
    progress: Callable[[int, int], None] | None = None,
    batch_chunks: int = 16,
) -> int:
    """Remove the events still stored inside recorded gaps (every unfinished compaction), a few
    chunks per transaction on the writer thread, then start the WAL over. The pages freed stay
    in the file for new events (giving them back to the filesystem, an incremental vacuum,
    moves every page behind them: minutes of writes for a large log, with appends waiting).
    Returns the number of events removed."""
    await store.on_writer(abandon_partial)
    pending = await store.on_writer(unfinished)
    if not pending:
        return 0
    bound = await store.on_writer(purge_bound)
    total = await store.on_writer(chunk_count, bound)
    after, seen, removed = 0, 0, 0
    while True:
        after, n, _written = await store.on_writer(purge_page, after, bound, batch_chunks)
        if after == 0:
            break
        removed += n
        seen = min(total, seen + batch_chunks)
        if progress is not None:
            progress(seen, total)
    if progress is not None:
        progress(total, total)
    await store.on_writer(set_state, pending, DONE)
    return removed


def last_compaction(path: Path) -> int | None:
    """The seq of the newest `log.compacted` event whose gaps were recorded; blocking."""
    conn = _connect(path)
    try:
        try:
            row = conn.execute("SELECT MAX(seq) FROM compactions").fetchone()
        except sqlite3.OperationalError:  # a log from before compaction
            return None
        return int(row[0]) if row and row[0] is not None else None
    finally:
        conn.close()
