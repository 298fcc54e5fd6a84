"""The snapshot file: written as a stream of frames, read back and checked whole.

    MAGIC | header length (4 bytes, big-endian) | header (msgpack) | zeros up to HEADER_SPACE
    | frames...

A frame is `kind (1 byte) | name length (1) | name | data length (4, big-endian) | data`:

- `F`: the fingerprints of the projections saved in slices (msgpack map, name -> fingerprint);
- `R`: a slice of the records of projection `name` (msgpack array of `[key, record]` pairs; a
  `nil` record: the key is gone). Later slices override earlier ones: a record changed while the
  snapshot was written is saved again after it (`broker.upkeep.snapshots.Snapshotter.take`);
- `I` (NATS): a slice of the log index's array `name` (raw bytes; slices of a name in order);
- `E`, last: `Final`, every other projection's saved state (`Part`: fingerprint and data), the
  sliced projections' remaining state, the replay index's windows, and on the NATS backend the
  log's index (`eventstore.nats_index.SavedIndex`).

The header holds the format, the seq, the log's chain hash at that seq (on NATS: the anchor of the
stream message the log's index was saved at), and the length and SHA-256
of everything after the header space; it is written last, into the space kept for it, so the
frames stream to disk as they are made and no whole body is ever held in memory. The file is
written under a temporary name and renamed into place after an fsync (atomic). A file whose
length or digest does not match its header is refused whole.

Every function here blocks: call them in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from operator import is_, itemgetter
from pathlib import Path
from typing import IO, Any

import msgspec

from broker import __version__
from broker.config import Config
from eventstore.base import IntegrityError

FORMAT = 2
MAGIC = b"BRKSNAP\x02"
_HEADER_LEN = 4
HEADER_SPACE = 4096  # bytes kept at the start of the file for the header
PREFIX = "snapshot-"
SUFFIX = ".msgpack"
TMP_MAX_AGE = 3600.0  # seconds before a leftover temporary file (a crash mid-write) is removed

FINGERPRINTS, RECORDS, INDEX, END = b"F", b"R", b"I", b"E"


class Header(msgspec.Struct, kw_only=True):
    format: int
    seq: int
    log_hash: bytes  # the chain hash of event `seq`
    created_at: float
    broker_version: str
    body_length: int
    body_sha256: bytes


class Part(msgspec.Struct):
    fingerprint: str
    data: msgspec.Raw


class Final(msgspec.Struct):
    parts: dict[str, Part]
    # Per projection: the windows (seq // WINDOW) holding events it handles, up to the seq.
    windows: dict[str, list[int]] = {}
    # On the NATS backend: the log's index as of the snapshot (`eventstore.nats_index`).
    index: bytes | None = None


@dataclass
class Body:
    """What a snapshot holds, read back: the parts, the windows, and the records of the
    projections saved in slices whose fingerprint was asked for (decoded)."""

    parts: dict[str, Part]
    windows: dict[str, list[int]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    index: bytes | None = None
    index_arrays: dict[str, bytearray] = field(default_factory=dict)


# Per projection saved in slices: the fingerprints whose slices it loads (its own, and any
# earlier shape it still reads), each with a decoder of those slices.
Wanted = Mapping[str, Mapping[str, msgspec.msgpack.Decoder[Any]]]


class SnapshotError(Exception):
    """A snapshot file that cannot be used; the message says why."""


_header_decoder = msgspec.msgpack.Decoder(Header)
_final_decoder = msgspec.msgpack.Decoder(Final)
_fingerprints_decoder = msgspec.msgpack.Decoder(dict[str, str])
_plain = msgspec.msgpack.Encoder()
_second = itemgetter(1)


def snapshot_paths(directory: Path) -> list[tuple[int, Path]]:
    """The snapshot files in `directory`, newest (highest seq) first."""
    if not directory.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for p in directory.iterdir():
        name = p.name
        if name.startswith(PREFIX) and name.endswith(SUFFIX):
            digits = name[len(PREFIX) : -len(SUFFIX)]
            if digits.isdigit():
                found.append((int(digits), p))
    found.sort(reverse=True)
    return found


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        prefix = f.read(len(MAGIC) + _HEADER_LEN)
        if len(prefix) < len(MAGIC) + _HEADER_LEN or not prefix.startswith(MAGIC[:-1]):
            raise SnapshotError("not a snapshot file (bad magic)")
        if not prefix.startswith(MAGIC):
            raise SnapshotError(f"format {prefix[len(MAGIC) - 1]}, this broker reads {FORMAT}")
        size = int.from_bytes(prefix[len(MAGIC) :], "big")
        raw = f.read(size) if size <= HEADER_SPACE else b""
    try:
        header = _header_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"unreadable header: {exc}") from None
    if header.format != FORMAT:
        raise SnapshotError(f"format {header.format}, this broker reads {FORMAT}")
    return header


class _Reader:
    """Frames read in order and counted; hashed in order by a thread of their own, which
    overlaps the decoding of the frames read before (hashing releases the GIL)."""

    def __init__(self, f: IO[bytes], hashing: ThreadPoolExecutor) -> None:
        self.f, self.digest, self.length = f, hashlib.sha256(), 0
        self.hashing = hashing

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise SnapshotError("the body is damaged (truncated)")
        self.hashing.submit(self.digest.update, data)
        self.length += n
        return data

    def frame(self) -> tuple[bytes, str, bytes]:
        kind_and_len = self.read(2)
        name = self.read(kind_and_len[1]).decode()
        data = self.read(int.from_bytes(self.read(4), "big"))
        return kind_and_len[:1], name, data


def read_body(path: Path, header: Header, wanted: Wanted) -> Body:
    """Read and check the body. `wanted`: projection name -> fingerprint -> a decoder of its
    slices; the slices of other projections, or of another shape, are skipped."""
    records: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as f, ThreadPoolExecutor(1, "snapshot-hash") as hashing:
        f.seek(HEADER_SPACE)
        reader = _Reader(f, hashing)
        try:
            kind, _name, data = reader.frame()
            if kind != FINGERPRINTS:
                raise SnapshotError("the body is damaged (no fingerprints first)")
            saved = _fingerprints_decoder.decode(data)
            decoders = {
                name: by_shape[fp]
                for name, by_shape in wanted.items()
                if (fp := saved.get(name, "")) in by_shape  # a shape it loads: decode its slices
            }
            records = {name: {} for name in decoders}
            arrays: dict[str, bytearray] = {}
            while True:
                kind, name, data = reader.frame()
                if kind == END:
                    final = _final_decoder.decode(data)
                    break
                if kind == INDEX:
                    arrays.setdefault(name, bytearray()).extend(data)
                    continue
                decoder = decoders.get(name)
                if kind != RECORDS or decoder is None:
                    continue
                into = records[name]
                pairs = decoder.decode(data)
                into.update(pairs)  # in C; then the keys gone (rare: a slice saved again)
                if any(map(is_, map(_second, pairs), repeat(None))):
                    for key, record in pairs:
                        if record is None:
                            into.pop(key, None)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"the body is damaged (unreadable: {exc})") from None
        if f.read(1):
            raise SnapshotError("the body is damaged (data after its end)")
    if reader.length != header.body_length or reader.digest.digest() != header.body_sha256:
        raise SnapshotError("the body is damaged (length or SHA-256 mismatch)")
    return Body(final.parts, final.windows, records, final.index, arrays)


def snapshot_directory(config: Config) -> Path:
    return Path(config.snapshots.directory or Path(config.server.data_dir) / "snapshots")


def check_log_against_snapshots(directory: Path, log_head: int) -> None:
    """Raise IntegrityError when the newest readable snapshot covers events past the log's
    head: the log was lost, truncated or replaced, and starting would serve an empty or older
    state as if it were healthy (the snapshot could not even be used). Blocking."""
    for _seq, path in snapshot_paths(directory):
        try:
            header = read_header(path)
        except (SnapshotError, OSError):
            continue  # not a snapshot: says nothing about the log
        if header.seq > log_head:
            raise IntegrityError(
                log_head + 1,
                f"the log ends at seq {log_head} but snapshot {path} covers up to seq "
                f"{header.seq}: the log was lost or replaced; restore it from backup",
            )
        return


class Writer:
    """A snapshot file being written: frames appended as they come, header and rename at the
    end (`finish`), or nothing left behind (`abort`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tmp = directory / f".{PREFIX}{secrets.token_hex(6)}.tmp"
        self.digest = hashlib.sha256()
        self.length = 0
        self.f: IO[bytes] | None = None

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish/abort
        self.f.write(bytes(HEADER_SPACE))

    def frame(self, kind: bytes, name: str, data: bytes) -> None:
        encoded = name.encode()
        head = kind + bytes([len(encoded)]) + encoded + len(data).to_bytes(4, "big")
        assert self.f is not None
        for chunk in (head, data):
            self.f.write(chunk)
            self.digest.update(chunk)
        self.length += len(head) + len(data)

    def finish(self, seq: int, log_hash: bytes, final: Final, keep: int) -> tuple[Path, int]:
        """Write the last frame and the header, fsync, rename into place, then keep only the
        newest `keep` snapshots. Returns the path and the file's size."""
        self.frame(END, "", _plain.encode(final))
        header = _plain.encode(
            Header(
                format=FORMAT,
                seq=seq,
                log_hash=log_hash,
                created_at=time.time(),
                broker_version=__version__,
                body_length=self.length,
                body_sha256=self.digest.digest(),
            )
        )
        assert self.f is not None and len(MAGIC) + _HEADER_LEN + len(header) <= HEADER_SPACE
        f, self.f = self.f, None
        try:
            f.seek(0)
            f.write(MAGIC + len(header).to_bytes(_HEADER_LEN, "big") + header)
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        final_path = self.directory / f"{PREFIX}{seq:012d}{SUFFIX}"
        os.replace(self.tmp, final_path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._prune(keep)
        return final_path, HEADER_SPACE + self.length

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def _prune(self, keep: int) -> None:
        for _seq, old in snapshot_paths(self.directory)[keep:]:
            with contextlib.suppress(OSError):
                old.unlink()
        now = time.time()
        for p in self.directory.glob(f".{PREFIX}*.tmp"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > TMP_MAX_AGE:
                    p.unlink()
