"""The floor under a durable one-event commit on this machine's disk, for the log's figures.

    python -m bench.commit_floor [--commits 2000] [--dir DIR]

Prints, each over `--commits` operations in a row, with wall time percentiles and this
process's CPU per operation (user and system, from getrusage):

- `fsync`: a 200-byte append to a file, then `fsync`: what any durable acknowledgement waits
  for on this disk (its tail bounds a durable p99 from below, whatever the software);
- `pwrite+fdatasync`: 200 bytes rewritten in place, then `fdatasync` (no size change: the
  cheapest durable write a log of its own could make per commit);
- `sqlite FULL` / `sqlite OFF`: one SQLite transaction shaped as the log's one-event commit
  (a chunk row, a new stream row, COMMIT) in WAL mode, with and without the WAL's fsync:
  SQLite's own share of a commit, without the broker's threads or Python around it.

`--dir` picks the file system (default: the temporary directory, as the other benchmarks).
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import tempfile
import time
from collections.abc import Callable

from bench.common import machine

BODY = os.urandom(200)
CHUNK = os.urandom(300)


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def measure(name: str, op: Callable[[int], None], n: int) -> None:
    times: list[float] = []
    u0, s0 = _cpu()
    for i in range(n):
        t0 = time.perf_counter()
        op(i)
        times.append(time.perf_counter() - t0)
    u1, s1 = _cpu()
    times.sort()

    def ms(q: float) -> str:
        return f"{times[min(n - 1, int(q * n))] * 1e3:.3f}"

    print(
        f"{name}: p50 {ms(0.5)} ms, p99 {ms(0.99)} ms, p999 {ms(0.999)} ms; CPU "
        f"{(u1 - u0) / n * 1e6:.0f} µs user + {(s1 - s0) / n * 1e6:.0f} µs system each "
        f"({n:,} in a row)"
    )


def sqlite_commits(path: str, synchronous: str) -> Callable[[int], None]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.executescript(
        "CREATE TABLE chunks (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,"
        " body BLOB NOT NULL, crc INTEGER NOT NULL);"
        "CREATE TABLE streams (stream TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;"
    )

    def commit(i: int) -> None:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", (i + 1, i + 1, CHUNK, 0))
        conn.execute("INSERT INTO streams VALUES (?, 1)", (f"message-{os.urandom(16).hex()}",))
        conn.execute("COMMIT")

    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where the files go (default: $TMPDIR)")
    args = parser.parse_args()
    n = args.commits
    print(f"# {machine()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        fd = os.open(os.path.join(tmp, "append"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        measure("fsync (200-byte append, then fsync)", lambda i: _append_sync(fd), n)
        os.close(fd)
        fd = os.open(os.path.join(tmp, "slot"), os.O_RDWR | os.O_CREAT)
        os.pwrite(fd, BODY, 0)
        os.fsync(fd)
        measure("pwrite+fdatasync (200 bytes in place)", lambda i: _rewrite_sync(fd), n)
        os.close(fd)
        for sync in ("FULL", "OFF"):
            commit = sqlite_commits(os.path.join(tmp, f"log-{sync}.db"), sync)
            measure(f"sqlite {sync} (WAL, one-event commit)", commit, n)


def _append_sync(fd: int) -> None:
    os.write(fd, BODY)
    os.fsync(fd)


def _rewrite_sync(fd: int) -> None:
    os.pwrite(fd, BODY, 0)
    os.fdatasync(fd)


if __name__ == "__main__":
    main()
