"""The scale-out log: one NATS JetStream stream shared by any number of broker instances.

Layout. One JetStream stream (`[store] stream`; file storage, `replicas`, `max_age`, deny_delete,
deny_purge, direct get) captures the subjects `<prefix>.*` (`[store] subject_prefix`, default the
stream name). Each append is recorded as part of ONE JetStream message, a chunk
(`eventstore.nats_wire`), so a batch is atomic and ordered without a multi-message transaction,
which JetStream 2.9/2.10 does not have. While a publish waits for its PubAck, an instance gathers
the appends that arrive into the next chunk (group commit); they stay independent batches.
A chunk's subject is `<prefix>.<key stream>`, its `Nats-Msg-Id` its first event's id: a publish
retried after a timeout is stored once (within the stream's 2-minute duplicate window).

Numbering. There is no single writer, so a writer cannot know the seq its events will get.
Every instance consumes the whole stream in order with one background consumer (an ephemeral
push consumer it recreates after any gap, silence or reconnection, from the last applied
position) and DERIVES each event's `seq` (1 + the number of accepted events before it), its
`stream_version` and its `ts` (the JetStream store time, made non-decreasing). The same stream
gives every instance the same envelopes. Seqs are gap-free and identical everywhere only if
every message stays: the stream denies deletes and purges, `max_age` must stay 0 for a broker's
log (an instance refuses a stream whose first messages are gone), and nothing else may publish on
`<prefix>.*` (such messages are skipped alike by every instance and fail `broker verify`).
The fold is `eventstore.nats_index`; its index maps seqs back to stream messages (24 bytes per
accepted batch + 4 per event, in memory), and `read()` fetches the messages again (recent ones
from a 16 MiB cache, a few by direct get, many through a temporary consumer).

Optimistic concurrency, exact. A batch carries its expected versions; every instance checks
them at the batch's position in the stream against the versions derived so far, so a batch
whose expectation fails is refused by all alike (it stays in the stream as a refused batch and
gets no seq) and its writer gets ConcurrencyError. This holds for several streams at once.
In front of it, an append alone in its chunk with expectations on its key stream also sends
`Nats-Expected-Last-Subject-Sequence` (the last message on that subject as this instance knows
it), so the server turns most losers away before anything is stored; after such a refusal the
writer catches up to the winner and decides (ConcurrencyError, or publish again).

Read-your-writes: `append` returns once this instance's consumer has applied the chunk and
called the listeners (projections); another instance sees it a moment later. `head()` and
`stream_version()` answer from this instance's position. When NATS is unreachable, appends
raise StoreUnavailable at once (or after the publish deadline), everything already applied keeps
being served, and the consumer resumes by itself, without gap or duplicate, once NATS is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from msgspec import Raw
from nats.js import api

from eventstore.base import (
    ConcurrencyError,
    Envelope,
    ExpectedVersion,
    IntegrityError,
    Listener,
    StoreError,
    StoreUnavailable,
    resolve_expected,
    subscribe_via_listener,
    type_matcher,
)
from eventstore.codec import decode_event, encode_events
from eventstore.events import BaseEvent
from eventstore.nats_index import FeedStats, LogIndex, anchor_of
from eventstore.nats_tls import require_tls
from eventstore.nats_wire import (
    EXPECTED_LAST_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ,
    HEARTBEAT,
    MSG_ID,
    WRONG_LAST_SEQUENCE,
    BadChunk,
    StreamReader,
    WireBatch,
    WireEvent,
    chunk_id,
    consumer_config,
    decode_chunk,
    encode_chunk,
    is_delivery,
    parse_delivery,
    subject_token,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to reach NATS when opening
PUBLISH_TIMEOUT = 2.0  # one publish attempt
PUBLISH_DEADLINE = 5.0  # retries of one chunk (same message id) before StoreUnavailable
APPLY_TIMEOUT = 30.0  # an acknowledged chunk must reach our own consumer within this
MAX_GROUP_APPENDS = 1024  # appends gathered into one chunk
MAX_CHUNK_BYTES = 512 * 1024  # and their size (NATS' max_payload, 1 MiB by default, bounds it)
DIRECT_READ_MAX = 16  # reads touching at most this many chunks use direct gets
DUPLICATE_WINDOW = 120.0  # seconds JetStream remembers message ids


@dataclass(slots=True)
class _Append:
    """One pending append: its batch on the wire and the future of its caller."""

    batch: WireBatch
    size: int
    key_stream: str
    fut: asyncio.Future[list[Envelope]]
    use_header: bool = True
    attempts: int = 0


class NatsStore:
    """The EventStore protocol on a NATS JetStream stream (see the module docstring)."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        stream: str = "BROKER_EVENTS",
        *,
        subject_prefix: str = "",
        replicas: int = 1,
        max_age: float = 0.0,
        readonly: bool = False,
        tls: ssl.SSLContext | None = None,  # eventstore.nats_tls: TLS or no connection
    ) -> None:
        self.url = url
        self.tls = tls
        self.stream = stream
        self.prefix = subject_prefix or stream
        self.replicas = replicas
        self.max_age = max_age
        self.readonly = readonly
        self._nc: Any = None
        self._js: Any = None
        self._direct = True
        self._listeners: list[Listener] = []
        self._closing = False
        self._failure: BaseException | None = None
        self._connect_error: Exception | None = None
        self._index = LogIndex()  # the log as derived from the stream, as of `_index.applied`
        # Set before open() to start from a saved index (a snapshot's) instead of stream message
        # 1: (the saved index, its arrays, the anchor of its last message, its head). open()
        # checks it against the stream; when it cannot be used, `start_refused` says why.
        self.start_from: tuple[bytes, Mapping[str, bytes], bytes, int] | None = None
        self.start_refused = ""
        self.started_at = 0  # the stream message the saved index was at, once used
        # our consumer
        self._gen = 0
        self._dseq = 0
        self._sub: Any = None
        self._consumer: str | None = None
        self._reset_needed = True
        self._kick = asyncio.Event()
        self._last_activity = 0.0
        self._follower: asyncio.Task[None] | None = None
        self._progress: asyncio.Future[None] | None = None
        # writing
        self._pending: list[_Append] = []
        self._mine: dict[str, list[asyncio.Future[list[Envelope]]]] = {}
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ---

    async def open(self) -> None:
        self._closing = False
        try:
            self._nc = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            reason = str(exc) or f"no connection within {CONNECT_TIMEOUT:g} s"
            if self._connect_error is not None:  # e.g. a certificate that does not verify
                reason += f" (last error: {self._connect_error})"
            raise StoreUnavailable(f"cannot reach NATS at {self.url}: {reason}") from None
        if self.tls is not None:
            try:
                require_tls(self._nc, self.url)
            except StoreUnavailable:
                await self._nc.close()
                raise
        self._js = self._nc.jetstream(timeout=PUBLISH_TIMEOUT)
        try:
            info = await self._ensure_stream()
            state = info.state
            if state.last_seq and (state.first_seq > 1 or state.messages == 0):
                raise IntegrityError(
                    1,
                    f"the first messages of NATS stream {self.stream} are gone (first seq "
                    f"{state.first_seq}: max_age, a purge or a delete): event seqs cannot be "
                    "derived; restore the stream from an export",
                )
            if self.start_from is not None:
                await self._load_index(state.last_seq)
            self._follower = asyncio.create_task(self._follow(), name="nats-log-follower")
            self._kick.set()
            await self._wait_applied(state.last_seq, None)
        except BaseException:
            await self.close()
            raise
        if not self.readonly:
            self._writer = asyncio.create_task(self._write_loop(), name="nats-log-writer")

    async def _load_index(self, last_seq: int) -> None:
        """Start from `start_from` if it is this stream's: its last message must still be the
        one it was saved at (same subject and data: not another stream, nor a replaced one)."""
        data, arrays, anchor, head = self.start_from  # type: ignore[misc]
        self.start_from = None
        try:
            index = await asyncio.to_thread(LogIndex.load, data, arrays)
            if index.head != head:
                raise ValueError(f"its log index ends at seq {index.head}, the snapshot at {head}")
            if index.applied > last_seq:
                raise ValueError(
                    f"it covers stream message {index.applied}, the stream ends at {last_seq}"
                )
            if index.applied and await self.anchor(index.applied) != anchor:
                raise ValueError(
                    f"stream message {index.applied} is not the one it was taken at "
                    "(another stream, or the stream was replaced)"
                )
        except (ValueError, StoreError) as exc:
            self.start_refused = str(exc)
            log.warning("nats log: saved index not used, replaying the stream: %s", exc)
            return
        self._index, self.started_at = index, index.applied

    def save_index(self) -> tuple[bytes, Iterator[tuple[str, bytes]], int, int]:
        """The index as of now, for a snapshot (`LogIndex.save`: its scalars and maps, and its
        arrays' slices to take after), with the stream message and the event seq it is at.
        Synchronous: the cut of a snapshot."""
        saved, slices = self._index.save()
        return saved, slices, self._index.applied, self._index.head

    async def anchor(self, sseq: int) -> bytes | None:
        """What identifies stream message `sseq` (`nats_index.anchor_of`); None if it is gone."""
        try:
            msg = await self._js.get_msg(self.stream, seq=sseq, direct=self._direct)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as exc:
            raise StoreUnavailable(f"cannot read the NATS stream: {exc}") from None
        return anchor_of(msg.subject or "", msg.data or b"")

    async def _connect(self) -> Any:
        async def disconnected() -> None:
            log.warning("nats log: disconnected from %s", self.url)

        async def reconnected() -> None:
            log.warning("nats log: reconnected to %s", self.url)
            self._request_reset("reconnected")

        async def error(exc: Exception) -> None:
            self._connect_error = exc
            log.debug("nats log: connection error: %s", exc)

        name = f"broker {socket.gethostname()}:{os.getpid()} {self.stream}"
        return await nats.connect(
            self.url,
            name=name,
            connect_timeout=2,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            **({"tls": self.tls} if self.tls is not None else {}),
        )

    async def _ensure_stream(self) -> Any:
        subjects = [f"{self.prefix}.*"]
        try:
            info = await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            if self.readonly:
                raise StoreUnavailable(f"no NATS stream {self.stream} at {self.url}") from None
            config = api.StreamConfig(
                name=self.stream,
                description="fleet broker event log",
                subjects=subjects,
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=self.replicas,
                max_age=self.max_age or None,
                discard=api.DiscardPolicy.OLD,
                duplicate_window=DUPLICATE_WINDOW,
                deny_delete=True,
                deny_purge=True,
                allow_direct=True,
            )
            try:
                info = await self._js.add_stream(config)
            except nats.js.errors.BadRequestError:  # created meanwhile by another instance
                info = await self._js.stream_info(self.stream)
        if info.config.subjects != subjects:
            raise StoreUnavailable(
                f"NATS stream {self.stream} captures {info.config.subjects}, not {subjects}: "
                "set [store] subject_prefix to match, or use another stream"
            )
        self._direct = bool(info.config.allow_direct)
        return info

    async def close(self) -> None:
        """Publish what is pending, wait (briefly) for it to be applied, then disconnect."""
        self._closing = True
        if self._writer is not None:
            self._wakeup.set()
            with contextlib.suppress(Exception):
                await self._writer
            self._writer = None
        if self._mine and self._follower is not None and self._failure is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    while self._mine:
                        await self._next_progress()
        for futs in self._mine.values():
            _fail_futures(futs, StoreUnavailable("the log was closed"))
        self._mine.clear()
        self._kick.set()
        for task in [*self._tasks, self._follower]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(5.0):
                        await task
        self._follower = None
        _fail(self._pending, StoreUnavailable("the log was closed"))
        self._pending = []
        await self._drop_feed()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._nc.close()
            self._nc = None

    # --- writing ---

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
        fut: asyncio.Future[list[Envelope]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Append(WireBatch(expect, wire), size, key, fut))
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
            pending = [p for p in pending if not p.fut.done()]
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
        batches: list[WireBatch] = []
        encoded = encode_events([env.event for env in envelopes])
        for env, data in zip(envelopes, encoded, strict=True):  # a batch per run sharing a ts
            event = WireEvent(env.id, env.stream, env.type, Raw(data))
            if batches and batches[-1].ts == env.ts and len(batches[-1].events) < 1000:
                batches[-1].events.append(event)
            else:
                batches.append(WireBatch({}, [event], env.ts))
        for i in range(0, len(batches), 64):
            part = batches[i : i + 64]
            loop = asyncio.get_running_loop()
            futs: list[asyncio.Future[list[Envelope]]] = [loop.create_future() for _ in part]
            cid = chunk_id(part)
            self._mine[cid] = futs
            subject = f"{self.prefix}.{subject_token(part[0].events[0].stream)}"
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

    # --- the consumer: applies every message of the stream in order ---

    def _request_reset(self, reason: str) -> None:
        self._gen += 1  # messages of the current subscription are ignored from now on
        if not self._reset_needed:
            log.info("nats log: recreating the consumer (%s)", reason)
        self._reset_needed = True
        self._kick.set()

    async def _follow(self) -> None:
        backoff = 0.05
        while not self._closing or self._mine:
            if self._reset_needed and self._nc.is_connected:
                try:
                    await self._restart_feed()
                    backoff = 0.05
                except Exception as exc:
                    log.warning("nats log: cannot create the consumer: %s", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT):
                    await self._kick.wait()
            self._kick.clear()
            silent = time.monotonic() - self._last_activity > 3 * HEARTBEAT
            if not self._reset_needed and silent and self._nc.is_connected:
                self._request_reset("no heartbeat")

    async def _drop_feed(self) -> None:
        sub, consumer = self._sub, self._consumer
        self._sub = self._consumer = None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if consumer is not None and self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._js.delete_consumer(self.stream, consumer)

    async def _restart_feed(self) -> None:
        self._gen += 1
        gen = self._gen
        await self._drop_feed()
        inbox = self._nc.new_inbox()
        self._dseq = 0

        async def on_message(msg: Any) -> None:
            if gen == self._gen:
                await self._on_feed(msg)

        self._sub = await self._nc.subscribe(inbox, cb=on_message)
        config = consumer_config(api, inbox, self._index.applied + 1, "broker log follower")
        info = await self._js.add_consumer(self.stream, config=config)
        if gen != self._gen:  # a reset was requested meanwhile: the loop comes back
            return
        self._consumer = info.name
        self._reset_needed = False
        self._last_activity = time.monotonic()

    async def _on_feed(self, msg: Any) -> None:
        self._last_activity = time.monotonic()
        reply = msg.reply
        if not is_delivery(reply):
            if reply:  # flow control: everything before it has been applied
                await self._nc.publish(reply)
                return
            headers = msg.headers or {}
            last = headers.get("Nats-Last-Consumer")
            if last is not None and int(last) != self._dseq:
                self._request_reset(f"heartbeat says {last} delivered, we have {self._dseq}")
            stalled = headers.get("Nats-Consumer-Stalled")
            if stalled:
                await self._nc.publish(stalled)
            return
        sseq, dseq, ts_ns = parse_delivery(reply)
        if dseq != self._dseq + 1:
            self._request_reset(f"delivery {dseq} after {self._dseq}")
            return
        self._dseq = dseq
        if sseq <= self._index.applied or self._failure is not None:
            return
        try:
            self._apply(sseq, ts_ns, msg.subject, msg.data)
        except Exception as exc:  # an event this build cannot decode: stop, loudly
            self._failure = exc
            log.critical("nats log: cannot apply stream message %d: %s", sseq, exc)
            for futs in self._mine.values():
                _fail_futures(futs, StoreUnavailable(f"the log cannot be applied here: {exc}"))
            self._mine.clear()
            self._release_waiters()

    def _apply(self, sseq: int, ts_ns: int, subject: str, data: bytes) -> None:
        """Fold one stream message in (eventstore.nats_index), call the listeners with what it
        recorded, resolve the appends it holds."""
        cid, out, results = self._index.apply(sseq, ts_ns, subject, data, self._wants)
        if out:
            for listener in list(self._listeners):
                try:
                    listener(out)
                except Exception:
                    log.exception("log listener failed")
        futs = self._mine.pop(cid, None) if cid is not None else None
        if futs is not None:
            for fut, result in zip(futs, results, strict=False):
                if fut.done():
                    continue
                if isinstance(result, ConcurrencyError):
                    fut.set_exception(result)
                else:
                    fut.set_result(out[result[0] : result[1]])
        self._release_waiters()

    def _wants(self, cid: str) -> bool:
        """Envelopes are built for listeners and for our own appends only (not while catching
        up at open, before anyone listens)."""
        return bool(self._listeners) or cid in self._mine

    def _release_waiters(self) -> None:
        if self._progress is not None:
            if not self._progress.done():
                self._progress.set_result(None)
            self._progress = None

    async def _next_progress(self) -> None:
        if self._progress is None:
            self._progress = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._progress)

    async def _wait_applied(self, sseq: int, timeout: float | None) -> None:
        """Until the consumer has applied stream message `sseq` (TimeoutError past `timeout`)."""
        async with asyncio.timeout(timeout):
            while self._index.applied < sseq:
                if self._failure is not None:
                    raise StoreUnavailable(f"the log cannot be applied here: {self._failure}")
                await self._next_progress()

    # --- reading ---

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
                sseq, pos, seq, ts = index.entry(i)
                if chunk[0] != sseq:
                    data = index.cached(sseq)
                    if data is None:
                        if reader is None and index.batches_until(i, end) > DIRECT_READ_MAX:
                            reader = StreamReader(self._nc, self._js, api, self.stream, sseq)
                            await reader.start()
                        data = await (
                            self._direct_get(sseq) if reader is None else _skip_to(reader, sseq)
                        )
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

    async def _direct_get(self, sseq: int) -> bytes:
        try:
            msg = await self._js.get_msg(self.stream, seq=sseq, direct=self._direct)
        except nats.js.errors.NotFoundError:
            raise IntegrityError(self._index.head, f"stream message {sseq} is gone") from None
        except Exception as exc:
            raise StoreUnavailable(f"cannot read the NATS stream: {exc}") from None
        data: bytes = msg.data or b""
        return data

    def subscribe(
        self, from_seq: int = 1, max_buffer: int = 10_000
    ) -> AsyncGenerator[Envelope, None]:
        return subscribe_via_listener(self, from_seq, max_buffer)

    async def head(self) -> int:
        return self._index.head

    async def stream_version(self, stream: str) -> int:
        return self._index.versions.get(stream, 0)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def stats(self) -> FeedStats:
        """Refused batches, skipped and missing messages seen so far."""
        return self._index.stats

    # --- health ---

    async def health(self) -> dict[str, Any]:
        """The stream's state as NATS reports it, and this instance's position in it.
        `status` is "ok", "degraded" (NATS unreachable: writes refused, reads served) or
        "error" (this instance cannot apply the log)."""
        out: dict[str, Any] = {
            "stream": self.stream,
            "connected": bool(self._nc is not None and self._nc.is_connected),
            "head_seq": self._index.head,
            "applied_stream_seq": self._index.applied,
            "refused_batches": self._index.stats.refused_batches,
            "skipped_messages": self._index.stats.bad_messages,
            "missing_messages": self._index.stats.missing_messages,
        }
        if self._failure is not None:
            return {**out, "status": "error", "error": str(self._failure)}
        if not out["connected"]:
            return {**out, "status": "degraded", "error": f"NATS at {self.url} is unreachable"}
        try:
            async with asyncio.timeout(1.0):
                info = await self._js.stream_info(self.stream)
        except Exception as exc:
            return {**out, "status": "degraded", "error": f"stream info unavailable: {exc}"}
        state, config = info.state, info.config
        out.update(
            status="ok",
            stream_messages=state.messages,
            stream_bytes=state.bytes,
            stream_first_seq=state.first_seq,
            stream_last_seq=state.last_seq,
            lag_messages=max(0, state.last_seq - self._index.applied),
            replicas=config.num_replicas,
            storage=str(getattr(config.storage, "value", config.storage)),
        )
        if info.cluster is not None:
            out["cluster"] = {
                "name": info.cluster.name,
                "leader": info.cluster.leader,
                "replicas": [
                    {"name": p.name, "current": p.current, "offline": p.offline, "lag": p.lag}
                    for p in info.cluster.replicas or []
                ],
            }
        return out


def _envelope(seq: int, ev: WireEvent, version: int, ts: float) -> Envelope:
    try:
        event = decode_event(ev.data)  # type: ignore[arg-type]
    except Exception as exc:  # msgspec.DecodeError, ValidationError
        raise IntegrityError(seq, f"undecodable event: {exc}") from None
    return Envelope(seq, ev.stream, version, ts, ev.id, event)


async def _skip_to(reader: StreamReader, sseq: int) -> bytes:
    while True:
        got, _subject, data = await reader.next()
        if got == sseq:
            return data
        if got > sseq:
            raise IntegrityError(0, f"stream message {sseq} is gone")


def _fail(group: Sequence[_Append], exc: BaseException) -> None:
    _fail_futures([p.fut for p in group], exc)


def _fail_futures(futs: Sequence[asyncio.Future[list[Envelope]]], exc: BaseException) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_exception(exc)


def _last_seq_of(exc: Any) -> int | None:
    """The stream seq in "wrong last sequence: N"."""
    try:
        return int(str(exc.description).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
