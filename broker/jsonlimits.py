"""What a JSON document may hold that the log cannot store, caught at the edge.

msgspec decodes a JSON integer of any size into a Python int, and decoding fails with a
RecursionError on nesting past ~1,000 levels. The log encodes events as msgpack, whose integers
span -2^63 .. 2^64-1: a larger one in a free-form field (message content, metadata, metrics)
would only fail when its event is encoded. Every body and WebSocket frame is therefore checked
here, against the bytes first: a number that can be out of range has at least 19 digits, and a
search for such a run costs next to nothing, so only the rare document holding one is walked.
"""

from __future__ import annotations

from typing import Any

import msgspec

INT_MIN, INT_MAX = -(2**63), 2**64 - 1
_DIGITS_RUN = b"0" * 19  # a number that can be out of range has at least 19 digits
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))  # digit -> "0"


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


def may_hold_big_int(raw: bytes | str) -> bool:
    """False when the document cannot hold an integer outside the storable range: it has no
    run of 19 ASCII digits (a JSON number has no other digits). Every digit is mapped to "0"
    and the rest to " " (`bytes.translate`), then the run is searched as a substring: both in
    C, ~1 µs for a 400-byte body where a regular expression takes ~11 µs (it tries every
    position in Python's matcher)."""
    if isinstance(raw, str):  # UTF-8 keeps ASCII digits as they are, and adds no others
        raw = raw.encode("utf-8", "surrogatepass")
    return _DIGITS_RUN in raw.translate(_DIGITS_AS_ZERO)


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


def check_storable(value: Any, raw: bytes | str, path: str = "$") -> None:
    """Raise OutOfRange if `value`, decoded from `raw`, holds an integer the log cannot store."""
    if may_hold_big_int(raw):
        where = find_out_of_range(value, path)
        if where is not None:
            raise OutOfRange(where)
