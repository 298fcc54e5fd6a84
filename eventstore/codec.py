"""Encoding of events on disk (msgpack) and for operators (JSON Lines), built once.

This is the one place where stored shapes of old events would be upgraded (STYLE.md 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from eventstore.base import Envelope
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


encode_event: Callable[[BaseEvent], bytes] = _encoder.encode  # no wrapper: it is on the hot path


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
