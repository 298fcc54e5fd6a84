"""The committed head of a SQLite log, recorded outside the log: `<log>.head`.

SQLite stops reading a WAL at its first bad frame (a flipped byte, a torn sector): the frames
after it, acknowledged commits, are silently ignored, and what is left is a valid, shorter log
that passes every check made on the log alone. So the writer records, after each commit, the
seq and chain hash of the log's last event in this small side file, and opening the log (and
`broker verify`) refuses a log that is *behind* that record, or whose hash at that seq differs.

The record only ever claims what is already durable in the log: it is written after the commit
returned (with `synchronous=FULL` the WAL was fsynced by then). It may lag behind the log (a
crash between the commit and the record, or before the record reached the disk): a log ahead of
its record is fine, and the next commit moves the record on.

The file is preallocated (two 512-byte slots, written in turn with `pwrite`, each record with
its own CRC): an update never changes the file's size or blocks, so `fdatasync` has no metadata
to write, and a torn update leaves the other slot's record (one commit older) readable.

Cost (docs/performance.md): the `pwrite` (~1 µs) is made by the writer thread before the append
returns, so the record in the page cache is exact, whatever happens to the process. Its
`fdatasync` is made by a thread of its own, at most every SYNC_INTERVAL: the commit path never
waits for a second fsync (in line, one per commit added ~25-30% to a single-event commit, the
disk serialising the two flushes), and the disk sees one more flush per interval, not per
commit. Only a crash of the machine can leave the durable record behind the log, by the
commits of the last interval at most: a lag, which is allowed.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from pathlib import Path

from eventstore.base import IntegrityError

MAGIC = b"BRKH"
_RECORD = struct.Struct(">4sQ32s")  # magic, seq, chain hash; then a CRC-32 of those
_SLOT = 512
_SIZE = 2 * _SLOT
SYNC_INTERVAL = 0.05  # seconds: at most one fdatasync of the record this often


def head_path(db_path: str | os.PathLike[str]) -> Path:
    p = Path(db_path)
    return p.with_name(p.name + ".head")


def read_head(db_path: str | os.PathLike[str]) -> tuple[int, bytes] | None:
    """The newest intact record (seq, hash) of the log at `db_path`, or None when there is none
    (no file: a log from before head records, or a new one)."""
    try:
        with open(head_path(db_path), "rb") as f:
            data = f.read(_SIZE)
    except FileNotFoundError:
        return None
    best: tuple[int, bytes] | None = None
    for off in (0, _SLOT):
        rec = _decode(data[off : off + _RECORD.size + 4])
        if rec is not None and (best is None or rec[0] > best[0]):
            best = rec
    return best


def _decode(raw: bytes) -> tuple[int, bytes] | None:
    if len(raw) < _RECORD.size + 4:
        return None
    body, crc = raw[: _RECORD.size], int.from_bytes(raw[_RECORD.size :], "big")
    if zlib.crc32(body) != crc:
        return None
    magic, seq, chain = _RECORD.unpack(body)
    return (seq, chain) if magic == MAGIC else None


def _encode(seq: int, chain: bytes) -> bytes:
    body = _RECORD.pack(MAGIC, seq, chain)
    return body + zlib.crc32(body).to_bytes(4, "big")


class HeadWriter:
    """The writer's handle on `<log>.head` (blocking calls: the writer thread makes them)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.path = head_path(db_path)
        self._fd = -1
        self._slot = 0
        self.seq = 0
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._syncer: threading.Thread | None = None

    def open(self) -> None:
        """Open the file, creating and preallocating it (durably) when absent."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.pwrite(fd, bytes(_SIZE), 0)
                os.fsync(fd)
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            data = os.pread(fd, _SIZE, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        for slot in (0, 1):  # the next write goes to the slot not holding the newest record
            rec = _decode(data[slot * _SLOT : slot * _SLOT + _RECORD.size + 4])
            if rec is not None and rec[0] >= self.seq:
                self.seq, self._slot = rec[0], slot ^ 1
        self._syncer = threading.Thread(target=self._sync_loop, name="sqlite-head", daemon=True)
        self._syncer.start()

    def write(self, seq: int, chain: bytes) -> None:
        """Record `seq` (already committed) into the older slot; not yet synced."""
        os.pwrite(self._fd, _encode(seq, chain), self._slot * _SLOT)
        self._slot ^= 1
        self.seq = seq

    def sync_soon(self) -> None:
        """Have the record made durable by the syncing thread (not waited for). Called after
        every commit: most find the flag still set (the thread syncs at most every
        SYNC_INTERVAL), and reading it takes no lock, where setting it takes the Event's."""
        if not self._dirty.is_set():
            self._dirty.set()

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def _sync_loop(self) -> None:
        while True:
            self._dirty.wait()
            if self._closing.is_set():
                return
            self._dirty.clear()  # writes after this are synced by the next round
            with contextlib.suppress(OSError):  # the record lags; the log is not affected
                os.fdatasync(self._fd)
            if self._closing.wait(SYNC_INTERVAL):  # a flush of the disk's cache is dear
                return

    def close(self) -> None:
        if self._syncer is not None:
            self._closing.set()
            self._dirty.set()
            self._syncer.join()
            self._syncer = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1


def check_head(
    db_path: str | os.PathLike[str],
    record: tuple[int, bytes] | None,
    log_head: int,
    hash_at: bytes | None,
) -> None:
    """Raise IntegrityError when the log (its last seq `log_head`, and `hash_at`: its chain hash
    at the recorded seq) is behind `record`, the recorded head, or differs from it at its seq.
    Read the record before the log: the log only grows after it."""
    if record is None:
        return
    seq, chain = record
    where = head_path(db_path)
    if log_head < seq:
        missing = seq - log_head
        raise IntegrityError(
            log_head + 1,
            f"events {log_head + 1}..{seq} missing: {missing:,} acknowledged "
            f"event{'s' if missing != 1 else ''} lost (the log ends at seq {log_head}, {where} "
            f"records the commit of seq {seq}); the log's tail was lost (a damaged WAL, a "
            "truncated or replaced file): restore the log from backup (to accept the loss "
            "instead, remove that file)",
        )
    if hash_at is not None and hash_at != chain:
        raise IntegrityError(
            seq,
            f"event {seq} is not the one committed (its chain hash differs from the one "
            f"recorded in {where}): the log was replaced; restore it from backup",
        )
