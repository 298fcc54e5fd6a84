"""Projection snapshots: start-up loads the newest valid one and replays only the log's tail.

A snapshot is written every `[snapshots] every` events or `interval` seconds (never twice within
`min_interval`) and at shutdown, as one file `<dir>/snapshot-<seq>.msgpack` (the format is in
`broker.upkeep.snapshot_file`; on NATS it is kept in JetStream with the log's index instead, see
`broker.upkeep.snapshot_store`). Taking one never stalls the event loop for long
(`broker.upkeep.snapshot_write`):

- a projection that is mostly one large dict of records (the nodes registry: a million entries
  and ~800 MB encoded) is saved a slice of `SLICE` records at a time, each slice encoded in the
  loop and written by a thread, while events keep being applied; the projection notes the keys
  it changes meanwhile (`Projection.dirty`), and those are saved again, in rounds, until few are
  left;
- then, in one step of the loop (the cut: nothing is applied meanwhile), the last changed records
  and every other projection's state are encoded: the snapshot is the state at that step's seq,
  since a record saved in a slice and not changed after it is as it was at the cut;
- the thread writes the last frames and the header, fsyncs and renames the file into place.

No whole body is held in memory: a snapshot costs a slice's worth of memory, not a copy of the
state.

A snapshot is never trusted: at start-up it is used only if its format is known, its body is
intact, and the log holds an event at its seq whose chain hash is the one recorded (otherwise
it is ignored, with a warning, and the next older one is tried). Its hash also lets the SQLite
log verify its chain from that seq on (the prefix was verified when the snapshot was taken).
A projection missing from the snapshot, of another shape, or that cannot be saved (none today)
is rebuilt by replaying, from the start, only the event types it handles; the others load from
the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from broker.config import Config
from broker.runtime import Runtime, build_projections
from broker.upkeep.snapshot_file import (
    Body,
    Header,
    SnapshotError,
    Wanted,
    check_log_against_snapshots,
    read_body,
    read_header,
    snapshot_directory,
    snapshot_paths,
)
from broker.upkeep.snapshot_store import RemoteSnapshots, cut_hooks
from broker.upkeep.snapshot_write import Taken, slice_decoders, write_snapshot
from eventstore import open_store
from eventstore.base import EventStore
from projections.base import Projection, Projections
from projections.snapshots import fingerprint

log = structlog.get_logger(__name__)

__all__ = ["Body", "Boot", "Snapshotter", "SnapshotError", "snapshot_paths"]

WINDOW = 4096  # seqs per window of the replay index
# After a failed periodic snapshot, the next waits for `every` more events and for this delay,
# doubled at each failure in a row up to the cap (a full disk must not cost a CPU).
RETRY_DELAY, RETRY_DELAY_MAX = 1.0, 300.0


@dataclass
class Boot:
    """What start-up did: the snapshot used (seq 0: none), and the projections rebuilt by
    replay instead."""

    seq: int = 0
    path: str = ""
    log_from: int = 0  # NATS: the stream message the log's index was loaded at (0: none)
    replayed: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0


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
    `every` events or `interval` seconds (not within `min_interval` of the last) and at
    shutdown, one at a time.

    It also tracks, per projection, which windows of `WINDOW` seqs hold events the projection
    handles, and saves that with each snapshot: a projection that is rebuilt by replay rather
    than loaded (see the module doc) then costs the next start-up only the windows of the log
    holding its events, not a scan of the whole log."""

    def __init__(self, config: Config) -> None:
        self.config = config
        cfg = config.snapshots
        self.enabled = cfg.enabled and config.store.backend != "memory"
        self.every = cfg.every
        self.interval, self.min_interval = cfg.interval, cfg.min_interval
        self.keep = cfg.keep
        self.directory = snapshot_directory(config)
        self.remote = (  # NATS: snapshots kept in JetStream (`broker.upkeep.snapshot_store`)
            RemoteSnapshots(config, self.directory / "nats")
            if self.enabled and config.store.backend == "nats"
            else None
        )
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
        self._lock = asyncio.Lock()  # one snapshot at a time (periodic, shutdown, compaction)
        self._reported: set[str] = set()
        self.now = time.monotonic  # the clock of the intervals and the back-off
        self.last_at = self.now()  # when the last snapshot was taken (or start-up)
        self.last: Taken | None = None
        self.written = 0  # snapshots written since the start...
        self.longest_cut_ms = 0.0  # ... and the longest step of the loop one of them took
        self.failures = 0  # periodic snapshots failed in a row
        self._retry_seq = 0  # after a failure: no periodic attempt before this seq...
        self._retry_at = 0.0  # ... nor before this time

    # --- start-up ---

    async def open_log(self) -> tuple[EventStore, Projections]:
        """Open the log and bring the projections to its head: from the newest valid snapshot
        plus the tail when there is one, from the whole log otherwise."""
        t0 = time.perf_counter()
        collecting = gc.isenabled()
        gc.disable()  # decoding or replaying millions of objects: collections would double it
        try:
            store, projections, chosen = await self._open()
        finally:
            if collecting:
                if self.freeze_on_load:  # else the next young collection walks all of it
                    gc.freeze()
                gc.enable()
        self.boot.seconds = time.perf_counter() - t0
        if chosen:
            log.info(
                "snapshot_loaded",
                seq=self.boot.seq,
                path=self.boot.path,
                log_from=self.boot.log_from or None,
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

    async def _open(self) -> tuple[EventStore, Projections, bool]:
        """`open_log`'s work; also says whether a snapshot was loaded."""
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
        wanted = slice_decoders(projections)
        chosen: tuple[Path | str, Header, Body] | None = None
        if self.enabled and early:
            chosen = await self._choose(store, wanted)
        if chosen is not None and getattr(store, "verify_on_open", False):
            store.trusted_prefix = (chosen[1].seq, chosen[1].log_hash)  # type: ignore[attr-defined]
        remote = None
        if self.remote is not None:  # its log index is handed to the store
            remote = await self.remote.choose(store, wanted, self.boot.ignored)
        await store.open()
        if remote is not None and RemoteSnapshots.taken(store, remote, self.boot.ignored):
            chosen, self.boot.log_from = remote, store.started_at  # type: ignore[attr-defined]
        try:
            if self.enabled and not early and hasattr(store, "hash_at"):
                head = await store.head()
                await asyncio.to_thread(check_log_against_snapshots, self.directory, head)
                chosen = await self._choose(store, wanted)
            if chosen is not None:
                path, header, body = chosen
                projections = await self._restore(store, projections, header.seq, body)
                self.last_seq = header.seq
                self.boot.seq, self.boot.path = header.seq, str(path)
            self._track(projections, chosen[2] if chosen is not None else None)
            await self._apply_tail(store, projections)
        except BaseException:
            await store.close()
            raise
        return store, projections, chosen is not None

    async def _choose(self, store: EventStore, wanted: Wanted) -> tuple[Path, Header, Body] | None:
        """The newest snapshot that matches the log, read, checked and decoded (in a thread)."""
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
                body = await asyncio.to_thread(read_body, path, header, wanted)
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
            if (
                saved is None
                or not part.snapshottable
                or saved.fingerprint != fingerprint(part)
                and saved.fingerprint not in part.legacy_records
            ):
                continue
            records = body.records.get(name)
            if part.record_type is not None and records is None:
                continue  # its slices were not read (of another shape)
            try:
                if records is not None:
                    part.restore_sliced(records, saved.data)  # type: ignore[arg-type]
                else:
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
        part.replaying()
        for lo, hi in ranges if types else ():
            events: Any = store.read(lo, hi, types)
            async with aclosing(events):
                async for env in events:
                    handlers[type(env.event)](env)
        part.replayed()

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
        fresh = projections.replaying() if projections.seq == 0 else contextlib.nullcontext()
        async with aclosing(events):
            with fresh:
                async for env in events:
                    projections.apply(env)
                    marks = tracked.get(type(env.event))
                    if marks is not None:
                        for windows in marks:
                            windows.add(env.seq // WINDOW)

    # --- saving ---

    def on_append(self, envs: Any) -> None:
        """Store listener: mark the windows of tracked events; start a snapshot when one is due
        (one at a time)."""
        tracked = self._tracked_by_type
        if tracked:
            for env in envs:
                marks = tracked.get(type(env.event))
                if marks is not None:
                    for windows in marks:
                        windows.add(env.seq // WINDOW)
        runtime = self.runtime
        if runtime is None:
            return
        seq, now = runtime.projections.seq, self.now()
        since = now - self.last_at
        if since < self.min_interval or (
            seq - self.last_seq < self.every and (seq == self.last_seq or since < self.interval)
        ):
            return
        if self.failures and (seq < self._retry_seq or now < self._retry_at):
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
        async with self._lock:
            projections = runtime.projections
            if projections.seq in (0, self.last_seq):
                return None
            t0 = time.perf_counter()
            remote, store = self.remote, runtime.store
            hash_at, index = getattr(store, "hash_at", None), None
            if remote is not None:
                index, hash_at = cut_hooks(store)
            taken = await write_snapshot(
                projections,
                self.directory if remote is None else remote.staging,
                hash_at,  # type: ignore[arg-type]
                lambda: {n: sorted(w) for n, w in self.windows.items()},
                self.keep if remote is None else 1,
                index,
            )
            if taken is None:
                return None
            if remote is not None:  # uploaded, then the local copy goes
                try:
                    await remote.upload(taken.path, taken.seq)
                finally:
                    await asyncio.to_thread(taken.path.unlink, missing_ok=True)
            self.last_seq, self.last_at, self.last = (
                max(self.last_seq, taken.seq),
                self.now(),
                taken,
            )
            self.written += 1
            self.longest_cut_ms = max(self.longest_cut_ms, taken.cut_ms)
        for name, reason in taken.skipped.items():
            if name not in self._reported:
                self._reported.add(name)
                log.info("snapshot_skips_projection", projection=name, reason=reason)
        log.info(
            "snapshot_written",
            seq=taken.seq,
            bytes=taken.size,
            records=taken.records,
            rounds=taken.rounds,
            cut_ms=round(taken.cut_ms, 1),
            total_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return taken.path

    def attach(self, runtime: Runtime) -> bool:
        """Take snapshots of `runtime` from now on, if enabled and the log can check them
        (it records chain hashes, or snapshots are kept in JetStream); False if not."""
        supported = hasattr(runtime.store, "hash_at") or self.remote is not None
        if not (self.enabled and supported):
            return False
        self.runtime, self.last_at = runtime, self.now()
        runtime.react(self.on_append)
        return True

    async def detach(self) -> None:
        """Stop, with a last snapshot: the next start replays nothing."""
        if self.runtime is None:
            return
        self.runtime.unreact(self.on_append)
        await self.wait()
        try:
            await self.take()
        except Exception:
            log.exception("snapshot_failed")
        self.runtime = None

    async def wait(self) -> None:
        """Let a snapshot being written finish."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
