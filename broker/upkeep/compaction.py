"""Compaction: remove what `[retention]` allows, after a snapshot covers it (docs/operations.md).

The rule that makes it safe: the state a start-up rebuilds after a compaction equals the state
before it.

- A compaction only considers events *before* the newest snapshot's seq (`up_to`), which it takes
  first: the projections saved in the snapshot start from it and never replay what was removed.
- Heartbeats, telemetry samples and token rotations (`KEEP_NEWEST`) go only when the snapshot
  saves every projection that handles them, and the newest of each stream (node, tenant, token
  family) stays: a start from no snapshot at all still finds each node's last heartbeat, each
  tenant's latest sample, each family's current token (only their counters count fewer).
- Message events go by message: all of a message's events, once it has been closed for the
  retention time and the messages projection no longer keeps it (out of its bounded window of
  finished messages, no dead letter left). So that even a start without any snapshot (which
  rebuilds the messages projection by replay) finds the same state, the compaction checks its
  choice: it replays the message events before `up_to` twice, with and without the ones it
  would remove, and removes none of them unless both give the same state.
  (`tests/broker/test_compaction.py` checks the whole rule with hypothesis: random histories,
  compact, replay equals before.)
- Challenges (`auth.challenge_used`) and `node.connected` go once old: no projection reads them
  (a used challenge's stream keeps its version, which is what refuses a second use).

Every compaction is the `log.compacted` event, appended before anything is removed, with its
gaps recorded beside the chunks (eventstore/sqlite_compact.py); `broker verify` proves them.

On NATS (`_compact_nats`, eventstore/nats_compact.py) the removable types (heartbeats, telemetry,
connections) are on subjects of their own: after the snapshot, the `log.compacted` event records
per type the stream sequence below which its subject is purged (never past the snapshot's), then
JetStream purges them. Message events, challenges and token rotations stay there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec
import structlog

from broker.config import KEEP_NEWEST, Config, DeliveryConfig, RetentionConfig
from broker.errors import CompactionUnavailable
from broker.runtime import Runtime, build_projections
from eventstore import sqlite_archive, sqlite_compact
from eventstore.events import LogCompacted
from eventstore.integrity import anchors_digest
from eventstore.nats_wire import REMOVABLE
from projections.base import Projection
from projections.snapshots import Unsupported, check_fields

log = structlog.get_logger(__name__)

DAY = 86400.0
PLAIN = ("auth.challenge_used", "node.connected")
MESSAGE_READ_TYPES = (*sorted(sqlite_compact.MESSAGE_TYPES), sqlite_compact.READ_BATCH)


class Report(msgspec.Struct, kw_only=True):
    """What a compaction removed (or, dry run, would remove)."""

    dry_run: bool
    up_to: int = 0
    snapshot_seq: int = 0
    compaction_seq: int | None = None
    removed: dict[str, int] = {}
    removed_total: int = 0
    gaps: int = 0
    first_removed: int = 0
    last_removed: int = 0
    kept_by_type: dict[str, int] = {}  # events before up_to, by type, that stay
    notes: list[str] = []
    log_bytes_before: int = 0
    log_bytes_after: int = 0
    seconds: float = 0.0
    finished_at: float = 0.0
    archive: str | None = None  # the archive file the removed events were written to
    # messages whose every event went, their stream versions forgotten with them (SQLite)
    streams_forgotten: int = 0


def covered_by_snapshot(part: Projection) -> bool:
    """Whether a snapshot saves `part` (else it is rebuilt by replay from the log)."""
    if not part.snapshottable:
        return False
    if type(part).snapshot is not Projection.snapshot:
        return True  # its own snapshot format
    try:
        check_fields(part)
    except Unsupported:
        return False
    return True


def log_bytes(path: str) -> int:
    """Bytes the log occupies (eventstore.sqlite_compact.used_bytes)."""
    return sqlite_compact.used_bytes(Path(path))


class Compactor:
    """Runs compactions on an open runtime, one at a time; keeps the last report."""

    def __init__(self, retention: RetentionConfig, runtime: Runtime, snapshotter: Any) -> None:
        self.retention = retention
        self.runtime = runtime
        self.snapshotter = snapshotter
        self.last: Report | None = None
        self.clock: Callable[[], float] = time.time
        self.completed = asyncio.Event()  # set after each compaction (tests wait on it)
        self.sizes: tuple[float, Any] | None = None  # GET /api/v1/admin/log's last scan
        self._lock = asyncio.Lock()

    @staticmethod
    def supports(store: Any) -> bool:
        """Whether compaction is built for `store`'s backend (SQLite, NATS)."""
        return hasattr(store, "on_writer") or hasattr(store, "compaction_plan")

    @property
    def store(self) -> Any:
        store = self.runtime.store
        if not self.supports(store):
            raise CompactionUnavailable("compaction is built for the sqlite and nats logs")
        return store

    async def run_every(self, every: float) -> None:
        """`broker serve`'s schedule: a compaction every `every` seconds, until cancelled or
        until compaction turns out to be unavailable here."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.compact()
            except CompactionUnavailable as exc:
                log.warning("compaction_unavailable", reason=exc.message)
                return
            except Exception:
                log.exception("compaction_failed")

    async def compact(
        self, *, dry_run: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> Report:
        async with self._lock:
            report = await self._compact(dry_run, progress)
        if not dry_run:
            self.last = report
            self.completed.set()
        return report

    async def _compact(self, dry_run: bool, progress: Callable[[int, int], None] | None) -> Report:
        t0 = time.perf_counter()
        store = self.store
        if not hasattr(store, "on_writer"):
            return await self._compact_nats(store, dry_run)
        report = Report(dry_run=dry_run)
        report.log_bytes_before = await asyncio.to_thread(log_bytes, str(store.path))
        if not dry_run:  # a compaction interrupted before: finish it first
            await sqlite_compact.finish(store, None, self.retention.batch_chunks)
        cut = await self._snapshot_cut(dry_run)
        report.up_to = report.snapshot_seq = cut
        if cut <= 1:
            report.notes.append("nothing to compact: the log holds no snapshot yet")
            return report
        now, days = self.clock(), self.retention.days
        plain = {t: now - days[t] * DAY for t in PLAIN if days.get(t, 0) > 0}
        newest = self._cutoffs(KEEP_NEWEST, now, report)
        msg_days = days.get("message.*", 0)
        before = now - msg_days * DAY if msg_days > 0 else None
        scan = await asyncio.to_thread(
            sqlite_compact.scan, store.path, cut, plain, newest, before, progress
        )
        removal: dict[str, list[int]] = {t: s for t, s in scan.candidates.items() if s}
        forget: dict[str, int] = {}  # message streams removed whole: their number of events
        if before is not None and (scan.messages or scan.batches):
            forget = await self._message_removals(scan, before, cut, removal, report)
        report.streams_forgotten = len(forget)
        seqs = sorted(s for group in removal.values() for s in group)
        spans = sqlite_compact.runs(seqs)
        report.removed = {t: len(s) for t, s in removal.items()}
        report.removed_total = len(seqs)
        report.gaps = len(spans)
        if seqs:
            report.first_removed, report.last_removed = seqs[0], seqs[-1]
        report.kept_by_type = {
            t: size[0] - report.removed.get(t, 0) for t, size in sorted(scan.sizes.items())
        }
        if dry_run or not seqs:
            report.seconds = time.perf_counter() - t0
            return report
        gaps = await asyncio.to_thread(sqlite_compact.anchor_runs, store.path, spans)
        if self.retention.archive_dir:  # archived first: a crash after it removed nothing yet
            archived = await asyncio.to_thread(
                sqlite_archive.write, store.path, spans, Path(self.retention.archive_dir)
            )
            report.archive = str(archived) if archived else None
        up_to_anchor = await store.hash_at(cut)
        [env] = await store.append(
            [
                LogCompacted(
                    up_to=cut,
                    up_to_anchor=up_to_anchor.hex(),
                    policy=dict(days),
                    removed=report.removed,
                    first_removed=report.first_removed,
                    last_removed=report.last_removed,
                    gaps=len(gaps),
                    anchors_digest=anchors_digest(gaps),
                    snapshot_seq=cut,
                )
            ]
        )
        report.compaction_seq = env.seq
        await sqlite_compact.apply(store, env.seq, gaps, progress, self.retention.batch_chunks)
        # after the events (a crash between leaves rows that only keep those ids taken)
        report.streams_forgotten = await store.forget_streams(forget)
        report.seconds = time.perf_counter() - t0
        report.finished_at = self.clock()
        report.log_bytes_after = await asyncio.to_thread(log_bytes, str(store.path))
        log.info(
            "log_compacted",
            seq=env.seq,
            up_to=cut,
            removed=report.removed_total,
            gaps=report.gaps,
            seconds=round(report.seconds, 3),
        )
        return report

    async def _snapshot_cut(self, dry_run: bool) -> int:
        """The seq the snapshot taken first covers (dry run: would cover)."""
        snap = self.snapshotter
        if snap is None or not snap.enabled:
            raise CompactionUnavailable(
                "compaction needs projection snapshots: set [snapshots] enabled = true"
            )
        if dry_run:
            return int(self.runtime.projections.seq)
        await snap.take()
        return int(snap.last_seq)

    async def _compact_nats(self, store: Any, dry_run: bool) -> Report:
        """Compaction on NATS (see the module doc): snapshot stored, record appended, purge."""
        t0 = time.perf_counter()
        report = Report(dry_run=dry_run)
        allowed, _messages, report.log_bytes_before = await store.stream_size()
        if not allowed:
            raise CompactionUnavailable(
                f"NATS stream {store.stream} denies purges (created before compaction was built "
                "for NATS; JetStream cannot lift deny_purge): see docs/scale-out.md, compaction"
            )
        if not dry_run:  # a compaction interrupted after its record: purge what it recorded
            await store.finish_purges()
        cut = await self._snapshot_cut(dry_run)
        report.up_to = report.snapshot_seq = cut
        if cut <= 1:
            report.notes.append("nothing to compact: the log holds no snapshot yet")
            return report
        days = self.retention.days
        plan = await store.compaction_plan(cut, self._cutoffs(REMOVABLE, self.clock(), report))
        removing = [t for t in plan.types if t.events]
        report.removed = {t.event_type: t.events for t in removing}
        report.removed_total = plan.events
        if removing:
            report.first_removed = min(t.first for t in removing)
            report.last_removed = max(t.last for t in removing)
        report.notes.append(
            "NATS: message events, challenges and token rotations are kept; removable types "
            f"({', '.join(REMOVABLE)}) go by subject, up to the snapshot's stream message"
        )
        if dry_run or not plan.events:
            report.seconds = time.perf_counter() - t0
            return report
        anchor = await store.anchor(plan.up_to_sseq)
        [env] = await store.append(
            [
                LogCompacted(
                    up_to=cut,
                    up_to_anchor=(anchor or b"").hex(),
                    policy=dict(days),
                    removed=report.removed,
                    first_removed=report.first_removed,
                    last_removed=report.last_removed,
                    snapshot_seq=cut,
                    purged={t.event_type: t.bound for t in plan.types},
                )
            ]
        )
        report.compaction_seq = env.seq
        purged = await store.purge(store.purge_bounds())
        report.notes.append(f"NATS: {purged:,} stream messages purged")
        report.seconds = time.perf_counter() - t0
        report.finished_at = self.clock()
        _allowed, _messages, report.log_bytes_after = await store.stream_size()
        log.info(
            "log_compacted",
            seq=env.seq,
            up_to=cut,
            removed=report.removed_total,
            messages_purged=purged,
            seconds=round(report.seconds, 3),
        )
        return report

    def _cutoffs(self, types: Iterable[str], now: float, report: Report) -> dict[str, float]:
        """The time before which each of `types` goes, for those with a retention (days > 0)
        whose every handling projection is saved in snapshots; the others are kept, noted."""
        days, uncovered = self.retention.days, self._uncovered_types()
        cutoffs = {}
        for t in types:
            if days.get(t, 0) <= 0:
                continue
            if t in uncovered:
                report.notes.append(f"{t} kept: a projection handling it is not in snapshots")
                continue
            cutoffs[t] = now - days[t] * DAY
        return cutoffs

    def _uncovered_types(self) -> set[str]:
        """Event types some projection handling them is not saved in snapshots."""
        return {
            cls.type_name()
            for part in self.runtime.projections.parts.values()
            if not covered_by_snapshot(part)
            for cls in part.handlers()
        }

    async def _message_removals(
        self,
        scan: sqlite_compact.Scan,
        before: float,
        cut: int,
        removal: dict[str, list[int]],
        report: Report,
    ) -> dict[str, int]:
        """Add the events of the messages that may go, if a replay without them gives the
        messages projection's state unchanged at `cut` (see the module doc); the messages
        whose every event goes, with their number of events (their streams' versions)."""
        full, _ = await self._replay_messages(cut, frozenset())
        dead = {mid for mid, _node in full.dead_letters}  # type: ignore[attr-defined]
        kept = full.messages  # type: ignore[attr-defined]

        def gone(mid: str) -> bool:
            return mid not in kept and mid not in dead

        chosen: list[int] = []
        whole: dict[str, int] = {}
        for mid, hist in scan.messages.items():
            if hist.last_ts < before and gone(mid):
                chosen.extend(hist.seqs)
                whole[mid] = len(hist.seqs)
        for seq, _ts, ids in scan.batches:
            if all(gone(m) for m in ids):
                chosen.append(seq)
        if not chosen:
            return {}
        dropped = frozenset(chosen)
        after, types = await self._replay_messages(cut, dropped)
        if after.state() != full.state():
            report.notes.append(
                "message events kept: a replay without them gave another state (a redrive or "
                "a reused idempotency key among them)"
            )
            return {}
        for seq, t in types:
            removal.setdefault(t, []).append(seq)
        return whole

    async def _replay_messages(
        self, cut: int, skip: frozenset[int]
    ) -> tuple[Projection, list[tuple[int, str]]]:
        """A fresh messages projection fed the message events before `cut` but `skip`'s; and
        the (seq, type) of those skipped."""
        live = self.runtime.messages
        delivery = DeliveryConfig(ack_timeout=live.ack_timeout, max_attempts=live.max_attempts)
        part = build_projections(delivery).parts["messages"]
        part.retain_completed = live.retain_completed  # type: ignore[attr-defined]
        handlers = part.handlers()
        skipped: list[tuple[int, str]] = []
        events: Any = self.runtime.store.read(1, cut - 1, MESSAGE_READ_TYPES)
        n = 0
        async with aclosing(events):
            async for env in events:
                if env.seq in skip:
                    skipped.append((env.seq, env.type))
                else:
                    handlers[type(env.event)](env)
                n += 1
                if n % 1000 == 0:
                    await asyncio.sleep(0)  # let appends and requests through
        return part, skipped


@contextlib.asynccontextmanager
async def offline(config: Config) -> AsyncIterator[Compactor]:
    """A compactor on a log no server has open (`broker compact`): the start-up path (newest
    snapshot + tail), then compactions; a snapshot at the end, as a server's shutdown does."""
    from broker.upkeep.snapshots import Snapshotter

    snapshotter = Snapshotter(config)
    store, projections = await snapshotter.open_log()
    runtime = Runtime(store, projections)
    try:
        await runtime.start()
        snapshotter.runtime = runtime
        yield Compactor(config.retention, runtime, snapshotter)
        await snapshotter.take()
    finally:
        snapshotter.runtime = None
        await runtime.stop()
        await store.close()
