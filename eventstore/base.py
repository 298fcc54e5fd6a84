"""The log's interface: the envelope, the `EventStore` protocol, its errors, and shared helpers.

Backends (`memory`, `sqlite`, later `nats`) implement `EventStore`; everything above the store
(projections, the broker) sees only this module.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import msgspec

from eventstore.events import BaseEvent


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """One recorded event and its place in the log."""

    seq: int  # global position, gap-free from 1
    stream: str  # what the event is about (node id, message id, user id...)
    stream_version: int  # position within the stream, from 1
    ts: float  # server time of append, seconds since the epoch, never decreasing
    id: str  # unique event id
    event: BaseEvent

    @property
    def type(self) -> str:
        return self.event.event_type


# --- errors: the store's own hierarchy (STYLE.md 11) ---


class StoreError(Exception):
    """Base class of every error the store raises."""


class ConcurrencyError(StoreError):
    """An append's expected stream version did not match: another writer got there first."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream!r} is at version {actual}, expected {expected}")
        self.stream = stream
        self.expected = expected
        self.actual = actual


class StoreUnavailable(StoreError):
    """The log cannot be written (disk error, lost connection, closed store)."""


class StoreLocked(StoreError):
    """Another process holds the log for writing."""


class IntegrityError(StoreError):
    """The stored log is damaged; `seq` is the first bad position."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"log integrity check failed at seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class EventNotEncodable(StoreError):
    """An event holds a value the log cannot encode (e.g. an integer outside msgpack's range);
    nothing of its append was recorded, and no other append is affected."""

    def __init__(self, event_type: str, reason: str, path: str = "") -> None:
        where = f" at {path}" if path else ""
        super().__init__(f"{event_type}: {reason}{where}")
        self.event_type = event_type
        self.reason = reason
        self.path = path


class SubscriberTooSlow(StoreError):
    """A live subscriber fell further behind than its buffer allows."""


ExpectedVersion = int | Mapping[str, int] | None
Listener = Callable[[Sequence[Envelope]], None]


@runtime_checkable
class EventStore(Protocol):
    """An append-only, totally ordered, durable log of events."""

    async def open(self) -> None:
        """Open the log (create it if absent) and make it ready for use."""

    async def close(self) -> None:
        """Flush pending work and release every resource; further calls raise StoreUnavailable."""

    async def append(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Envelope]:
        """Record `events` atomically, in order, and return their envelopes once durable.

        `expected_version` is an int (the version the stream of `events[0]` must be at; 0 means
        "the stream must not exist yet") or a mapping stream -> version. A mismatch raises
        `ConcurrencyError` and records nothing. Every listener has seen the envelopes before this
        returns.
        """

    def read(
        self, from_seq: int = 1, to_seq: int | None = None, types: Iterable[str] | None = None
    ) -> AsyncGenerator[Envelope, None]:
        """Iterate recorded events with from_seq <= seq <= to_seq, in seq order.

        `types` filters by type name; a name may use shell wildcards (`node.*`).
        """

    def subscribe(
        self, from_seq: int = 1, max_buffer: int = 10_000
    ) -> AsyncGenerator[Envelope, None]:
        """Iterate the history from `from_seq`, then live appends: no gap, no duplicate.

        A subscriber that falls `max_buffer` events behind the live log gets SubscriberTooSlow.
        """

    async def head(self) -> int:
        """The seq of the last recorded event (0 for an empty log)."""

    async def stream_version(self, stream: str) -> int:
        """The version of `stream` (0 if it has no events)."""

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(envelopes)` synchronously with every recorded batch, in seq order,
        before the append that recorded it returns."""

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling `listener`."""


def type_matcher(types: Iterable[str] | None) -> Callable[[str], bool] | None:
    """A predicate for type names and shell-style patterns (`node.*`), or None for "all"."""
    if types is None:
        return None
    exact: set[str] = set()
    patterns: list[str] = []
    for t in types:
        t = t.strip()
        if not t:
            continue
        if any(c in t for c in "*?["):
            patterns.append(t)
        else:
            exact.add(t)
    if not exact and not patterns:
        return None

    def match(name: str) -> bool:
        return name in exact or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return match


def resolve_expected(
    events: Sequence[BaseEvent], expected_version: ExpectedVersion
) -> Mapping[str, int]:
    if expected_version is None:
        return {}
    if isinstance(expected_version, int):
        if not events:
            return {}
        return {events[0].stream: expected_version}
    return expected_version


async def subscribe_via_listener(
    store: EventStore, from_seq: int, max_buffer: int
) -> AsyncGenerator[Envelope, None]:
    """History then live, for any store with `read` and `add_listener`.

    The listener is registered before the history is read, so an append racing the hand-over is
    either in the history or in the buffer; seqs at or below the last one yielded are skipped.
    """
    queue: asyncio.Queue[Envelope | None] = asyncio.Queue()
    overflow = False

    def on_append(batch: Sequence[Envelope]) -> None:
        nonlocal overflow
        if overflow:
            return
        if queue.qsize() + len(batch) > max_buffer:
            overflow = True
            queue.put_nowait(None)
            return
        for env in batch:
            queue.put_nowait(env)

    store.add_listener(on_append)
    try:
        last = from_seq - 1
        async for env in store.read(from_seq):
            yield env
            last = env.seq
        while True:
            item = await queue.get()
            if item is None:
                raise SubscriberTooSlow(f"subscriber fell more than {max_buffer} events behind")
            if item.seq <= last:
                continue
            if item.seq != last + 1:
                # Events between `last` and this one were recorded before the listener saw them
                # (e.g. while history was streaming): fetch them from the log.
                async for env in store.read(last + 1, item.seq - 1):
                    yield env
                    last = env.seq
            yield item
            last = item.seq
    finally:
        store.remove_listener(on_append)


class StoreConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `[store]` section of config.toml."""

    backend: str = "sqlite"  # sqlite | memory | nats
    path: str = "./data/events.db"
    synchronous: str = "FULL"  # SQLite's PRAGMA synchronous: FULL fsyncs every commit
    verify_on_open: bool = True  # recompute the whole hash chain before serving
    # nats backend (DESIGN.md §8)
    url: str = "nats://127.0.0.1:4222"
    stream: str = "BROKER_EVENTS"
    replicas: int = 1
    max_age: float = 0  # seconds; 0 keeps events forever
    subject_prefix: str = ""  # nats: the stream captures `<prefix>.*`; "" = the stream name
    # nats over TLS (eventstore.nats_tls): a tls:// url, the CA, a client certificate
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
