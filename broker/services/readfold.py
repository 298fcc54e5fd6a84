"""Acks of single pushes, folded into the next send's append.

A node that acks each push in a frame of its own (seed-style) cost a commit per ack: the group
commit takes whatever is pending when it wakes, and at a few thousand messages a second an ack
and the next send seldom meet there, so a message took two commits (its send's, its ack's),
each with its hand-off to the writer thread, its fsync and its pass of the listeners. Here such
an ack's read waits, at most FOLD_WAIT, for the next send this instance records
(`Messaging.record_send`, `NodeOps.record_batch`) and goes in that send's append, as a batched
frame's acks go with its sends. If no send comes in time, the reads are recorded on their own;
if the send's append fails (a racing retry, a value the log cannot store, the log unavailable),
they are recorded on their own then, and only their own failure is theirs.

The ack's `ok` still follows durability: the future `read` returns is done once the append
holding its read event is on disk (and applied), never before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from eventstore.base import Envelope, ExpectedVersion
from eventstore.events import BaseEvent, MessageRead, MessagesRead

FOLD_WAIT = 0.002  # seconds a read waits for a send to go with (at 2,000 sends/s: 0.5 ms apart)


class Recorder(Protocol):
    """The runtime, as the fold sees it."""

    async def record(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Envelope]:
        """Append `events`, apply them, and return their envelopes once durable."""
        ...


class _Reads:
    """Reads taken from the fold: their events and who waits for them."""

    __slots__ = ("events", "waiting")

    def __init__(self, events: list[BaseEvent], waiting: list[asyncio.Future[None]]) -> None:
        self.events = events
        self.waiting = waiting

    def settle(self, exc: BaseException | None) -> None:
        for fut in self.waiting:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)


class ReadFold:
    """Reads (node, message) waiting for the next send's append."""

    def __init__(self, runtime: Recorder, wait: float = FOLD_WAIT) -> None:
        self.runtime = runtime
        self.wait = wait
        self._reads: dict[str, dict[str, None]] = {}  # node -> its message ids, once each
        self._waiting: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.folded = 0  # reads that went in a send's append (for tests and benchmarks)
        self.alone = 0  # appends of reads on their own

    def read(self, node_id: str, message_id: str) -> asyncio.Future[None]:
        """Record that the node read the message: the future is done once the read is durable
        (or failed with the log's error)."""
        loop = asyncio.get_running_loop()
        if self._timer is None:
            self._timer = loop.call_later(self.wait, self._record_pending)
        self._reads.setdefault(node_id, {})[message_id] = None
        fut: asyncio.Future[None] = loop.create_future()
        self._waiting.append(fut)
        return fut

    async def append(
        self, events: Sequence[BaseEvent], expected: ExpectedVersion = None
    ) -> list[Envelope]:
        """Append a send's `events` with the reads waiting (after them, so an int `expected`
        still names the send's stream); the envelopes of `events` come back."""
        reads = self._take()
        if reads is None:
            return await self.runtime.record(events, expected)
        try:
            envs = await self.runtime.record([*events, *reads.events], expected)
        except BaseException:
            self._spawn(reads)  # the send's failure is not theirs: on their own
            raise
        self.folded += len(reads.waiting)
        reads.settle(None)
        return envs[: len(events)]

    async def drain(self) -> None:
        """Record the reads waiting now, and wait for every append of reads in progress."""
        self._record_pending()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _take(self) -> _Reads | None:
        if not self._waiting:
            return None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events: list[BaseEvent] = []
        for node_id, ids in self._reads.items():
            if len(ids) == 1:
                events.append(MessageRead(message_id=next(iter(ids)), node_id=node_id, via="ws"))
            else:  # one event for the node's reads, not one per message
                events.append(MessagesRead(node_id=node_id, message_ids=list(ids)))
        reads = _Reads(events, self._waiting)
        self._reads, self._waiting = {}, []
        return reads

    def _record_pending(self) -> None:
        self._timer = None
        reads = self._take()
        if reads is not None:
            self._spawn(reads)

    def _spawn(self, reads: _Reads) -> None:
        task = asyncio.create_task(self._record_alone(reads))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_alone(self, reads: _Reads) -> None:
        self.alone += 1
        try:
            await self.runtime.record(reads.events, None)
        except Exception as exc:
            reads.settle(exc)
        else:
            reads.settle(None)
