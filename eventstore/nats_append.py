"""The writing side of the NATS log (eventstore.nats): group commit into chunk messages.

`append` queues its batch; one writer task gathers what is pending into a chunk (at most
MAX_GROUP_APPENDS appends, MAX_CHUNK_BYTES) and publishes it, retrying the same message id until
PUBLISH_DEADLINE. The consumer (eventstore.nats_follow) resolves the appends when it applies the
chunk: their seqs exist only then. An append alone in its chunk with expectations on its key
stream also sends the subject's expected last sequence; after such a refusal the writer catches
up to the winner and decides (ConcurrencyError, or publish again). Removable appends (all events
of one `nats_wire.REMOVABLE` type, no expectation) are gathered apart, into chunks on that type's
own subject, which a compaction may purge (eventstore.nats_compact). `restore` writes
already-recorded envelopes as they are (`broker import`).

A mixin of `NatsStore`, which owns the connection and the lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from msgspec import Raw

from eventstore.base import (
    ConcurrencyError,
    Envelope,
    ExpectedVersion,
    IntegrityError,
    StoreError,
    StoreUnavailable,
    resolve_expected,
)
from eventstore.codec import encode_events
from eventstore.events import BaseEvent
from eventstore.nats_follow import Follower, fail_futures
from eventstore.nats_wire import (
    EXPECTED_LAST_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID,
    WRONG_LAST_SEQUENCE,
    WireBatch,
    WireEvent,
    chunk_id,
    class_of_type,
    encode_chunk,
    removable_subject,
    subject_token,
)

log = logging.getLogger("eventstore.nats")

PUBLISH_TIMEOUT = 2.0  # one publish attempt
PUBLISH_DEADLINE = 5.0  # retries of one chunk (same message id) before StoreUnavailable
APPLY_TIMEOUT = 30.0  # an acknowledged chunk must reach our own consumer within this
MAX_GROUP_APPENDS = 1024  # appends gathered into one chunk
MAX_CHUNK_BYTES = 512 * 1024  # and their size (NATS' max_payload, 1 MiB by default, bounds it)


@dataclass(slots=True)
class _Append:
    """One pending append: its batch on the wire and the future of its caller."""

    batch: WireBatch
    size: int
    key_stream: str
    fut: asyncio.Future[list[Envelope]]
    use_header: bool = True
    attempts: int = 0
    klass: int = 0  # removable class (nats_wire.REMOVABLE), 0 for the main subjects


class Writer(Follower):
    """Appends and imports (see the module doc)."""

    url: str
    prefix: str
    _pending: list[_Append]
    _wakeup: asyncio.Event
    _writer: asyncio.Task[None] | None
    _tasks: set[asyncio.Task[None]]

    async def append(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Envelope]:
        self._check_writable()
        if not events:
            return []
        expect = dict(resolve_expected(events, expected_version))
        for stream, want in expect.items():
            have = self._index.versions.get(stream, 0)
            if have > want:  # versions only grow: refused whatever happened since
                raise ConcurrencyError(stream, want, have)
        encoded = encode_events(events)  # raises EventNotEncodable: nothing sent
        ids = os.urandom(16 * len(events)).hex()
        wire: list[WireEvent] = []
        size = 64 + sum(len(s) + 12 for s in expect)
        for i, (event, data) in enumerate(zip(events, encoded, strict=True)):
            stream = event.stream
            size += len(data) + len(stream) + 48
            wire.append(WireEvent(ids[32 * i : 32 * i + 32], stream, event.event_type, Raw(data)))
        key = wire[0].stream
        if expect and key not in expect:  # the key stream: an expected one that has events here
            streams = {e.stream for e in wire}
            key = next((s for s in expect if s in streams), key)
        klass = 0 if expect else class_of_type(wire[0].type)
        if klass and any(e.type != wire[0].type for e in wire):
            klass = 0
        fut: asyncio.Future[list[Envelope]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Append(WireBatch(expect, wire), size, key, fut, klass=klass))
        self._wakeup.set()
        try:
            async with asyncio.timeout(PUBLISH_DEADLINE + APPLY_TIMEOUT):
                return await fut
        except TimeoutError:
            raise StoreUnavailable(
                "the append was sent to NATS but this instance has not applied it yet"
            ) from None

    def _check_writable(self) -> None:
        if self._writer is None or self._closing:
            raise StoreUnavailable("the log is not open for writing")
        if self._failure is not None:
            raise StoreUnavailable(f"the log cannot be applied here: {self._failure}")
        if not self._nc.is_connected:
            raise StoreUnavailable(f"NATS at {self.url} is unreachable")

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            pending, self._pending = self._pending, []
            by_class: dict[int, list[_Append]] = {}
            for p in pending:
                if not p.fut.done():
                    by_class.setdefault(p.klass, []).append(p)
            for pending in by_class.values():  # a chunk holds appends of one class
                while pending:
                    group, pending = self._take_group(pending)
                    try:
                        await self._publish_group(group)
                    except Exception as exc:  # never let the writer die: fail this group only
                        log.exception("nats log: publish failed")
                        _fail(group, StoreUnavailable(f"the log could not be written: {exc}"))
            if self._closing and not self._pending:
                return

    def _take_group(self, pending: list[_Append]) -> tuple[list[_Append], list[_Append]]:
        limit = min(self._nc.max_payload, MAX_CHUNK_BYTES)
        size = 0
        for n, p in enumerate(pending):
            if n and (n >= MAX_GROUP_APPENDS or size + p.size > limit):
                return pending[:n], pending[n:]
            size += p.size
        return pending, []

    async def _publish_group(self, group: list[_Append]) -> None:
        batches = [p.batch for p in group]
        body = encode_chunk(batches)
        if len(body) > self._nc.max_payload - 1024:  # the size estimate was short
            if len(group) > 1:
                half = len(group) // 2
                await self._publish_group(group[:half])
                await self._publish_group(group[half:])
            else:
                _fail(group, StoreError(f"an append of {len(body)} bytes exceeds NATS max_payload"))
            return
        klass = group[0].klass
        if klass:
            subject = removable_subject(self.prefix, klass)
        else:
            subject = f"{self.prefix}.{subject_token(group[0].key_stream)}"
        cid = chunk_id(batches)
        headers = {MSG_ID: cid}
        single = group[0]
        if len(group) == 1 and single.use_header and single.key_stream in single.batch.expect:
            headers[EXPECTED_LAST_SUBJECT_SEQ] = str(self._index.subject_seq.get(subject, 0))
        self._mine[cid] = [p.fut for p in group]
        try:
            await self._publish(subject, body, headers)
        except nats.js.errors.APIError as exc:
            self._mine.pop(cid, None)
            if exc.err_code == WRONG_LAST_SEQUENCE and EXPECTED_LAST_SUBJECT_SEQ in headers:
                self._spawn(self._after_wrong_last(single, _last_seq_of(exc)))
            else:
                _fail(group, StoreUnavailable(f"NATS refused the append: {exc.description}"))
        except StoreUnavailable as exc:
            self._mine.pop(cid, None)
            _fail(group, exc)
        # else: our consumer resolves the futures when it applies the chunk

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> Any:
        """Publish with retries of the same message id until PUBLISH_DEADLINE."""
        deadline = time.monotonic() + PUBLISH_DEADLINE
        while True:
            if self._nc is None or not self._nc.is_connected:
                raise StoreUnavailable(f"NATS at {self.url} is unreachable")
            try:
                return await self._js.publish(
                    subject, body, timeout=PUBLISH_TIMEOUT, headers=headers
                )
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
                if time.monotonic() + 0.05 >= deadline:
                    raise StoreUnavailable(f"NATS did not acknowledge the append: {exc}") from None
                await asyncio.sleep(0.05)
            except nats.js.errors.APIError as exc:
                if exc.err_code is None or (exc.code or 0) >= 500:
                    if time.monotonic() + 0.05 >= deadline:
                        raise StoreUnavailable(f"NATS refused the append: {exc}") from None
                    await asyncio.sleep(0.05)
                    continue
                raise
            except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
                raise StoreUnavailable(f"NATS at {self.url} is unreachable: {exc}") from None

    async def _after_wrong_last(self, p: _Append, last: int | None) -> None:
        """The server refused `p` because its subject moved on: catch up, then decide."""
        if last is not None:
            try:
                await self._wait_applied(last, PUBLISH_DEADLINE)
            except (TimeoutError, StoreUnavailable):
                last = None
            except asyncio.CancelledError:
                if not p.fut.done():
                    p.fut.set_exception(StoreUnavailable("the log was closed"))
                raise
        if p.fut.done():
            return
        for stream, want in p.batch.expect.items():
            have = self._index.versions.get(stream, 0)
            if have > want:
                p.fut.set_exception(ConcurrencyError(stream, want, have))
                return
        p.attempts += 1
        p.use_header = last is not None and p.attempts < 3  # else the consumers decide alone
        if self._closing:
            p.fut.set_exception(StoreUnavailable("the log was closed"))
            return
        self._pending.append(p)
        self._wakeup.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def restore(self, envelopes: Sequence[Envelope]) -> None:
        """Write already-recorded envelopes as they are (seq, ts, id kept): for `broker import`.

        They must continue the log exactly; each chunk is published with the stream's expected
        last sequence, so no other writer can interleave."""
        self._check_writable()
        if not envelopes:
            return
        overlay: dict[str, int] = {}
        seq = self._index.head
        for env in envelopes:
            seq += 1
            if env.seq != seq:
                raise IntegrityError(seq, f"import out of order: got seq {env.seq}")
            version = overlay.get(env.stream, self._index.versions.get(env.stream, 0)) + 1
            if env.stream_version != version:
                raise IntegrityError(
                    env.seq,
                    f"stream {env.stream!r} at version {env.stream_version}, expected {version}",
                )
            overlay[env.stream] = version
        # a batch per run sharing a ts and a removable class; a chunk per run of one class
        batches: list[tuple[int, WireBatch]] = []
        encoded = encode_events([env.event for env in envelopes])
        for env, data in zip(envelopes, encoded, strict=True):
            event = WireEvent(env.id, env.stream, env.type, Raw(data))
            klass = class_of_type(env.type)
            last = batches[-1] if batches else None
            if last and last[0] == klass and last[1].ts == env.ts and len(last[1].events) < 1000:
                last[1].events.append(event)
            else:
                batches.append((klass, WireBatch({}, [event], env.ts)))
        chunks: list[tuple[int, list[WireBatch]]] = []
        for klass, batch in batches:  # spanning an hour at most: a purge's granularity
            last_chunk = chunks[-1] if chunks else None
            if (
                last_chunk
                and last_chunk[0] == klass
                and len(last_chunk[1]) < 64
                and batch.ts - last_chunk[1][0].ts <= 3600
            ):
                last_chunk[1].append(batch)
            else:
                chunks.append((klass, [batch]))
        for klass, part in chunks:
            loop = asyncio.get_running_loop()
            futs: list[asyncio.Future[list[Envelope]]] = [loop.create_future() for _ in part]
            cid = chunk_id(part)
            self._mine[cid] = futs
            subject = (
                removable_subject(self.prefix, klass)
                if klass
                else f"{self.prefix}.{subject_token(part[0].events[0].stream)}"
            )
            headers = {MSG_ID: cid, EXPECTED_LAST_SEQ: str(self._index.applied)}
            try:
                await self._publish(subject, encode_chunk(part), headers)
            except nats.js.errors.APIError as exc:
                self._mine.pop(cid, None)
                raise StoreUnavailable(f"import refused (another writer?): {exc}") from None
            except BaseException:
                self._mine.pop(cid, None)
                raise
            async with asyncio.timeout(APPLY_TIMEOUT):
                await asyncio.gather(*futs)

    def _fail_pending(self, exc: BaseException) -> None:
        """Fail every append still waiting for the writer (the log is closing)."""
        _fail(self._pending, exc)
        self._pending = []


def _fail(group: Sequence[_Append], exc: BaseException) -> None:
    fail_futures([p.fut for p in group], exc)


def _last_seq_of(exc: Any) -> int | None:
    """The stream seq in "wrong last sequence: N"."""
    try:
        return int(str(exc.description).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
