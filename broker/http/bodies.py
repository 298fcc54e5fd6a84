"""Helpers shared by the handlers: JSON bodies in and out, and the error body of DESIGN.md §6."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from broker.errors import BadRequest, BrokerError, PayloadTooLarge, ValidationFailed
from broker.jsonlimits import OutOfRange, check_storable, decode

if TYPE_CHECKING:
    from broker.http.routing import Call
from eventstore.timestamps import iso

T = TypeVar("T")

_json = msgspec.json.Encoder()


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_json.encode(data), status=status, content_type="application/json", headers=headers
    )


def error_body(status: int, code: str, message: str, details: list[Any], request_id: str) -> bytes:
    now = iso(time.time())
    return _json.encode(
        {
            "status": "error",
            "statusCode": status,
            "message": message,
            "error": {
                "code": code,
                "message": message,
                "details": details,
                "timestamp": now,
                "request_id": request_id,
            },
        }
    )


def error_response(err: BrokerError, request_id: str) -> web.Response:
    return web.Response(
        body=error_body(err.status, err.code, err.message, err.details, request_id),
        status=err.status,
        content_type="application/json",
        headers=err.headers,
    )


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    return value


async def decode_body(request: Call, type_: type[T]) -> T:
    """Read and validate a JSON body as `type_`: 400/422 on bad input, 413 when too large."""
    try:
        raw = await read_body(request)
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(exc.text or "request body too large") from None
    return decode_json(raw or b"{}", type_)


async def read_body(request: Call) -> bytes:
    """The request's body, as `request.read()` gives it. A small body has usually arrived whole
    with its headers: then it is taken from the buffer at once (one call) instead of through
    `read()`'s loop of awaited chunks; otherwise, or past `client_max_size` (its 413), `read()`.
    (A handler reads its body once, through here.)"""
    content = request.content
    if (
        content.is_eof()  # all of it has arrived
        and not content.at_eof()  # and is still there to read
        and content.total_bytes <= (request.client_max_size or content.total_bytes)
    ):
        return content.read_nowait()
    return await request.read()


async def read_form(request: web.Request) -> dict[str, str]:
    """The text fields of a form body (urlencoded or multipart); 400 when it cannot be parsed
    (a multipart body without or with the wrong boundary, bytes that are not UTF-8)."""
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(exc.text or "request body too large") from None
    except (ValueError, AssertionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"malformed form body: {exc}") from None
    return {k: v for k, v in form.items() if isinstance(v, str)}


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_any_json = msgspec.json.Decoder()


def _decoder_for(type_: Any) -> msgspec.json.Decoder[Any]:
    """A decoder per body type, built on first use (STYLE.md 3)."""
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder


def decode_json(raw: bytes | str, type_: type[T]) -> T:
    """Decode and validate `raw` as `type_`; every way it can be bad is a ValidationFailed
    (malformed, wrong shape, nested too deeply, an integer the log cannot store)."""
    try:
        value: T = decode(_decoder_for(type_), raw)
    except msgspec.ValidationError as exc:
        try:  # JSON Schema reads 2.0 as the integer 2: so do we, for an `int` field
            value = msgspec.convert(_whole_floats_as_ints(decode(_any_json, raw)), type_)
        except msgspec.MsgspecError:  # still invalid, or not JSON past a valid first value
            raise ValidationFailed(str(exc), details=[{"reason": str(exc)}]) from None
    except msgspec.DecodeError as exc:
        raise ValidationFailed(f"malformed JSON body: {exc}") from None
    try:
        check_storable(value)
    except OutOfRange as exc:
        raise ValidationFailed(
            str(exc), details=[{"field": exc.path, "reason": str(exc)}]
        ) from None
    return value
