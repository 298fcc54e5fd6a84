"""The log as every instance derives it from the NATS stream (see eventstore.nats).

`LogIndex.apply` folds the stream's messages, in stream order, into event seqs, stream versions
and times, checks each batch's expected versions at its place, and keeps the index that maps seqs
back to stream messages. No I/O, no asyncio, no clock: the same messages give every instance the
same envelopes.

After a compaction (eventstore.nats_compact) some messages of the removable subjects are purged:
each batch's removable class is kept in the index (from its message's subject), and the
`log.compacted` events folded in say, per class, below which stream message everything of it is
removed (`purged`). Those batches keep their seqs and versions (an index that has seen them, a
snapshot's, knows them) but `removed(i)` says they are gone. A message missing from the stream
cannot be folded: seqs could not be derived as every other instance did, so `apply` refuses a
gap (IntegrityError): an instance on a compacted stream starts from a snapshot that covers the
purge (broker.upkeep.snapshot_store).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import msgspec

from eventstore.base import ConcurrencyError, Envelope, IntegrityError
from eventstore.codec import decode_event
from eventstore.nats_wire import BadChunk, chunk_id, class_of_subject, class_of_type, decode_chunk

log = logging.getLogger("eventstore.nats")

CACHE_BYTES = 16 * 1024 * 1024  # recent chunk messages kept for reads
SAVE_SLICE = 128 * 1024  # array items copied in one step when saving (1 MiB of int64)
_SUB_BITS = 16  # index key = stream seq << 16 | removable class << 12 | position in its chunk
_CLASS_SHIFT = 12
_POS_MASK = (1 << _CLASS_SHIFT) - 1  # a chunk holds at most 1024 batches (nats_append)
_CLASS_MASK = (1 << _SUB_BITS) - 1 - _POS_MASK
COMPACTED = "log.compacted"

# per batch of a message: the ConcurrencyError that refused it, or (start, end) of its events
# in the envelopes `apply` returns
BatchResult = ConcurrencyError | tuple[int, int]


@dataclass(slots=True)
class FeedStats:
    """What the stream held beyond accepted batches (reported by health and verify)."""

    refused_batches: int = 0
    bad_messages: int = 0  # foreign or damaged messages on our subjects, skipped
    missing_messages: int = 0  # stream seqs that never arrived (deleted or lost)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (event seq, reason), first 20

    def problem(self, seq: int, reason: str) -> None:
        log.error("nats log: %s (at event seq %d)", reason, seq)
        if len(self.problems) < 20:
            self.problems.append((seq, reason))


class SavedIndex(msgspec.Struct, kw_only=True):
    """A LogIndex as of stream message `applied`, as a snapshot carries it (`LogIndex.save`):
    everything but its arrays, which are saved apart, in slices (`LogIndex.slices`), up to
    their `lengths` at that point."""

    layout: str  # byte order and item sizes of the arrays
    applied: int
    head: int
    last_ts: float
    versions: dict[str, int]
    subject_seq: dict[str, int]
    refused_batches: int
    bad_messages: int
    missing_messages: int
    problems: list[tuple[int, str]]
    lengths: dict[str, int]  # array name -> items
    purged: dict[int, int] = {}  # removable class -> stream seq below which it is purged
    last_compaction: int = 0  # the seq of the newest log.compacted event (0: none)


_saved_decoder = msgspec.msgpack.Decoder(SavedIndex)
_saved_encoder = msgspec.msgpack.Encoder()


def _layout() -> str:
    sizes = "".join(f"{t}{array(t).itemsize}" for t in "qdI")  # type: ignore[call-overload]
    return f"{sys.byteorder}:{sizes}"


def anchor_of(subject: str, data: bytes) -> bytes:
    """What identifies a stream message: SHA-256 of its subject and data (a chunk's events carry
    random ids, so another stream's message at the same seq does not match)."""
    return hashlib.sha256(subject.encode() + b"\0" + data).digest()


class LogIndex:
    """Derived state of the log, as of stream message `applied`."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.applied = 0  # last stream message folded in
        self.head = 0  # last event seq
        self.last_ts = 0.0
        self.versions: dict[str, int] = {}
        self.subject_seq: dict[str, int] = {}  # subject -> stream seq of its last message
        self.stats = FeedStats()
        self.purged: dict[int, int] = {}  # removable class -> purged below this stream seq
        self.last_compaction = 0  # the seq of the newest log.compacted event (0: none)
        self._key = array("q")  # per accepted batch: stream seq << 16 | class << 12 | position
        self._first = array("q")  # its first event seq
        self._ts = array("d")  # its ts
        self._version = array("I")  # per event: its stream version
        self._cache: dict[int, bytes] = {}
        self._cache_order: deque[int] = deque()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes

    def apply(
        self, sseq: int, ts_ns: int, subject: str, data: bytes, wants: Callable[[str], bool]
    ) -> tuple[str | None, list[Envelope], list[BatchResult]]:
        """Fold stream message `sseq` (stored at `ts_ns`) in. Returns its chunk id (None for a
        skipped message), the envelopes of its accepted batches (built, decoding every event,
        only when `wants(chunk id)`), and one result per batch. Raises if an event that must be
        built does not decode (a newer broker wrote it)."""
        if sseq != self.applied + 1:
            raise IntegrityError(
                self.head + 1,
                f"stream messages {self.applied + 1}..{sseq - 1} are gone (purged by a compaction,"
                " deleted or expired): the seqs after them cannot be derived without a snapshot "
                "that covers them (docs/scale-out.md, compaction)",
            )
        self.applied = sseq
        self.subject_seq[subject] = sseq
        try:
            batches = decode_chunk(data)
        except BadChunk as exc:
            self.stats.bad_messages += 1
            self.stats.problem(self.head + 1, f"stream message {sseq} skipped: {exc}")
            return None, [], []
        cid = chunk_id(batches)
        build = wants(cid)
        klass = class_of_subject(subject) << _CLASS_SHIFT
        refused_before = self.stats.refused_batches
        store_ts = ts_ns / 1e9
        versions = self.versions
        out: list[Envelope] = []
        results: list[BatchResult] = []
        for pos, batch in enumerate(batches):
            conflict = None
            for stream, want in batch.expect.items():
                have = versions.get(stream, 0)
                if have != want:
                    conflict = ConcurrencyError(stream, want, have)
                    break
            if conflict is not None:
                self.stats.refused_batches += 1
                results.append(conflict)
                continue
            ts = batch.ts or store_ts
            if ts < self.last_ts:
                ts = self.last_ts
            self.last_ts = ts
            self._key.append(sseq << _SUB_BITS | klass | (pos & _POS_MASK))
            self._first.append(self.head + 1)
            self._ts.append(ts)
            start = len(out)
            for ev in batch.events:
                version = versions[ev.stream] = versions.get(ev.stream, 0) + 1
                self._version.append(version)
                self.head += 1
                if ev.type == COMPACTED:
                    self._compacted(ev.data)
                    self.last_compaction = self.head
                if build:
                    event = decode_event(ev.data)  # type: ignore[arg-type]
                    out.append(Envelope(self.head, ev.stream, version, ts, ev.id, event))
            results.append((start, len(out)))
        if len(results) > self.stats.refused_batches - refused_before:  # holds events
            self._remember(sseq, data)
        return cid, out, results

    def _compacted(self, data: bytes) -> None:
        """A `log.compacted` event: its purge bounds (NATS) from now on."""
        for event_type, bound in getattr(decode_event(data), "purged", {}).items():
            klass = class_of_type(event_type)
            if klass and bound > self.purged.get(klass, 0):
                self.purged[klass] = bound

    # --- saved with a snapshot ---

    def _arrays(self) -> dict[str, array]:  # type: ignore[type-arg]
        return {"key": self._key, "first": self._first, "ts": self._ts, "version": self._version}

    def save(self) -> tuple[bytes, Iterator[tuple[str, bytes]]]:
        """The index as of `applied` (the cache is not saved), and the slices of its arrays up
        to there. Call it where nothing is applied meanwhile; the slices may be taken later, a
        few at a time, while the index grows: the arrays only ever grow."""
        stats = self.stats
        arrays = self._arrays()
        lengths = {name: len(arr) for name, arr in arrays.items()}
        saved = SavedIndex(
            layout=_layout(),
            applied=self.applied,
            head=self.head,
            last_ts=self.last_ts,
            versions=self.versions,
            subject_seq=self.subject_seq,
            refused_batches=stats.refused_batches,
            bad_messages=stats.bad_messages,
            missing_messages=stats.missing_messages,
            problems=stats.problems,
            lengths=lengths,
            purged=self.purged,
            last_compaction=self.last_compaction,
        )

        def slices() -> Iterator[tuple[str, bytes]]:
            for name, arr in arrays.items():
                for i in range(0, lengths[name], SAVE_SLICE):
                    yield name, arr[i : min(i + SAVE_SLICE, lengths[name])].tobytes()

        return _saved_encoder.encode(saved), slices()

    @classmethod
    def load(
        cls, data: bytes, arrays: Mapping[str, bytes], cache_bytes: int = CACHE_BYTES
    ) -> LogIndex:
        """An index saved by `save` (`arrays`: its slices joined, by name); ValueError if it is
        not one this build can use."""
        try:
            saved = _saved_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise ValueError(f"the saved log index is unreadable: {exc}") from None
        if saved.layout != _layout():
            raise ValueError(f"the saved log index has layout {saved.layout}, not {_layout()}")
        index = cls(cache_bytes)
        index.applied, index.head, index.last_ts = saved.applied, saved.head, saved.last_ts
        index.versions, index.subject_seq = saved.versions, saved.subject_seq
        index.purged = dict(saved.purged)
        index.last_compaction = saved.last_compaction
        index.stats = FeedStats(
            saved.refused_batches,
            saved.bad_messages,
            saved.missing_messages,
            [(seq, reason) for seq, reason in saved.problems],
        )
        for name, arr in index._arrays().items():
            raw = arrays.get(name, b"")
            if len(raw) != saved.lengths.get(name, -1) * arr.itemsize:
                raise ValueError(f"the saved log index is damaged (array {name})")
            arr.frombytes(raw)
        batches = len(index._key)
        if len(index._first) != batches or len(index._ts) != batches:
            raise ValueError("the saved log index is damaged (batch arrays differ)")
        if len(index._version) != index.head or index.applied < 0:
            raise ValueError("the saved log index is damaged (events and head differ)")
        if batches and (
            index._first[-1] > index.head or index._key[-1] >> _SUB_BITS > saved.applied
        ):
            raise ValueError("the saved log index is damaged (past its head)")
        return index

    # --- the index: event seq -> (stream message, batch) ---

    def __len__(self) -> int:
        """Number of accepted batches."""
        return len(self._key)

    def position(self, seq: int) -> int:
        """Index of the batch holding event `seq` (or the first one)."""
        return max(0, bisect_right(self._first, seq) - 1)

    def batch_of_message(self, sseq: int, hi: int) -> int:
        """Index of the first batch (below `hi`) of stream message `sseq` or after it."""
        return bisect_left(self._key, sseq << _SUB_BITS, 0, hi)

    def batch_at_time(self, ts: float, hi: int) -> int:
        """Index of the first batch (below `hi`) whose time is `ts` or later (times never
        decrease)."""
        return bisect_left(self._ts, ts, 0, hi)

    def batches_until(self, i: int, seq: int) -> int:
        """How many batches from index `i` hold events up to `seq`."""
        return bisect_right(self._first, seq) - i

    def entry(self, i: int) -> tuple[int, int, int, float]:
        """(stream seq, position in its chunk, first event seq, ts) of batch `i`."""
        key = self._key[i]
        return key >> _SUB_BITS, key & _POS_MASK, self._first[i], self._ts[i]

    def klass(self, i: int) -> int:
        """The removable class of batch `i` (nats_wire.REMOVABLE; 0: a main subject's)."""
        return (self._key[i] & _CLASS_MASK) >> _CLASS_SHIFT

    def removed(self, i: int) -> bool:
        """Whether batch `i` was removed by a compaction (its message purged, or to be)."""
        key = self._key[i]
        klass = (key & _CLASS_MASK) >> _CLASS_SHIFT
        return klass != 0 and key >> _SUB_BITS < self.purged.get(klass, 0)

    def events_in(self, i: int) -> int:
        """Number of events of batch `i`."""
        end = self._first[i + 1] if i + 1 < len(self._first) else self.head + 1
        return end - self._first[i]

    def version_of(self, seq: int) -> int:
        """The stream version of event `seq`."""
        return self._version[seq - 1]

    # --- recent messages, for reads ---

    def cached(self, sseq: int) -> bytes | None:
        return self._cache.get(sseq)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_order.clear()
        self._cache_bytes = 0

    def _remember(self, sseq: int, data: bytes) -> None:
        self._cache[sseq] = data
        self._cache_order.append(sseq)
        self._cache_bytes += len(data)
        while self._cache_bytes > self._cache_limit and len(self._cache_order) > 1:
            old = self._cache_order.popleft()
            self._cache_bytes -= len(self._cache.pop(old))
