"""What a JSON document may hold that the log cannot store, caught at the edge.

msgspec decodes a JSON integer of any size into a Python int, and decoding fails with a
RecursionError on nesting past ~1,000 levels. The log encodes events as msgpack, whose integers
span -2^63 .. 2^64-1: a larger one in a free-form field (message content, metadata, metrics)
would only fail when its event is encoded. Every body and WebSocket op is therefore checked
here once decoded, by encoding it as msgpack (C, about a microsecond for a message of a few
hundred bytes, and the encoder refuses exactly those integers); only the rare value that fails
is walked, to name where. (A regular expression over the text for runs of 19 digits did the
screening before: ~25 µs for a 400-byte frame, more than decoding it.)
"""

from __future__ import annotations

from typing import Any

import msgspec

INT_MIN, INT_MAX = -(2**63), 2**64 - 1
_msgpack = msgspec.msgpack.Encoder()


class OutOfRange(ValueError):
    """A value the log cannot store; `path` is where it is (`$.metrics.cpu`)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"integer out of range at {path} (integers must lie in {INT_MIN}..{INT_MAX})"
        )
        self.path = path


def decode(decoder: Any, raw: bytes | str) -> Any:
    """`decoder.decode(raw)`, with nesting past what the decoder can follow reported as the
    DecodeError it is (msgspec raises RecursionError), so every caller's handling of malformed
    JSON covers it."""
    try:
        return decoder.decode(raw)
    except RecursionError:
        raise msgspec.DecodeError("JSON nested too deeply") from None


def storable(value: Any) -> bool:
    """Whether every integer in `value` (decoded JSON: dicts, lists, scalars, Structs of them)
    lies in INT_MIN..INT_MAX."""
    try:
        _msgpack.encode(value)
    except OverflowError:
        return False
    except RecursionError:  # nested deeper than the encoder follows: walk it
        return find_out_of_range(value) is None
    return True


def _children(value: Any, path: str) -> list[tuple[Any, str]]:
    if isinstance(value, dict):
        return [(v, f"{path}.{k}") for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, msgspec.Struct):
        names = value.__struct_fields__
        wire = value.__struct_encode_fields__  # the names the client sent (renames applied)
        return [(getattr(value, n), f"{path}.{w}") for n, w in zip(names, wire, strict=True)]
    return []


def find_out_of_range(value: Any, path: str = "$") -> str | None:
    """The path of the first integer outside INT_MIN..INT_MAX in `value`, or None. Iterative:
    a document nested as deep as the decoder allows is walked without recursion."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                return where
            continue
        stack.extend(reversed(_children(item, where)))
    return None


def check_storable(value: Any, path: str = "$") -> None:
    """Raise OutOfRange if `value` holds an integer the log cannot store."""
    if not storable(value):
        where = find_out_of_range(value, path)
        if where is not None:
            raise OutOfRange(where)
