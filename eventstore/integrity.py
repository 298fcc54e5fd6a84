"""The hash chain: each event's SHA-256 covers the previous event's hash, its envelope fields and
its encoded bytes, so a flipped bit, a removed or a reordered event breaks the chain at the first
bad seq. A CRC-32 over each stored chunk catches damage cheaply on every read.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from hashlib import sha256

GENESIS = bytes(32)
header = struct.Struct(">qqd").pack  # seq, stream_version, ts


def checksum(data: bytes) -> int:
    """CRC-32 of stored bytes, checked on every read."""
    return zlib.crc32(data)


def chain_hash(
    prev: bytes, seq: int, stream: str, stream_version: int, ts: float, event_id: str, data: bytes
) -> bytes:
    """SHA-256 over the previous hash, the envelope fields and the encoded event."""
    return sha256(
        b"".join(
            (
                prev,
                header(seq, stream_version, ts),
                event_id.encode(),
                b"\0",
                stream.encode(),
                b"\0",
                data,
            )
        )
    ).digest()


_gap_record = struct.Struct(">qq").pack


def anchors_digest(gaps: Iterable[tuple[int, int, bytes]]) -> str:
    """SHA-256 (hex) of a compaction's gap records in order, each (first seq, last seq, anchor:
    the chain hash of its last removed event): what its `log.compacted` event says of them."""
    h = sha256()
    for first, last, anchor in gaps:
        h.update(_gap_record(first, last))
        h.update(anchor)
    return h.hexdigest()
