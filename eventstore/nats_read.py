"""The reading side of the NATS log (eventstore.nats): events fetched again from the stream.

The consumer's index (eventstore.nats_index) maps each seq to its stream message and position;
`read_stored` takes recent messages from the index's cache, a few by direct get, and many
(more than DIRECT_READ_MAX chunks) through a temporary consumer (`nats_wire.StreamReader`).
Batches a compaction removed (`LogIndex.removed`) are passed over without being fetched: their
seqs are gaps, as on a compacted SQLite log. A message of a kept batch that is gone is an
IntegrityError naming the batch's first seq; one the temporary consumer passed over is asked for
by direct get before that is said (nats-server before 2.10 moves every consumer of a stream past
a purge of one subject, undelivered messages of other subjects included).

A mixin of `NatsStore`, which owns the connection and the lifecycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import nats.js.errors
from nats.js import api

from eventstore.base import Envelope, IntegrityError, StoreUnavailable, type_matcher
from eventstore.codec import decode_event
from eventstore.nats_index import LogIndex
from eventstore.nats_wire import BadChunk, StreamReader, WireBatch, WireEvent, decode_chunk

DIRECT_READ_MAX = 16  # reads touching at most this many chunks use direct gets


class Reader:
    """Reads (see the module doc)."""

    stream: str
    _nc: Any
    _js: Any
    _direct: bool
    _index: LogIndex

    async def read(
        self, from_seq: int = 1, to_seq: int | None = None, types: Iterable[str] | None = None
    ) -> AsyncGenerator[Envelope, None]:
        """Events from the index built by the consumer, up to this instance's head when the
        iteration ends (it follows the head while it reads, so a caller that registers a
        listener right after the loop misses nothing)."""
        match = type_matcher(types)
        async with contextlib.aclosing(self.read_stored(from_seq, to_seq)) as stored:
            async for seq, ev, version, ts in stored:
                if match is None or match(ev.type):
                    yield _envelope(seq, ev, version, ts)

    async def read_stored(
        self, from_seq: int = 1, to_seq: int | None = None
    ) -> AsyncGenerator[tuple[int, WireEvent, int, float], None]:
        """(seq, event as stored, stream version, ts) in seq order: `read` without decoding."""
        if self._nc is None:
            raise StoreUnavailable("the log is not open")
        index = self._index
        next_seq = max(from_seq, 1)
        i = index.position(next_seq)
        reader: StreamReader | None = None
        chunk: tuple[int, list[WireBatch]] = (0, [])
        try:
            while True:
                end = index.head if to_seq is None else min(to_seq, index.head)
                if next_seq > end or i >= len(index):
                    if reader is None:
                        return  # without awaiting since the check: nothing slipped in
                    await reader.close()
                    reader = None
                    continue
                if index.removed(i):
                    i += 1
                    continue
                sseq, pos, seq, ts = index.entry(i)
                if chunk[0] != sseq:
                    data = index.cached(sseq)
                    if data is None:
                        if reader is None and index.batches_until(i, end) > DIRECT_READ_MAX:
                            reader = StreamReader(self._nc, self._js, api, self.stream, sseq)
                            await reader.start()
                        found = None if reader is None else await _skip_to(reader, sseq)
                        if found is None and reader is not None:
                            # the reader passed it (a purge elsewhere moved its consumer, as
                            # nats-server before 2.10 does): ask for it alone, then go on anew
                            await reader.close()
                            reader = None
                        data = found if found is not None else await self._direct_get(sseq, seq)
                    try:
                        chunk = (sseq, decode_chunk(data))
                    except BadChunk as exc:
                        raise IntegrityError(seq, str(exc)) from None
                for ev in chunk[1][pos].events:
                    if seq > end:
                        break
                    if seq >= next_seq:
                        next_seq = seq + 1
                        yield seq, ev, index.version_of(seq), ts
                    seq += 1
                i += 1
        finally:
            if reader is not None:
                await reader.close()

    async def _direct_get(self, sseq: int, seq: int) -> bytes:
        try:
            msg = await self._js.get_msg(self.stream, seq=sseq, direct=self._direct)
        except nats.js.errors.NotFoundError:
            raise IntegrityError(seq, _gone(sseq)) from None
        except Exception as exc:
            raise StoreUnavailable(f"cannot read the NATS stream: {exc}") from None
        data: bytes = msg.data or b""
        return data


def _envelope(seq: int, ev: WireEvent, version: int, ts: float) -> Envelope:
    try:
        event = decode_event(ev.data)  # type: ignore[arg-type]
    except Exception as exc:  # msgspec.DecodeError, ValidationError
        raise IntegrityError(seq, f"undecodable event: {exc}") from None
    return Envelope(seq, ev.stream, version, ts, ev.id, event)


def _gone(sseq: int) -> str:
    return f"stream message {sseq} is gone, and no compaction recorded its removal"


async def _skip_to(reader: StreamReader, sseq: int) -> bytes | None:
    """Stream message `sseq`'s data from `reader`, passing over earlier ones (of removed
    batches); None when the reader delivered a later one first."""
    while True:
        got, _subject, data = await reader.next()
        if got == sseq:
            return data
        if got > sseq:
            return None
