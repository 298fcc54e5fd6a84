"""Heartbeats over the node WebSocket, recorded together: one append per loop tick for every
connection's heartbeat frames, and one write of answers per connection.

A fleet heartbeats all the time, one op per frame (30 s apart per node: 20,000 frames a second
for 600,000 nodes). Taken one at a time, each frame cost a task, an append of its own (a group
commit of one or two events) and a write of its answer. Here a frame holding only heartbeats is
checked where it is read, its events join the batch of the current tick, and one task records
the whole batch (every event on its node's stream, no expected version: they never conflict) and
then writes each connection's answers in one go. Answers still follow durability: a frame is
answered `ok` only once the batch holding its events is on disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import structlog

from broker import errors
from broker.errors import BrokerError
from broker.ws.wire import NodeConnection, error_frame
from eventstore.base import StoreError
from eventstore.events import BaseEvent

log = structlog.get_logger(__name__)

_json = msgspec.json.Encoder()


class _Frame(msgspec.Struct, gc=False):
    conn: NodeConnection
    events: list[BaseEvent]
    ok: bytes  # the answer once recorded
    refs: list[object]
    single: bool  # one op (answered by an object), not an array
    done: Callable[[], None]  # called once answered (frees the connection's slot)


def _error_answer(frame: _Frame, err: BrokerError) -> bytes:
    answers = [error_frame(err, ref) for ref in frame.refs]
    return _json.encode(answers[0] if frame.single else answers)


class HeartbeatBatch:
    """Collects heartbeat frames of every node connection and records them once per tick."""

    def __init__(self, record: Callable[[Sequence[BaseEvent]], Awaitable[object]]) -> None:
        self.record = record  # the runtime's: append the events, apply them
        self._frames: list[_Frame] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # appends made (for tests and benchmarks)

    def add(
        self,
        conn: NodeConnection,
        events: list[BaseEvent],
        ok: bytes,
        refs: list[object],
        single: bool,
        done: Callable[[], None],
    ) -> None:
        """Record `events` with the tick's batch; answer `ok` on `conn` once they are durable."""
        if not self._frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self._frames.append(_Frame(conn, events, ok, refs, single, done))

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        task = asyncio.create_task(self._record(frames))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, frames: list[_Frame]) -> None:
        events = [event for frame in frames for event in frame.events]
        answers: list[bytes]
        try:
            self.batches += 1
            await self.record(events)
            answers = [frame.ok for frame in frames]
        except StoreError:  # one frame's events may be at fault: each frame on its own
            answers = await asyncio.gather(*(self._record_one(frame) for frame in frames))
        by_conn: dict[NodeConnection, list[bytes]] = {}
        for frame, answer in zip(frames, answers, strict=True):
            by_conn.setdefault(frame.conn, []).append(answer)
            frame.done()
        for conn, payloads in by_conn.items():
            if not conn.closed:
                await conn.send_many(payloads)

    async def _record_one(self, frame: _Frame) -> bytes:
        try:
            await self.record(frame.events)
            return frame.ok
        except StoreError as exc:
            err = errors.from_store(exc)
            if err is None or err.code != errors.Unavailable.code:
                log.warning("heartbeat_not_recorded", node_id=frame.conn.node_id, error=str(exc))
            return _error_answer(frame, err or errors.ValidationFailed(str(exc)))

    async def drain(self) -> None:
        """Let the batches being recorded finish (at shutdown)."""
        while self._frames or self._tasks:
            if self._frames:
                self._flush()
            await asyncio.gather(*self._tasks, return_exceptions=True)
