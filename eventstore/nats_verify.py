"""`broker verify` on the NATS backend: what can be checked on a log with many writers.

The SQLite log chains every event's hash to the previous one because one process writes it. On
NATS no writer knows what precedes its chunk, so integrity rests on:

- JetStream itself: per-message checksums in its file store, R3 replication, and a stream that
  denies deletes (checked here: a stream that allows them is reported);
- per chunk: the CRC-32 its writer computed over the chunk (checked on every message);
- the stream as a sequence: every stream seq from 1 to the last present (nothing deleted, expired
  or lost), every message on `<prefix>.*` a broker chunk;
- per event: it decodes into a known event type; seqs and stream versions as every instance
  derives them (gap-free by construction);
- a head hash: the SHA-256 chain of `eventstore.integrity` computed over the derived envelopes,
  the same function the SQLite backend stores. Two runs (two instances, before/after a copy of the
  stream) print the same hash if and only if they saw the same log.

After a compaction (eventstore.nats_compact) the seqs of a stream can only be derived from a
snapshot's log index that covers its purges: `start` (broker.upkeep.snapshot_store.index_from)
hands the newest one to the store, which checks its anchor. Then every batch the index knows is
either present (and checked as above) or *removed*: of a removable subject, below the bound a
`log.compacted` event folded in the log recorded for it. A kept batch whose message is gone, or a
removable one above its recorded bound, fails with its seq ("no compaction recorded its
removal"). The head hash then chains the kept events only (it changes with each compaction, and
is the same on every instance).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import msgspec

from eventstore import integrity
from eventstore.base import IntegrityError, StoreConfig
from eventstore.codec import decode_event
from eventstore.nats import NatsStore
from eventstore.nats_tls import client_context


class NatsVerifyReport(msgspec.Struct, kw_only=True):
    stream: str
    url: str
    events: int
    messages: int
    refused_batches: int
    removed_events: int = 0  # by compactions
    compactions: int = 0
    snapshot: str | None = None  # where the log index came from
    head_hash: str
    seconds: float
    warnings: list[str] = []

    def summary(self) -> str:
        compacted = (
            f", {self.removed_events:,} events removed by {self.compactions:,} recorded "
            f"compactions (seqs from the log index of {self.snapshot})"
            if self.removed_events or self.compactions
            else ""
        )
        return (
            f"ok: NATS stream {self.stream} at {self.url}: {self.events:,} events in "
            f"{self.messages:,} messages ({self.refused_batches:,} refused batches){compacted}, "
            f"chunk checksums intact, no message missing but those compactions purged, every "
            f"event decodes; head hash {self.head_hash} ({self.seconds:.2f} s)"
        )


async def verify_stream(
    config: StoreConfig,
    progress: Callable[[int, int], None] | None = None,
    start: Callable[[NatsStore], Awaitable[str | None]] | None = None,
) -> NatsVerifyReport:
    """Check the whole stream named by `config`; IntegrityError names the first bad seq.
    `start` may hand the store a snapshot's log index before it opens (see the module doc)."""
    t0 = time.perf_counter()
    store = NatsStore(
        config.url,
        config.stream,
        subject_prefix=config.subject_prefix,
        readonly=True,
        tls=client_context(config),
    )
    snapshot = await start(store) if start is not None else None
    await store.open()  # consumes every message: derives seqs, checks each chunk's CRC
    if store.start_refused:
        snapshot = None
    try:
        if store.stats.problems:
            seq, reason = store.stats.problems[0]
            raise IntegrityError(seq, reason)
        info = await store._js.stream_info(config.stream)
        warnings = _config_warnings(info.config)
        head = await store.head()
        index = store._index
        prev = integrity.GENESIS
        expected = 1
        removed = compactions = 0
        async for seq, ev, version, ts in store.read_stored(1, head):
            while seq > expected:  # only batches a recorded compaction removed are skipped
                i = index.position(expected)
                if not index.removed(i):
                    raise IntegrityError(expected, f"event missing (found seq {seq})")
                removed += index.events_in(i)
                expected = index.entry(i)[2] + index.events_in(i)
            if seq != expected:
                raise IntegrityError(expected, f"event missing (found seq {seq})")
            data = bytes(ev.data)
            try:
                decode_event(data)
            except Exception as exc:
                raise IntegrityError(seq, f"undecodable event: {exc}") from None
            prev = integrity.chain_hash(prev, seq, ev.stream, version, ts, ev.id, data)
            compactions += ev.type == "log.compacted"
            expected += 1
            if progress is not None and seq % 10_000 == 0:
                progress(seq, head)
        if progress is not None:
            progress(head, head)
        while expected <= head and index.removed(index.position(expected)):
            i = index.position(expected)
            removed += index.events_in(i)
            expected = index.entry(i)[2] + index.events_in(i)
        if expected - 1 != head:
            raise IntegrityError(expected, "event missing at the end of the log")
        return NatsVerifyReport(
            stream=config.stream,
            url=config.url,
            events=head,
            messages=info.state.messages,
            refused_batches=store.stats.refused_batches,
            removed_events=removed,
            compactions=compactions,
            snapshot=snapshot,
            head_hash=prev.hex(),
            seconds=time.perf_counter() - t0,
            warnings=warnings,
        )
    finally:
        await store.close()


def _config_warnings(config: object) -> list[str]:
    out = []
    if not getattr(config, "deny_delete", False):
        out.append("the stream allows deleting messages (deny_delete off)")
    if getattr(config, "deny_purge", False):
        out.append("the stream denies purges: compaction is unavailable on it (docs/scale-out.md)")
    if getattr(config, "max_age", 0):
        out.append("the stream has a max_age: old events will expire and new instances fail")
    storage = getattr(config, "storage", "file")
    if str(getattr(storage, "value", storage)) != "file":
        out.append("the stream is in memory: a NATS restart loses it")
    if (getattr(config, "num_replicas", 1) or 1) < 3:
        out.append("the stream has fewer than 3 replicas: one NATS server's disk holds the log")
    return out
