"""Damaging a SQLite log on purpose, as the integrity tests do."""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

import msgspec

from eventstore.sqlite import StoredEvent


def tamper(path: Path, seq: int) -> None:
    """Change one stored event's stream name (keeping the chunk's checksum valid)."""
    conn = sqlite3.connect(path)
    for first, body in conn.execute("SELECT first_seq, body FROM chunks").fetchall():
        records = msgspec.msgpack.decode(body, type=list[StoredEvent])
        for rec in records:
            if rec.seq == seq:
                rec.stream = "tampered"
        new = msgspec.msgpack.encode(records)
        conn.execute(
            "UPDATE chunks SET body = ?, crc = ? WHERE first_seq = ?", (new, zlib.crc32(new), first)
        )
    conn.commit()
    conn.close()
