"""The archive's file format and its merge with the log (eventstore.sqlite_archive): whatever
runs of a log are archived, the archive gives back exactly their stored records, and the log
read with it gives every event once, in seq order."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import sqlite_archive
from eventstore.events import NodeHeartbeat
from eventstore.sqlite import SqliteStore
from eventstore.sqlite_compact import runs
from eventstore.sqlite_verify import decode_chunk

EVENTS = 700  # more than a frame of the archive and a chunk of the log


def _log(path: Path) -> None:
    async def fill() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            for start in range(0, EVENTS, 100):
                await store.append(
                    [
                        NodeHeartbeat(node_id=f"n{i % 7}", status="ok")
                        for i in range(start, start + 100)
                    ]
                )
        finally:
            await store.close()

    asyncio.run(fill())


LOG_DIR = Path(tempfile.mkdtemp(prefix="archive-test-"))
LOG = LOG_DIR / "events.db"
_log(LOG)


def _stored() -> dict[int, object]:
    import sqlite3

    conn = sqlite3.connect(LOG)
    try:
        rows = conn.execute("SELECT first_seq, last_seq, body, crc FROM chunks").fetchall()
    finally:
        conn.close()
    return {rec.seq: rec for row in rows for rec in decode_chunk(row)}


STORED = _stored()


@settings(max_examples=40, deadline=None)
@given(st.sets(st.integers(1, EVENTS), max_size=300), st.integers(1, 3))
def test_archived_runs_read_back_as_stored_and_merge_into_the_whole_log(
    removed: set[int], files: int
) -> None:
    spans = runs(sorted(removed))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for i in range(files):  # several compactions: each archives its share of the runs
            sqlite_archive.write(LOG, spans[i::files], directory)
        archived = list(sqlite_archive.read(directory))
        assert [r.seq for r in archived] == sorted(removed)
        assert all(r == STORED[r.seq] for r in archived)

        async def whole() -> list[int]:
            store = SqliteStore(LOG, readonly=True)
            await store.open()
            try:
                kept = (env async for env in store.read(1) if env.seq not in removed)
                return [env.seq async for env in sqlite_archive.with_archive(kept, directory)]
            finally:
                await store.close()

        assert asyncio.run(whole()) == list(range(1, EVENTS + 1))
        assert sqlite_archive.verify_with_archive(LOG, directory) == EVENTS
