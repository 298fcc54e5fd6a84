"""The consumer of the NATS log (eventstore.nats): applies every message of the stream in order.

One ephemeral push consumer, recreated after any gap, silence or reconnection from the last
applied position (a gap in the stream seqs too: the server may pass over messages, see
`_on_feed`), feeds `LogIndex.apply` (eventstore.nats_index); each applied message calls
the listeners and resolves this instance's appends it holds (read-your-writes).

A mixin of `NatsStore`, which owns the connection and the lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from nats.js import api

from eventstore.base import ConcurrencyError, Envelope, Listener, StoreUnavailable
from eventstore.nats_index import LogIndex
from eventstore.nats_wire import HEARTBEAT, consumer_config, is_delivery, parse_delivery

log = logging.getLogger("eventstore.nats")


class Follower:
    """The consumer (see the module doc)."""

    stream: str
    _nc: Any
    _js: Any
    _index: LogIndex
    _listeners: list[Listener]
    _closing: bool
    _failure: BaseException | None
    _gen: int
    _dseq: int
    _sub: Any
    _consumer: str | None
    _reset_needed: bool
    _kick: asyncio.Event
    _last_activity: float
    _progress: asyncio.Future[None] | None
    # the futures of this instance's appends, by chunk id, until the consumer applies the chunk
    _mine: dict[str, list[asyncio.Future[list[Envelope]]]]

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
        if sseq != self._index.applied + 1 and dseq > 1:
            # nats-server before 2.10 moves every consumer of a stream past a purge of one
            # subject (to that subject's first message left, or the stream's end), passing over
            # messages it had not delivered yet (a compaction's purge does that to every
            # instance's consumer): ask again from the next one. Only a consumer's first
            # delivery, from where it was asked to start, says messages are gone.
            self._request_reset(f"stream message {sseq} delivered after {self._index.applied}")
            return
        try:
            self._apply(sseq, ts_ns, msg.subject, msg.data)
        except Exception as exc:  # an event this build cannot decode: stop, loudly
            self._failure = exc
            log.critical("nats log: cannot apply stream message %d: %s", sseq, exc)
            for futs in self._mine.values():
                fail_futures(futs, StoreUnavailable(f"the log cannot be applied here: {exc}"))
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


def fail_futures(futs: Sequence[asyncio.Future[list[Envelope]]], exc: BaseException) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_exception(exc)
