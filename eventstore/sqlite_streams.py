"""The SQLite log's stream versions, kept off the commit's path.

Every stored event carries its stream's version; the `streams` table is only an index of each
stream's latest version, for the expected versions of `append` and for `stream_version`. Written
in every commit, it cost each commit a B-tree leaf per stream it touched: random leaves on a
large registry (a commit of 11 heartbeats of 1,000,000 nodes: 350 µs of CPU with its fsync
against 144 without the index, and twice the WAL). So a commit writes its chunks only; the
versions it gives its streams wait in memory (`Versions.unflushed`, also in the lookup cache)
and reach the table in the writer thread's own transactions, when it has no commit to make (or
when many wait): sorted, a slice at a time (`Versions.flush_step`: 512 new streams of a 1M-row
table take ~2 ms), each leaf written once for all the streams it holds.

The database header's `user_version` says how far the table is complete: the seq of the last
event whose version it holds, plus one, set in the transaction that writes a flush's last slice;
0 in a log written before this scheme, whose table was complete at every commit. Opening the
log reads the versions of the events after that seq back from their chunks (`unflushed`): at
most a flush's worth of events, and the table is right again as if nothing had waited. An
older broker opening the log writes the table at every commit and leaves the header as it is:
the next open just reads back more than it needs.
"""

from __future__ import annotations

import sqlite3
import time

import msgspec

from eventstore.sqlite_verify import decode_chunk

FLUSH_STREAMS = 4096  # streams waiting that start a flush
FLUSH_SECONDS = 1.0  # or the age of the oldest wait that does
PRESSING = 4  # times FLUSH_STREAMS waiting: slices go between commits too, not only when idle
SLICE = 512  # stream versions written per transaction of a flush (the delay of a commit behind)

_UPSERT = (
    "INSERT INTO streams (stream, version) SELECT value ->> 0, value ->> 1 FROM json_each(?) "
    "WHERE true ON CONFLICT (stream) DO UPDATE SET version = excluded.version"
)
_json = msgspec.json.Encoder()


def complete_to(conn: sqlite3.Connection) -> int:
    """The seq up to which the `streams` table holds every version (see the module)."""
    mark = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if mark:
        return mark - 1
    return int(conn.execute("SELECT coalesce(max(last_seq), 0) FROM chunks").fetchone()[0])


def mark(conn: sqlite3.Connection) -> None:
    """Give a log without the mark (new, or written before this scheme: its table complete)
    the mark of its head, in the transaction under way (the writer's, at open)."""
    if not conn.execute("PRAGMA user_version").fetchone()[0]:
        conn.execute(f"PRAGMA user_version = {complete_to(conn) + 1}")


def unflushed(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
    """The seq the table is complete to, and the versions the events after it give their
    streams (read back from their chunks; IntegrityError for a damaged one)."""
    done = complete_to(conn)
    versions: dict[str, int] = {}
    for row in conn.execute(
        "SELECT first_seq, last_seq, body, crc FROM chunks WHERE last_seq > ? ORDER BY first_seq",
        (done,),
    ):
        for rec in decode_chunk(row):
            if rec.seq > done:
                versions[rec.stream] = rec.stream_version
    return done, versions


class Versions:
    """The writer thread's versions waiting for the table (see the module)."""

    def __init__(self, waiting: dict[str, int]) -> None:
        self.unflushed = waiting  # given by commits since the flush under way began
        self.flushing: list[tuple[str, int]] = []  # the flush under way's, sorted
        self.flush_to = 0  # the seq the flush under way makes the table complete to
        self.since = time.monotonic()  # when `unflushed` began to fill

    def waiting(self) -> dict[str, int]:
        """Every version not in the table yet, the newest of each stream."""
        out = dict(self.flushing)
        out.update(self.unflushed)
        return out

    def committed(self, versions: dict[str, int]) -> None:
        if not self.unflushed:
            self.since = time.monotonic()
        self.unflushed.update(versions)

    def due(self) -> bool:
        return bool(self.flushing) or (
            len(self.unflushed) >= FLUSH_STREAMS
            or bool(self.unflushed)
            and time.monotonic() - self.since >= FLUSH_SECONDS
        )

    def pressing(self) -> bool:
        return len(self.unflushed) + len(self.flushing) >= PRESSING * FLUSH_STREAMS

    def flush_step(self, conn: sqlite3.Connection, seq: int) -> int:
        """Write the next slice of the flush under way, starting one made complete to `seq`
        (the writer's end of the log) if none is; the bytes written, about."""
        if not self.flushing:
            self.flushing = sorted(self.unflushed.items())
            self.unflushed, self.flush_to = {}, seq
        part = self.flushing[:SLICE]
        try:
            conn.execute(_UPSERT, (_json.encode(part),))
            if len(part) == len(self.flushing):
                conn.execute(f"PRAGMA user_version = {int(self.flush_to) + 1}")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        del self.flushing[:SLICE]
        return 64 * len(part)
