"""Crash safety: a writer killed with SIGKILL at random points loses no acknowledged event."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec

from eventstore.codec import decode_event
from eventstore.sqlite import StoredEvent, verify_file

ROUNDS = 20
ROOT = Path(__file__).resolve().parents[2]


def stored(path: Path) -> dict[int, str]:
    conn = sqlite3.connect(path)
    try:
        out: dict[int, str] = {}
        for (body,) in conn.execute("SELECT body FROM chunks"):
            for rec in msgspec.msgpack.decode(body, type=list[StoredEvent]):
                out[rec.seq] = decode_event(rec.data).text  # type: ignore[attr-defined]
        return out
    finally:
        conn.close()


def versions_in_order(path: Path) -> bool:
    """Every stream's versions are 1, 2, 3... in seq order: each start after a kill took its
    streams' versions up where the log left them (the table lags the log until a flush:
    eventstore.sqlite_streams)."""
    conn = sqlite3.connect(path)
    try:
        last: dict[str, int] = {}
        for (body,) in conn.execute("SELECT body FROM chunks ORDER BY first_seq"):
            for rec in msgspec.msgpack.decode(body, type=list[StoredEvent]):
                if rec.stream_version != last.get(rec.stream, 0) + 1:
                    return False
                last[rec.stream] = rec.stream_version
        return True
    finally:
        conn.close()


def test_kill_9_loses_no_acknowledged_event(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    rng = random.Random(1234)
    acked: dict[int, str] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_no in range(ROUNDS):
        kill_after = rng.randint(1, 400)
        child = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("crash_writer.py")),
                str(path),
                str(round_no),
            ],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert child.stdout is not None
        seen = 0
        for line in child.stdout:
            seq, text = line.split()
            acked[int(seq)] = text
            seen += 1
            if seen >= kill_after:
                break
        child.send_signal(signal.SIGKILL)
        child.wait()
        # Anything the child printed before dying was acknowledged too.
        for line in child.stdout.read().splitlines():
            seq, text = line.split()
            acked[int(seq)] = text
        assert child.returncode == -signal.SIGKILL
        assert seen >= kill_after, f"round {round_no}: child died early"
        assert verify_file(path) >= max(acked)
    on_disk = stored(path)
    missing = {s: t for s, t in acked.items() if on_disk.get(s) != t}
    assert not missing, f"acknowledged events lost or altered: {sorted(missing)[:10]}"
    assert sorted(on_disk) == list(range(1, len(on_disk) + 1))
    assert versions_in_order(path)
