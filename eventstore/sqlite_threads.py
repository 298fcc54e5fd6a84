"""The threads and locks around the SQLite log: the lock that lets one process write a log, the
writer thread that runs every statement of the group commit, and the background checkpointer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from eventstore.base import StoreLocked

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class Checkpointer:
    """Copies the WAL back into the database file in a thread of its own.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold (every
    4 MiB), so that commit (and every append waiting on the group commit) stalls while
    megabytes are copied and fsynced. Here the writer turns it off and, every ``every_bytes``
    written, hands a PASSIVE checkpoint (which never blocks the writer) to this thread. Under
    steady writes a passive checkpoint never catches up with the head, so SQLite never starts
    the WAL over and it would only grow: when the passive checkpoint is done and the WAL is
    past ``limit_bytes``, the writer restarts it at its next commit (a RESTART checkpoint, which
    copies only what came in while the passive checkpoint ran; the next commits then overwrite
    the file from its start, so it stays at its size and needs no new blocks). That pause is the
    price of a bounded WAL, paid once per ``limit_bytes`` written.
    """

    def __init__(self, path: Path, synchronous: str, every_bytes: int, limit_bytes: int) -> None:
        self.path = path
        self.wal = path.with_name(path.name + "-wal")
        self.synchronous = synchronous
        self.every_bytes = every_bytes
        self.limit_bytes = limit_bytes
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._conn: sqlite3.Connection | None = None
        self._written = 0
        self._running = threading.Event()
        self._over_limit = False
        self.done = 0  # background checkpoints completed (for tests)
        self.restarts = 0  # WAL restarts by the writer

    def wrote(self, conn: sqlite3.Connection, nbytes: int) -> None:
        """Called by the writer thread after each commit, with the bytes it committed."""
        self._written += nbytes
        if self._over_limit and not self._running.is_set():
            self._over_limit = False
            # A reader in the middle of a long read makes RESTART wait: give up quickly
            # instead (the next background checkpoint asks again).
            conn.execute("PRAGMA busy_timeout=20")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                self.restarts += 0 if busy else 1
            finally:
                conn.execute("PRAGMA busy_timeout=5000")
        elif self._written >= self.every_bytes and not self._running.is_set():
            self._written = 0
            self._running.set()
            self._executor.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=0.1)
                self._conn.execute(f"PRAGMA synchronous={self.synchronous}")
                self._conn.execute("PRAGMA temp_store=MEMORY")
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._over_limit = self.wal.stat().st_size > self.limit_bytes
            self.done += 1
        except (sqlite3.Error, OSError):
            log.warning("background checkpoint failed", exc_info=True)
        finally:
            self._running.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=True)  # a running checkpoint finishes first
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class WriterThread:
    """One thread that runs the writer's calls in order, each result handed back to the event
    loop with call_soon_threadsafe. Lighter than an executor's round trip (no
    concurrent.futures.Future chained to an asyncio one, no executor locks): a group commit
    makes one per transaction, and on a VM each wake-up of a thread is dear (docs/performance.md).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, fut, fn, args))
        return fut

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the thread, not waited for: `fn` hands its outcome back itself."""
        self._calls.put((None, None, fn, args))

    def _main(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, fut, fn, args = item
            if fut is None:
                try:
                    fn(*args)
                except BaseException:  # a posted call reports its own failures; not this one
                    log.exception("a call on the writer thread failed")
                continue
            outcome: tuple[Callable[[asyncio.Future[Any], Any], None], Any]
            try:
                outcome = (_resolve, fn(*args))
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome = (_reject, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(outcome[0], fut, outcome[1])

    def stop(self) -> None:
        """No calls after this one; the thread ends once it has run what it was given."""
        self._calls.put(None)


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _reject(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
