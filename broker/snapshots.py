"""Projection snapshots: start-up loads the newest valid one and replays only the log's tail.

A snapshot is written every `[snapshots] every` events and at shutdown, as one file
`<dir>/snapshot-<seq>.msgpack`:

    MAGIC | header length (4 bytes, big-endian) | header (msgpack) | body (msgpack)

The header holds the format version, the seq, the log's chain hash at that seq, and the body's
length and SHA-256; the body maps each projection's name to its fingerprint (its shape) and its
saved state (`Projection.snapshot()`). The state is encoded in the event loop (a consistent
cut: nothing is applied meanwhile); hashing, writing, fsync and the atomic rename happen in a
thread.

A snapshot is never trusted: at start-up it is used only if its format is known, its body is
intact, and the log holds an event at its seq whose chain hash is the one recorded (otherwise
it is ignored, with a warning, and the next older one is tried). Its hash also lets the SQLite
log verify its chain from that seq on (the prefix was verified when the snapshot was taken).
A projection missing from the snapshot, of another shape, or that cannot be saved field by field
(e.g. the messages projection around its delivery queue) is rebuilt by replaying, from the
start, only the event types it handles; the others load from the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiohttp import web

from broker import __version__
from broker.config import Config
from broker.keys import CONFIG, RUNTIME, SNAPSHOTS
from broker.runtime import Runtime, build_projections
from eventstore import open_store
from eventstore.base import EventStore, IntegrityError
from projections.base import Projection, Projections
from projections.snapshots import Unsupported, encoder, fingerprint

log = structlog.get_logger(__name__)

FORMAT = 1
MAGIC = b"BRKSNAP\x01"
_HEADER_LEN = 4
_PREFIX = "snapshot-"
_SUFFIX = ".msgpack"
WINDOW = 4096  # seqs per window of the replay index
_TMP_MAX_AGE = 3600.0  # seconds before a leftover temporary file (a crash mid-write) is removed
# After a failed periodic snapshot, the next waits for `every` more events and for this delay,
# doubled at each failure in a row up to the cap (a full disk must not cost a CPU).
RETRY_DELAY, RETRY_DELAY_MAX = 1.0, 300.0


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


class Body(msgspec.Struct):
    parts: dict[str, Part]
    # Per projection: the windows (seq // WINDOW) holding events it handles, up to the seq.
    windows: dict[str, list[int]] = {}


_header_decoder = msgspec.msgpack.Decoder(Header)
_body_decoder = msgspec.msgpack.Decoder(Body)
_plain = msgspec.msgpack.Encoder()


class SnapshotError(Exception):
    """A snapshot file that cannot be used; the message says why."""


@dataclass
class Boot:
    """What start-up did: the snapshot used (seq 0: none), and the projections rebuilt by
    replay instead."""

    seq: int = 0
    path: str = ""
    replayed: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0


# --- files (blocking: run in a thread) ---


def snapshot_paths(directory: Path) -> list[tuple[int, Path]]:
    """The snapshot files in `directory`, newest (highest seq) first."""
    if not directory.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for p in directory.iterdir():
        name = p.name
        if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
            digits = name[len(_PREFIX) : -len(_SUFFIX)]
            if digits.isdigit():
                found.append((int(digits), p))
    found.sort(reverse=True)
    return found


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        prefix = f.read(len(MAGIC) + _HEADER_LEN)
        if len(prefix) < len(MAGIC) + _HEADER_LEN or not prefix.startswith(MAGIC):
            raise SnapshotError("not a snapshot file (bad magic)")
        size = int.from_bytes(prefix[len(MAGIC) :], "big")
        raw = f.read(size)
    try:
        header = _header_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"unreadable header: {exc}") from None
    if header.format != FORMAT:
        raise SnapshotError(f"format {header.format}, this broker reads {FORMAT}")
    return header


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


def read_body(path: Path, header: Header) -> Body:
    with open(path, "rb") as f:
        f.seek(len(MAGIC))
        size = int.from_bytes(f.read(_HEADER_LEN), "big")
        f.seek(len(MAGIC) + _HEADER_LEN + size)
        body = f.read()
    if len(body) != header.body_length or hashlib.sha256(body).digest() != header.body_sha256:
        raise SnapshotError("the body is damaged (length or SHA-256 mismatch)")
    try:
        return _body_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"unreadable body: {exc}") from None


def write_file(
    directory: Path, seq: int, log_hash: bytes, body_parts: Body, keep: int
) -> tuple[Path, int]:
    """Write a snapshot atomically (temporary file, fsync, rename, fsync of the directory), then
    keep only the newest `keep`. Returns the path and its size."""
    directory.mkdir(parents=True, exist_ok=True)
    body = _plain.encode(body_parts)
    header = _plain.encode(
        Header(
            format=FORMAT,
            seq=seq,
            log_hash=log_hash,
            created_at=time.time(),
            broker_version=__version__,
            body_length=len(body),
            body_sha256=hashlib.sha256(body).digest(),
        )
    )
    final = directory / f"{_PREFIX}{seq:012d}{_SUFFIX}"
    tmp = directory / f".{final.name}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(header).to_bytes(_HEADER_LEN, "big") + header)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for _seq, old in snapshot_paths(directory)[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
    now = time.time()
    for p in directory.glob(f".{_PREFIX}*.tmp"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _TMP_MAX_AGE:
                p.unlink()
    return final, len(header) + len(body) + len(MAGIC) + _HEADER_LEN


# --- saving ---


def encode_parts(projections: Projections) -> tuple[dict[str, Part], dict[str, str]]:
    """Each projection's saved state, and the ones left out with the reason. Synchronous: call
    it where nothing is applied meanwhile (the event loop), so the cut is consistent."""
    parts: dict[str, Part] = {}
    skipped: dict[str, str] = {}
    for name, part in projections.parts.items():
        if not part.snapshottable:
            skipped[name] = "declared not snapshottable"
            continue
        try:
            data = encoder.encode(part.snapshot())
        except (Unsupported, TypeError, NotImplementedError, ValueError) as exc:
            skipped[name] = str(exc) or type(exc).__name__
            continue
        parts[name] = Part(fingerprint(part), msgspec.Raw(data))
    return parts, skipped


def _handled_types(parts: list[Projection]) -> list[str]:
    return sorted({cls.type_name() for part in parts for cls in part.handlers()})


def window_ranges(windows: list[int], to_seq: int) -> list[tuple[int, int]]:
    """The seq ranges (inclusive) covered by `windows` (sorted window numbers), up to `to_seq`;
    adjacent windows merge into one range."""
    ranges: list[tuple[int, int]] = []
    for w in windows:  # window w holds the seqs s with s // WINDOW == w
        lo, hi = max(1, w * WINDOW), min(to_seq, w * WINDOW + WINDOW - 1)
        if lo > hi:
            break
        if ranges and ranges[-1][1] + 1 == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


class Snapshotter:
    """Loads the newest valid snapshot at start-up (`open_log`) and writes new ones every
    `every` events and at shutdown.

    It also tracks, per projection, which windows of `WINDOW` seqs hold events the projection
    handles, and saves that with each snapshot: a projection that is rebuilt by replay rather
    than loaded (see the module doc) then costs the next start-up only the windows of the log
    holding its events, not a scan of the whole log."""

    def __init__(self, config: Config) -> None:
        self.config = config
        cfg = config.snapshots
        self.enabled = cfg.enabled and config.store.backend != "memory"
        self.every = cfg.every
        self.keep = cfg.keep
        self.directory = snapshot_directory(config)
        self.boot = Boot()
        # A serving process (`broker serve`) keeps what start-up built for its whole life: it is
        # frozen out of the collector's generations as soon as it is built. Not in tests, which
        # build and drop many applications in one process.
        self.freeze_on_load = False
        self.last_seq = 0
        self.runtime: Runtime | None = None
        self.windows: dict[str, set[int]] = {}  # projection -> windows holding its events
        self._tracked_by_type: dict[type, list[set[int]]] = {}
        self._task: asyncio.Task[Path | None] | None = None
        self._reported: set[str] = set()
        self.now = time.monotonic  # the back-off's clock
        self.failures = 0  # periodic snapshots failed in a row
        self._retry_seq = 0  # after a failure: no periodic attempt before this seq...
        self._retry_at = 0.0  # ... nor before this time

    # --- start-up ---

    async def open_log(self) -> tuple[EventStore, Projections]:
        """Open the log and bring the projections to its head: from the newest valid snapshot
        plus the tail when there is one, from the whole log otherwise."""
        t0 = time.perf_counter()
        store = open_store(self.config.store)
        projections = build_projections(self.config.delivery)
        # The SQLite log is checked against the snapshot before it is opened, so that opening
        # verifies its chain from the snapshot on; another backend with `hash_at` after.
        early = hasattr(store, "trusted_prefix")
        if self.enabled and early:  # before the log is opened: a lost one is not created anew
            from eventstore.sqlite_verify import head_of_file

            head = await asyncio.to_thread(head_of_file, store.path)  # type: ignore[attr-defined]
            if head is not None:
                await asyncio.to_thread(check_log_against_snapshots, self.directory, head)
        chosen = await self._choose(store) if self.enabled and early else None
        if chosen is not None and getattr(store, "verify_on_open", False):
            store.trusted_prefix = (chosen[1].seq, chosen[1].log_hash)  # type: ignore[attr-defined]
        await store.open()
        if self.enabled and not early and hasattr(store, "hash_at"):
            try:
                head = await store.head()
                await asyncio.to_thread(check_log_against_snapshots, self.directory, head)
            except BaseException:
                await store.close()
                raise
            chosen = await self._choose(store)
        if chosen is not None:
            path, header, body = chosen
        collecting = gc.isenabled()
        gc.disable()  # building millions of objects: collections would double the time
        try:
            if chosen is not None:
                projections = await self._restore(store, projections, header.seq, body)
                self.last_seq = header.seq
                self.boot.seq, self.boot.path = header.seq, str(path)
            self._track(projections, chosen[2] if chosen is not None else None)
            await self._apply_tail(store, projections)
        except BaseException:
            await store.close()
            raise
        finally:
            if collecting:
                if self.freeze_on_load:  # else the next young collection walks all of it
                    gc.freeze()
                gc.enable()
        self.boot.seconds = time.perf_counter() - t0
        if chosen is not None:
            log.info(
                "snapshot_loaded",
                seq=self.boot.seq,
                path=self.boot.path,
                replayed=self.boot.replayed,
                tail=projections.seq - self.boot.seq,
                seconds=round(self.boot.seconds, 3),
            )
        else:
            log.info(
                "log_replayed",
                events=projections.seq,
                seconds=round(self.boot.seconds, 3),
                snapshots="disabled" if not self.enabled else "none valid",
            )
        return store, projections

    async def _choose(self, store: EventStore) -> tuple[Path, Header, Body] | None:
        """The newest snapshot that matches the log, read and checked (files in a thread)."""
        from eventstore.sqlite import SqliteStore
        from eventstore.sqlite_verify import hash_at_file

        for _seq, path in await asyncio.to_thread(snapshot_paths, self.directory):
            try:
                header = await asyncio.to_thread(read_header, path)
                if isinstance(store, SqliteStore):  # not open yet: read the file
                    stored = await asyncio.to_thread(hash_at_file, store.path, header.seq)
                else:
                    stored = await store.hash_at(header.seq)  # type: ignore[attr-defined]
                if stored is None:
                    raise SnapshotError(f"the log has no event {header.seq} (a different log?)")
                if stored != header.log_hash:
                    raise SnapshotError(f"the log's hash at seq {header.seq} differs")
                body = await asyncio.to_thread(read_body, path, header)
            except Exception as exc:  # unreadable, damaged, or not this log's
                self.boot.ignored.append((str(path), str(exc)))
                log.warning("snapshot_ignored", path=str(path), reason=str(exc))
                continue
            return path, header, body
        return None

    async def _restore(
        self, store: EventStore, projections: Projections, seq: int, body: Body
    ) -> Projections:
        restored: dict[str, Projection] = {}
        for name, part in projections.parts.items():
            saved = body.parts.get(name)
            if saved is None or not part.snapshottable or saved.fingerprint != fingerprint(part):
                continue
            try:
                part.restore(saved.data)  # type: ignore[arg-type]
            except Exception as exc:
                log.warning("snapshot_part_ignored", projection=name, reason=str(exc))
                continue
            restored[name] = part
        missing = [n for n in projections.parts if n not in restored]
        if missing:  # fresh instances for the rest (a failed restore may have left half a state)
            fresh = build_projections(self.config.delivery).parts
            projections = Projections(
                [restored[n] if n in restored else fresh[n] for n in projections.parts]
            )
            for name in missing:
                windows = body.windows.get(name)
                ranges = window_ranges(windows, seq) if windows is not None else [(1, seq)]
                await self._replay(store, projections.parts[name], ranges)
                if windows is not None:
                    self.windows[name] = set(windows)
        projections.seq = seq
        self.boot.replayed = missing
        return projections

    @staticmethod
    async def _replay(store: EventStore, part: Projection, ranges: list[tuple[int, int]]) -> None:
        """Apply the events of `ranges` that `part` handles, to `part` only."""
        handlers = part.handlers()
        types = _handled_types([part])
        for lo, hi in ranges if types else ():
            events: Any = store.read(lo, hi, types)
            async with aclosing(events):
                async for env in events:
                    handlers[type(env.event)](env)

    def _track(self, projections: Projections, body: Body | None) -> None:
        """Track, for every projection, the windows holding events it handles: up to the
        snapshot from the snapshot (all of them when it does not say), after it exactly."""
        seq = projections.seq
        for name in projections.parts:
            if name not in self.windows:
                known = body.windows.get(name) if body is not None else None
                if known is not None:
                    self.windows[name] = set(known)
                else:  # not known: every window up to here may hold its events
                    self.windows[name] = set(range(seq // WINDOW + 1))
        self._tracked_by_type = {}
        for name, windows in self.windows.items():
            for event_type in projections.parts[name].handlers():
                self._tracked_by_type.setdefault(event_type, []).append(windows)

    async def _apply_tail(self, store: EventStore, projections: Projections) -> None:
        """Apply the events after the snapshot (the whole log without one), marking the windows
        of tracked projections' events on the way."""
        tracked = self._tracked_by_type
        events: Any = store.read(projections.seq + 1)
        async with aclosing(events):
            async for env in events:
                projections.apply(env)
                marks = tracked.get(type(env.event))
                if marks is not None:
                    for windows in marks:
                        windows.add(env.seq // WINDOW)

    # --- saving ---

    def on_append(self, envs: Any) -> None:
        """Store listener: mark the windows of tracked events; start a snapshot every `every`
        events (one at a time)."""
        tracked = self._tracked_by_type
        if tracked:
            for env in envs:
                marks = tracked.get(type(env.event))
                if marks is not None:
                    for windows in marks:
                        windows.add(env.seq // WINDOW)
        runtime = self.runtime
        if runtime is None or runtime.projections.seq - self.last_seq < self.every:
            return
        if self.failures and (
            runtime.projections.seq < self._retry_seq or self.now() < self._retry_at
        ):
            return  # backing off
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._periodic())

    async def _periodic(self) -> Path | None:
        seq = self.runtime.projections.seq if self.runtime is not None else 0
        try:
            path = await self.take()
        except Exception:  # a failed snapshot costs a longer start-up, nothing else
            self.failures += 1
            delay = min(RETRY_DELAY * 2 ** (self.failures - 1), RETRY_DELAY_MAX)
            self._retry_seq, self._retry_at = seq + self.every, self.now() + delay
            log.exception(  # once per back-off, not once per append
                "snapshot_failed",
                failures=self.failures,
                retry_after_events=self.every,
                retry_after_seconds=delay,
            )
            return None
        self.failures = 0
        return path

    async def take(self) -> Path | None:
        """Save the projections as they are now; None if there is nothing new to save."""
        runtime = self.runtime
        if runtime is None or not self.enabled:
            return None
        projections = runtime.projections
        seq = projections.seq
        if seq == 0 or seq == self.last_seq:
            return None
        t0 = time.perf_counter()
        parts, skipped = encode_parts(projections)  # in the loop: a consistent cut at `seq`
        windows = {n: sorted(w) for n, w in self.windows.items()}
        encoded = time.perf_counter() - t0
        for name, reason in skipped.items():
            if name not in self._reported:
                self._reported.add(name)
                log.info("snapshot_skips_projection", projection=name, reason=reason)
        log_hash = await runtime.store.hash_at(seq)  # type: ignore[attr-defined]
        if log_hash is None:
            return None
        path, size = await asyncio.to_thread(
            write_file, self.directory, seq, log_hash, Body(parts, windows), self.keep
        )
        self.last_seq = max(self.last_seq, seq)
        log.info(
            "snapshot_written",
            seq=seq,
            bytes=size,
            encode_ms=round(encoded * 1000, 1),
            total_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return path

    async def wait(self) -> None:
        """Let a snapshot being written finish."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


async def _snapshots_ctx(app: web.Application) -> AsyncIterator[None]:
    snapshotter = app[SNAPSHOTS]
    runtime = app[RUNTIME]
    supported = hasattr(runtime.store, "hash_at")
    if snapshotter.enabled and supported:
        snapshotter.runtime = runtime
        runtime.store.add_listener(snapshotter.on_append)
    try:
        yield
    finally:
        if snapshotter.runtime is not None:
            runtime.store.remove_listener(snapshotter.on_append)
            await snapshotter.wait()
            try:
                await snapshotter.take()  # at shutdown: the next start replays nothing
            except Exception:
                log.exception("snapshot_failed")
            snapshotter.runtime = None


def setup(app: web.Application) -> None:
    """Create the snapshotter (`broker.app` opens the log through `app[SNAPSHOTS].open_log()`)
    and the context writing snapshots; call after the runtime's context is registered."""
    app[SNAPSHOTS] = Snapshotter(app[CONFIG])
    app.cleanup_ctx.append(_snapshots_ctx)
