"""Per-event checksum and hash chain: each event's hash covers the previous event's hash.

`broker verify` and start-up recompute the chain; a flipped bit, a removed or a reordered event
breaks it at the first bad seq.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

GENESIS = bytes(32)
_header = struct.Struct(">qqd")


def checksum(data: bytes) -> int:
    """CRC-32 of an event's encoded body, checked on every read."""
    return zlib.crc32(data)


def chain_hash(
    prev: bytes, seq: int, stream: str, stream_version: int, ts: float, event_id: str, data: bytes
) -> bytes:
    """SHA-256 over the previous hash, the envelope fields and the encoded event."""
    h = hashlib.sha256(prev)
    h.update(_header.pack(seq, stream_version, ts))
    h.update(event_id.encode())
    h.update(b"\x00")
    h.update(stream.encode())
    h.update(b"\x00")
    h.update(data)
    return h.digest()
