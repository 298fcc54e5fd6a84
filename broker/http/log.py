"""Operators' view of the log itself: its retention policy, size by event type, the last
compaction, the background verification (`GET /api/v1/admin/log`), and compaction on demand
(`POST /api/v1/admin/log/compact`, `?dry_run=true` to preview). What compaction and verification
do: broker/upkeep/compaction.py, broker/upkeep/verification.py, docs/operations.md."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from broker.errors import CompactionUnavailable
from broker.http.auth import Permission
from broker.http.bodies import json_response
from broker.http.events import EVENTS_READ
from broker.http.routing import Routes
from broker.keys import COMPACTOR, CONFIG, RUNTIME, VERIFIER
from broker.pagination import decode_query
from broker.upkeep.compaction import Report, log_bytes
from broker.upkeep.verification import Status
from eventstore.events import LogCompacted

routes = Routes("events")
LOG_ADMIN = Permission("log:admin")
SIZES_TTL = 60.0  # seconds a size-by-type scan is reused while the log grows


class TypeSize(msgspec.Struct):
    events: int
    bytes: int  # roughly: the encoded event plus its envelope and hash


class Compaction(msgspec.Struct, kw_only=True):
    seq: int
    at: float
    up_to: int
    removed: dict[str, int]
    gaps: int
    first_removed: int
    last_removed: int
    policy: dict[str, float]
    seconds: float | None = None  # known when this process ran it
    log_bytes_before: int | None = None
    log_bytes_after: int | None = None


class Policy(msgspec.Struct, kw_only=True):
    days: dict[str, float]
    every: float
    batch_chunks: int
    verify_every: float


class LogView(msgspec.Struct, kw_only=True):
    backend: str
    head: int
    # sqlite: its pages in use and its WAL (free pages are reused); nats: the stream's bytes
    log_bytes: int | None
    policy: Policy
    by_type: dict[str, TypeSize] | None  # sqlite: every event stored, by type
    gaps: int
    removed_events: int  # events removed by compactions so far (nats: by the last one)
    last_compaction: Compaction | None
    # sqlite, unless [retention] verify_every = 0: the checkpoint and the last pass, the
    # failures (the first bad seq), broker/upkeep/verification.py
    verification: Status | None


class CompactQuery(msgspec.Struct, kw_only=True):
    dry_run: bool = False


def _sizes(path: str, head: int) -> dict[str, TypeSize]:
    from eventstore.sqlite_compact import scan

    found = scan(Path(path), head + 1, {}, {}, None).sizes
    return {t: TypeSize(n, b) for t, (n, b) in sorted(found.items())}


async def _cached_sizes(request: web.Request, path: str, head: int) -> dict[str, TypeSize]:
    """The sizes by type, scanned at most once a minute (kept on the compactor)."""
    compactor = request.app[COMPACTOR]
    cached = compactor.sizes
    if cached is not None and time.monotonic() - cached[0] < SIZES_TTL:
        return cached[1]  # type: ignore[no-any-return]
    sizes = await asyncio.to_thread(_sizes, path, head)
    compactor.sizes = (time.monotonic(), sizes)
    return sizes


async def _last_compaction(request: web.Request, seq: int | None) -> Compaction | None:
    """The `log.compacted` event at `seq`, with this process's figures if it ran it."""
    store = request.app[RUNTIME].store
    if seq is None:
        return None
    found = [env async for env in store.read(seq, seq)]
    if not found or not isinstance(found[0].event, LogCompacted):
        return None
    env, e = found[0], found[0].event
    view = Compaction(
        seq=env.seq,
        at=env.ts,
        up_to=e.up_to,
        removed=e.removed,
        gaps=e.gaps,
        first_removed=e.first_removed,
        last_removed=e.last_removed,
        policy=e.policy,
    )
    last = request.app[COMPACTOR].last
    if last is not None and last.compaction_seq == env.seq:
        view.seconds = last.seconds
        view.log_bytes_before, view.log_bytes_after = last.log_bytes_before, last.log_bytes_after
    return view


@routes.get(
    "/api/v1/admin/log",
    policy=EVENTS_READ,
    response=LogView,
    summary="The log: retention policy, size by event type, the last compaction",
)
async def log_view(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    store = request.app[RUNTIME].store
    head = await store.head()
    retention = config.retention
    view = LogView(
        backend=config.store.backend,
        head=head,
        log_bytes=None,
        policy=Policy(
            days=retention.days,
            every=retention.every,
            batch_chunks=retention.batch_chunks,
            verify_every=retention.verify_every,
        ),
        by_type=None,
        gaps=0,
        removed_events=0,
        last_compaction=None,
        verification=None,
    )
    if config.store.backend == "sqlite":
        from eventstore.sqlite_compact import gap_summary, last_compaction

        path = config.store.path
        view.log_bytes = await asyncio.to_thread(log_bytes, path)
        view.by_type = await _cached_sizes(request, path, head)
        view.gaps, view.removed_events = await asyncio.to_thread(gap_summary, Path(path))
        seq = await asyncio.to_thread(last_compaction, Path(path))
        view.last_compaction = await _last_compaction(request, seq)
    elif hasattr(store, "stream_size"):  # NATS: the stream's bytes; removals by subject
        nats: Any = store
        view.log_bytes = (await nats.stream_size())[2]
        view.last_compaction = await _last_compaction(request, await nats.last_compaction())
        if view.last_compaction is not None:  # its removals (a purge leaves no gap record)
            view.removed_events = sum(view.last_compaction.removed.values())
    verifier = request.app.get(VERIFIER)  # sqlite only (none is wired on NATS)
    if verifier is not None:
        view.verification = await asyncio.to_thread(verifier.status)
    return json_response(view)


@routes.post(
    "/api/v1/admin/log/compact",
    policy=LOG_ADMIN,
    query=CompactQuery,
    response=Report,
    summary="Compact the log now (a snapshot first), or with dry_run=true show what would go",
    errors=(409,),
)
async def compact(request: web.Request) -> web.Response:
    q = decode_query(request, CompactQuery)
    compactor: Any = request.app.get(COMPACTOR)
    if compactor is None:
        raise CompactionUnavailable("compaction is not available on this server")
    report = await compactor.compact(dry_run=q.dry_run)
    return json_response(report)
