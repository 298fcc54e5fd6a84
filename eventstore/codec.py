"""Encoding of events on disk (msgpack) and for operators (JSON Lines), built once.

This is the one place where stored shapes of old events would be upgraded (STYLE.md 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from eventstore.base import Envelope, EventNotEncodable
from eventstore.events import BaseEvent, Event

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Event)
_json_encoder = msgspec.json.Encoder()


class JsonRecord(msgspec.Struct, kw_only=True):
    """One event as exported to JSON Lines (and accepted back by import)."""

    seq: int
    stream: str
    stream_version: int
    ts: float
    id: str
    type: str
    data: dict[str, Any]


_record_decoder = msgspec.json.Decoder(JsonRecord)


class GapRecord(msgspec.Struct, kw_only=True):
    """A run of seqs a compaction removed, as exported (`{"gap": {...}}` lines between the events
    of a compacted log): the kept event after it chains from `anchor` (hex), the chain hash of
    the last removed event; `compaction` is the seq of the `log.compacted` event that removed it."""

    first_seq: int
    last_seq: int
    anchor: str
    compaction: int


class _GapLine(msgspec.Struct):
    gap: GapRecord


_gap_decoder = msgspec.json.Decoder(_GapLine)
GAP_PREFIX = b'{"gap"'


def gap_to_json(first: int, last: int, anchor: bytes, compaction: int) -> bytes:
    return _json_encoder.encode(
        _GapLine(
            GapRecord(first_seq=first, last_seq=last, anchor=anchor.hex(), compaction=compaction)
        )
    )


def gap_from_json(line: bytes) -> GapRecord | None:
    """The gap a line of an export records, or None when the line is an event."""
    if not line.lstrip().startswith(GAP_PREFIX):
        return None
    return _gap_decoder.decode(line).gap


encode_event: Callable[[BaseEvent], bytes] = _encoder.encode  # no wrapper: it is on the hot path


def encode_events(events: Sequence[BaseEvent]) -> list[bytes]:
    """Each event's msgpack bytes; an event that cannot be encoded raises EventNotEncodable
    (naming the value's path, found only then: the happy path is one encode per event)."""
    try:
        return [_encoder.encode(event) for event in events]
    except Exception:  # msgspec raises OverflowError, TypeError, ValueError, EncodeError...
        for event in events:
            try:
                _encoder.encode(event)
            except Exception as exc:
                raise not_encodable(event, exc) from None
        raise


def not_encodable(event: BaseEvent, exc: BaseException) -> EventNotEncodable:
    """The error for `event`, whose encoding raised `exc`: the path of the offending value."""
    path, cause = _culprit(event, exc, [], 0)
    return EventNotEncodable(event.event_type, _reason(cause), path)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OverflowError):
        return "integer out of range"
    return str(exc) or type(exc).__name__


def _culprit(value: Any, exc: BaseException, path: list[str], depth: int) -> tuple[str, Any]:
    """The path of the innermost part of `value` that does not encode, and why (blocking, but
    only ever run on a value known not to encode)."""
    children: list[tuple[str, Any]] = []
    if isinstance(value, msgspec.Struct):
        children = [(f, getattr(value, f)) for f in value.__struct_fields__]
    elif isinstance(value, dict):
        for key, item in value.items():
            children.append((str(key), key))  # a key may be the culprit too
            children.append((str(key), item))
    elif isinstance(value, list | tuple | set | frozenset):
        children = [(f"[{i}]", item) for i, item in enumerate(value)]
    if depth < 64:
        for name, child in children:
            try:
                _encoder.encode(child)
            except Exception as inner:
                return _culprit(child, inner, [*path, name], depth + 1)
    return "".join(p if p.startswith("[") else "." + p for p in path).lstrip("."), exc


def decode_event(data: bytes) -> BaseEvent:
    event: BaseEvent = _decoder.decode(data)
    return event


def event_data(event: BaseEvent) -> dict[str, Any]:
    """The event's fields as plain JSON-able data, without the type tag."""
    data: dict[str, Any] = msgspec.to_builtins(event)
    data.pop("type", None)
    return data


def envelope_to_record(
    env: Envelope, data: Callable[[BaseEvent], dict[str, Any]] = event_data
) -> JsonRecord:
    """The envelope as a JSON record; `data` renders the event's fields (the API redacts
    secrets, the export keeps them)."""
    return JsonRecord(
        seq=env.seq,
        stream=env.stream,
        stream_version=env.stream_version,
        ts=env.ts,
        id=env.id,
        type=env.type,
        data=data(env.event),
    )


def envelope_to_json(env: Envelope) -> bytes:
    return _json_encoder.encode(envelope_to_record(env))


def record_from_json(line: bytes | str) -> JsonRecord:
    return _record_decoder.decode(line)


def event_from_record(record: JsonRecord) -> BaseEvent:
    event: BaseEvent = msgspec.convert({**record.data, "type": record.type}, Event)
    return event
