"""The operators' window on the log: pages of events, the live feed, and time travel.

Application functions over `EventStore` (no aiohttp here): `read_page` answers
GET /api/v1/events, `follow` drives the WebSocket and SSE feeds, `state_at` rebuilds one
projection as it was at a given seq. Secrets the log keeps as hashes (passwords, refresh tokens,
license keys) are redacted from everything shown to operators.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Literal, NamedTuple

import msgspec
import structlog

from broker import errors
from broker.config import DeliveryConfig
from broker.errors import NotFound, RateLimited, ValidationFailed
from eventstore.base import Envelope, EventStore, StoreError, SubscriberTooSlow, type_matcher
from eventstore.codec import JsonRecord, envelope_to_record, event_data
from eventstore.events import EVENT_TYPES, BaseEvent
from projections.base import Projection

log = structlog.get_logger(__name__)

# Fields that hold a hash of a secret: never shown through the API (the log keeps them, and so
# does `broker export` without --redact: they are what logins are checked against).
SECRET_FIELDS = frozenset({"password_hash", "token_hash", "key_hash"})
REDACTED = "[redacted]"
_SECRET_FIELDS_OF: dict[type[BaseEvent], tuple[str, ...]] = {
    cls: tuple(f for f in cls.__struct_fields__ if f in SECRET_FIELDS)
    for cls in EVENT_TYPES.values()
}

# `broker export --redact` goes further, for an export that leaves the operators' hands: it also
# drops key material (a node's public key) and every field named like a secret, at any depth
# (node metadata, message content, telemetry included).
_EXPORT_SECRET = re.compile(
    r"_hash$|password|passwd|secret|token|private_key|public_key|api_key|credential",
    re.IGNORECASE,
)


def is_export_secret(name: str) -> bool:
    """Whether `broker export --redact` replaces a field of this name (at any depth)."""
    return name in SECRET_FIELDS or _EXPORT_SECRET.search(name) is not None


EventRecord = JsonRecord  # one event as the API shows it (secrets redacted)


class EventsPage(msgspec.Struct, kw_only=True):
    """A page of the log. `total` counts the events of the seq range when no filter is given
    (null otherwise: counting filtered events would mean scanning the log). Follow
    `next_from_seq` (ascending) or `next_to_seq` (descending) for the next page."""

    total: int | None
    skip: int
    limit: int
    items: list[EventRecord]
    has_more: bool
    next_from_seq: int | None = None
    next_to_seq: int | None = None
    head: int = 0


def split_list(value: str | list[str] | None) -> list[str] | None:
    """`"a,b"` or `["a", "b,c"]` -> `["a", "b", "c"]`; None or empty -> None (no filter)."""
    if value is None:
        return None
    parts = value if isinstance(value, list) else [value]
    out = [p.strip() for part in parts for p in part.split(",") if p.strip()]
    return out or None


def redacted_data(event: BaseEvent) -> dict[str, Any]:
    """The event's fields as JSON-able data, secrets replaced by `[redacted]`."""
    data = event_data(event)
    for name in _SECRET_FIELDS_OF.get(type(event), ()):
        if data.get(name) is not None:
            data[name] = REDACTED
    return data


def to_record(env: Envelope) -> EventRecord:
    return envelope_to_record(env, redacted_data)


def export_redacted_data(event: BaseEvent) -> dict[str, Any]:
    """The event's fields for `broker export --redact`: every field `is_export_secret` names,
    at any depth, replaced by `[redacted]`."""
    return _redact(event_data(event), is_export_secret)


def holds_redacted(data: Any) -> bool:
    """Whether exported event data went through `--redact`: a field named like a secret reads
    `[redacted]` (such an export cannot be imported: the hashes logins need are gone)."""
    if isinstance(data, dict):
        return any(
            (v == REDACTED and is_export_secret(k)) or holds_redacted(v) for k, v in data.items()
        )
    if isinstance(data, list):
        return any(holds_redacted(v) for v in data)
    return False


# --- pages ---


async def read_page(
    store: EventStore,
    *,
    from_seq: int | None,
    to_seq: int | None,
    types: list[str] | None,
    streams: list[str] | None,
    skip: int,
    limit: int,
    order: Literal["asc", "desc"],
    scan_limit: int,
) -> EventsPage:
    """One page of the log between `from_seq` and `to_seq` (inclusive; default the whole log),
    filtered by type patterns and streams. At most `scan_limit` events are scanned: a sparse
    filter may return fewer than `limit` items with `has_more` and a cursor to go on from."""
    head = await store.head()
    low = max(1, from_seq or 1)
    high = head if to_seq is None else min(to_seq, head)
    stream_ok = type_matcher(streams)
    want = skip + limit + 1  # one more than shown: tells whether more exist
    found: list[Envelope] = []
    total = max(0, high - low + 1) if types is None and streams is None else None
    more_unscanned = False
    cursor: int | None = None  # first seq not scanned (asc) / last not scanned (desc)
    if order == "asc":
        end = min(high, low + scan_limit - 1)
        last = low - 1
        if low <= end:
            async with aclosing(store.read(low, end, types)) as events:
                async for env in events:
                    last = env.seq
                    if stream_ok is None or stream_ok(env.stream):
                        found.append(env)
                        if len(found) == want:
                            break
        scanned_to = last if len(found) == want else end
        more_unscanned = len(found) < want and end < high
        if len(found) == want:
            cursor = found[-1].seq
        else:
            cursor = max(scanned_to, low - 1) + 1
    else:
        hi, budget, window = high, scan_limit, max(want, 256)
        while hi >= low and len(found) < want and budget > 0:
            lo = max(low, hi - min(window, budget) + 1)
            batch = [
                env
                async for env in store.read(lo, hi, types)
                if stream_ok is None or stream_ok(env.stream)
            ]
            found.extend(reversed(batch))
            budget -= hi - lo + 1
            hi = lo - 1
            window *= 4
        if len(found) >= want:
            del found[want:]
            cursor = found[-1].seq
        elif hi >= low:
            more_unscanned = True
            cursor = hi
    items = found[skip : skip + limit]
    has_more = len(found) == want or more_unscanned
    return EventsPage(
        total=total,
        skip=skip,
        limit=limit,
        items=[to_record(env) for env in items],
        has_more=has_more,
        next_from_seq=cursor if order == "asc" else None,
        next_to_seq=cursor if order == "desc" and has_more else None,
        head=head,
    )


# --- the live feed ---


class CaughtUp(NamedTuple):
    """The history has been delivered up to `seq`, the head when the subscription started."""

    seq: int


async def follow(
    store: EventStore,
    from_seq: int | None,
    types: list[str] | None,
    streams: list[str] | None,
    max_buffer: int,
) -> AsyncGenerator[Envelope | CaughtUp, None]:
    """The events matching the filters from `from_seq` (None: only what comes next), then one
    `CaughtUp` marker, then live events: no gap, no duplicate. The history is read with the
    store's own type filter (no decoding of what is filtered out); live events come from
    `store.subscribe`, which raises SubscriberTooSlow past `max_buffer` undelivered events."""
    head = await store.head()
    start = head + 1 if from_seq is None else max(1, from_seq)
    stream_ok = type_matcher(streams)
    if start <= head:
        async with aclosing(store.read(start, head, types)) as history:
            async for env in history:
                if stream_ok is None or stream_ok(env.stream):
                    yield env
    yield CaughtUp(head)
    type_ok = type_matcher(types)
    async with aclosing(store.subscribe(max(start, head + 1), max_buffer)) as live:
        async for env in live:
            if (type_ok is None or type_ok(env.type)) and (
                stream_ok is None or stream_ok(env.stream)
            ):
                yield env


async def feed(
    store: EventStore,
    from_seq: int | None,
    types: list[str] | None,
    streams: list[str] | None,
    max_buffer: int,
    write: Callable[[Envelope | CaughtUp], Awaitable[None]],
) -> None:
    """The one follower of both feeds (WebSocket and Server-Sent Events): `follow` the log and
    `write` every item, each front with its own frames, until cancelled. Raises the catalog's
    error that ends a feed: SlowConsumer when it falls `max_buffer` events behind the log,
    Unavailable when the log cannot be read. What `write` raises (a timeout: the consumer does
    not read; a ConnectionError: it went away) goes through as it is."""
    items = follow(store, from_seq, types, streams, max_buffer)
    try:
        async with aclosing(items):
            async for item in items:
                await write(item)
    except SubscriberTooSlow as exc:
        raise errors.SlowConsumer("the feed fell too far behind the log") from exc
    except StoreError as exc:
        log.warning("feed_failed", error=str(exc))
        raise errors.Unavailable("the log cannot be read") from exc


class EventFrame(msgspec.Struct, kw_only=True, tag="event", tag_field="type"):
    """`{"type": "event", ...}`: one event pushed by the feed (WebSocket and SSE)."""

    seq: int
    event: str
    stream: str
    stream_version: int
    ts: float
    id: str
    data: dict[str, Any]


class CaughtUpFrame(msgspec.Struct, kw_only=True, tag="caught_up", tag_field="type"):
    """`{"type": "caught_up", "seq": N}`: the history up to N has been sent; live events follow."""

    seq: int


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class ErrorFrame(msgspec.Struct, tag="error", tag_field="type"):
    """`{"type": "error", "error": {"code", "message"}}`: the error that ends a feed, its last
    frame (WebSocket) or `data:` (Server-Sent Events)."""

    error: ErrorBody


_frame_encoder = msgspec.json.Encoder()


def encode_error(err: errors.BrokerError) -> bytes:
    return _frame_encoder.encode(ErrorFrame(ErrorBody(err.code, err.message)))


def encode_frame(item: Envelope | CaughtUp) -> bytes:
    """The JSON frame of an event or of the caught-up marker."""
    if isinstance(item, CaughtUp):
        return _frame_encoder.encode(CaughtUpFrame(seq=item.seq))
    return _frame_encoder.encode(
        EventFrame(
            seq=item.seq,
            event=item.type,
            stream=item.stream,
            stream_version=item.stream_version,
            ts=item.ts,
            id=item.id,
            data=redacted_data(item.event),
        )
    )


class Feeds:
    """The open feeds (WebSocket and SSE) of an application: closed at shutdown, so that a
    follower does not hold the server's shutdown for its whole grace period."""

    def __init__(self) -> None:
        self.stoppers: set[Callable[[], Awaitable[None]]] = set()
        # Each open feed's "check your credential again now": called when a credential may have
        # been revoked (broker.services.apikeys), so a revoked key or token ends its feeds at once.
        self.rechecks: set[Callable[[], None]] = set()
        self.closing = False

    def credentials_changed(self) -> None:
        for recheck in list(self.rechecks):
            recheck()

    async def close_all(self) -> None:
        self.closing = True
        await asyncio.gather(*(stop() for stop in list(self.stoppers)), return_exceptions=True)


# --- time travel ---


class ProjectionState(msgspec.Struct, kw_only=True):
    """A projection rebuilt from the first `at_seq` events of the log."""

    projection: str
    at_seq: int
    head: int
    events_applied: int
    state: Any


class Rebuilt(NamedTuple):
    part: Projection
    at_seq: int
    head: int
    applied: int  # events fed to it


class Rebuilder:
    """Rebuilds projections as they were at a seq, one at a time, off the serving path: it
    reads the log in windows and yields to the event loop between them."""

    def __init__(
        self,
        build: Callable[[], dict[str, Projection]],
        window: int = 16_384,
    ) -> None:
        self.build = build
        self.window = window
        self.running = False

    @classmethod
    def for_config(cls, delivery: DeliveryConfig, window: int) -> Rebuilder:
        from broker.runtime import build_projections

        return cls(lambda: build_projections(delivery).parts, window)

    def names(self) -> list[str]:
        return list(self.build())

    async def state_at(self, store: EventStore, name: str, at_seq: int | None) -> ProjectionState:
        """Projection `name` after the events 1..at_seq (default: the head), as JSON-able data.
        429 while another rebuild runs."""
        rebuilt = await self.rebuild(store, name, at_seq)
        return ProjectionState(
            projection=name,
            at_seq=rebuilt.at_seq,
            head=rebuilt.head,
            events_applied=rebuilt.applied,
            state=jsonable(rebuilt.part.state()),
        )

    async def rebuild(self, store: EventStore, name: str, at_seq: int | None) -> Rebuilt:
        """A fresh projection `name` fed the events 1..at_seq (default: the head). 404 for an
        unknown name, 422 past the head, 429 while another rebuild runs."""
        parts = self.build()
        part = parts.get(name)
        if part is None:
            raise NotFound(
                f"Projection not found: {name} (one of: {', '.join(parts)})",
                details=[{"field": "projection", "allowed": list(parts)}],
            )
        head = await store.head()
        if at_seq is None:
            at_seq = head
        if at_seq > head:
            raise ValidationFailed(
                f"at_seq {at_seq} is beyond the head of the log ({head})",
                details=[{"field": "at_seq", "head": head}],
            )
        if self.running:
            raise RateLimited(
                "another state rebuild is running; retry shortly", headers={"Retry-After": "1"}
            )
        self.running = True
        try:
            applied = await self._replay(store, part, at_seq)
        finally:
            self.running = False
        return Rebuilt(part=part, at_seq=at_seq, head=head, applied=applied)

    async def _replay(self, store: EventStore, part: Projection, at_seq: int) -> int:
        handlers = part.handlers()
        types = [cls.type_name() for cls in handlers]
        applied = 0
        pos = 1
        while pos <= at_seq and types:
            end = min(at_seq, pos + self.window - 1)
            async with aclosing(store.read(pos, end, types)) as events:
                async for env in events:
                    handlers[type(env.event)](env)
                    applied += 1
            pos = end + 1
            await asyncio.sleep(0)  # let requests in between two windows
        return applied


# --- projection state -> JSON ---


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, deque):
        return list(obj)
    if callable(obj):
        return None
    raise NotImplementedError(f"cannot show objects of type {type(obj).__name__}")


def _key(key: Any) -> str:
    if isinstance(key, tuple):
        return "/".join(str(k) for k in key)
    return str(key)


def _plain(obj: Any) -> Any:
    """A slower walk for what `to_builtins` refuses (tuple dict keys): plain containers only."""
    if isinstance(obj, dict):
        return {_key(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset | deque):
        return [_plain(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, msgspec.Struct):
        return {f: _plain(getattr(obj, f)) for f in obj.__struct_fields__}
    return obj


def _redact(obj: Any, secret: Callable[[str], bool] = SECRET_FIELDS.__contains__) -> Any:
    """`obj` (JSON-able builtins) with the value of every key `secret` names replaced, in place."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and secret(k) and v is not None:
                obj[k] = REDACTED
            else:
                _redact(v, secret)
    elif isinstance(obj, list):
        for v in obj:
            _redact(v, secret)
    return obj


def jsonable(state: object) -> Any:
    """A projection's `state()` as JSON-able builtins, secrets redacted."""
    try:
        data = msgspec.to_builtins(state, str_keys=True, enc_hook=_enc_hook)
    except TypeError:
        data = msgspec.to_builtins(_plain(state), str_keys=True, enc_hook=_enc_hook)
    return _redact(data)
