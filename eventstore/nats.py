"""The scale-out log: one NATS JetStream stream shared by any number of broker instances.

Layout. One JetStream stream (`[store] stream`; file storage, `replicas`, `max_age`, deny_delete,
direct get; purges allowed, for compaction only: eventstore.nats_compact) captures the subjects
`<prefix>.*` (`[store] subject_prefix`, default the stream name). Each append is recorded as
part of ONE JetStream message, a chunk (`eventstore.nats_wire`), so a batch is atomic and ordered
without a multi-message transaction, which JetStream 2.9/2.10 does not have. While a publish
waits for its PubAck, an instance gathers the appends that arrive into the next chunk (group
commit); they stay independent batches. A chunk's subject is `<prefix>.<key stream>` (removable
events: `<prefix>.=<type>`), its `Nats-Msg-Id` its first event's id: a publish retried after a
timeout is stored once (within the stream's 2-minute duplicate window).

Numbering. There is no single writer, so a writer cannot know the seq its events will get.
Every instance consumes the whole stream in order with one background consumer (an ephemeral
push consumer it recreates after any gap, silence or reconnection, from the last applied
position) and DERIVES each event's `seq` (1 + the number of accepted events before it), its
`stream_version` and its `ts` (the JetStream store time, made non-decreasing). The same stream
gives every instance the same envelopes. Seqs are identical everywhere only if every message an
instance folds is there: the stream denies deletes, `max_age` must stay 0 for a broker's log, a
compaction purges only what the newest snapshot's index covers (eventstore.nats_compact), an
instance refuses a stream with messages gone after the point it starts from, and nothing else
may publish on `<prefix>.*` (such messages are skipped alike by every instance and fail `broker
verify`).
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
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from eventstore.base import (
    Envelope,
    IntegrityError,
    Listener,
    StoreError,
    StoreUnavailable,
    subscribe_via_listener,
)
from eventstore.nats_append import PUBLISH_TIMEOUT, Writer
from eventstore.nats_compact import Compacting
from eventstore.nats_follow import fail_futures
from eventstore.nats_index import FeedStats, LogIndex, anchor_of
from eventstore.nats_read import Reader
from eventstore.nats_tls import require_tls

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to reach NATS when opening
DUPLICATE_WINDOW = 120.0  # seconds JetStream remembers message ids


class NatsStore(Writer, Reader, Compacting):
    """The EventStore protocol on a NATS JetStream stream (see the module docstring): the
    lifecycle here, the writer in eventstore.nats_append, the consumer in eventstore.nats_follow,
    reads in eventstore.nats_read, compaction's purges in eventstore.nats_compact."""

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
        self._nc = None
        self._js = None
        self._direct = True
        self._listeners = []
        self._closing = False
        self._failure = None
        self._connect_error: Exception | None = None
        self._index = LogIndex()  # the log as derived from the stream, as of `_index.applied`
        # Set before open() to start from a saved index (a snapshot's) instead of stream message
        # 1: (the saved index, its arrays, the anchor of its last message, its head). open()
        # checks it against the stream; when it cannot be used, `start_refused` says why.
        self.start_from: tuple[bytes, Mapping[str, bytes], bytes, int] | None = None
        self.start_refused = ""
        # Or set this: called at open() to set `start_from` (broker.upkeep.snapshot_store's
        # index_from: the newest snapshot's, which a compacted stream's seqs need)
        self.before_open: Callable[[NatsStore], Awaitable[object]] | None = None
        self.started_at = 0  # the stream message the saved index was at, once used
        # our consumer
        self._gen = 0
        self._dseq = 0
        self._sub = None
        self._consumer = None
        self._reset_needed = True
        self._kick = asyncio.Event()
        self._last_activity = 0.0
        self._follower: asyncio.Task[None] | None = None
        self._progress = None
        # writing
        self._pending = []
        self._mine = {}
        self._wakeup = asyncio.Event()
        self._writer = None
        self._tasks = set()

    # --- lifecycle ---

    async def open(self) -> None:
        self._closing = False
        if self.before_open is not None and self.start_from is None:
            await self.before_open(self)
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
            if self.start_from is not None:
                await self._load_index(state.last_seq)
            start = self._index.applied + 1
            if state.last_seq >= start and (state.first_seq > start or state.messages == 0):
                raise IntegrityError(
                    self._index.head + 1,
                    f"stream messages {start}..{state.first_seq - 1} of NATS stream "
                    f"{self.stream} are gone (first seq {state.first_seq}: max_age, a purge or "
                    "a delete): event seqs cannot be derived from there; start from a snapshot "
                    "that covers them, or restore the stream from an export",
                )
            self._follower = asyncio.create_task(self._follow(), name="nats-log-follower")
            self._kick.set()
            try:
                await self._wait_applied(state.last_seq, None)
            except StoreUnavailable:
                if isinstance(self._failure, IntegrityError):  # messages gone on the way
                    raise self._failure from None
                raise
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
                deny_purge=False,  # a compaction purges removable subjects (nats_compact)
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
            fail_futures(futs, StoreUnavailable("the log was closed"))
        self._mine.clear()
        self._kick.set()
        for task in [*self._tasks, self._follower]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(5.0):
                        await task
        self._follower = None
        self._fail_pending(StoreUnavailable("the log was closed"))
        await self._drop_feed()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._nc.close()
            self._nc = None

    # --- position and listeners (reads: eventstore.nats_read) ---

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
