"""A node WebSocket's session (`broker.ws.nodes`): the node's ops as they come in JSON text
frames, each one op or an array of ops: `heartbeat`, `status`, `telemetry`, `send`, `ack`, each
with an optional `ref`. Every op is answered `{"type": "ok", "ref": …}` once its events are
durable, or `{"type": "error", "ref": …, "error": {"code", "message"}}`; an array of ops is
answered by an array, in the same order. A bad op never closes the socket.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import structlog

from broker import errors, jsonlimits
from broker.config import DeliveryConfig
from broker.errors import BrokerError, ValidationFailed
from broker.keys import HEARTBEATS, NODE_OPS
from broker.principal import Principal
from broker.services.messaging import (
    MessageType,
    PriorityName,
    Recipients,
    SendResult,
    Ttl,
)
from broker.services.nodeops import failure
from broker.services.nodes import Label, Timestamp
from broker.ws.heartbeats import HeartbeatBatch
from broker.ws.wire import NodeConnection, error_frame

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger(__name__)

_json = msgspec.json.Encoder()
_frame_decoder = msgspec.json.Decoder()


# --- ops (wire types) ---


class _Op(msgspec.Struct, kw_only=True, tag_field="type", gc=False):
    """A node op. gc=False: decoded from a frame, ops can't form cycles; thousands are alive
    under load, and the garbage collector's pauses grow with what it tracks."""

    ref: Any = None


class HeartbeatOp(_Op, tag="heartbeat"):
    timestamp: Timestamp | None = None
    status: Label | None = None
    metrics: dict[str, Any] | None = None


class StatusOp(_Op, tag="status"):
    status: Label | None = None
    load: float | None = None
    available_resources: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    last_seen: Timestamp | None = None


class TelemetryOp(_Op, tag="telemetry"):
    metrics: dict[str, Any] = {}
    timestamp: Timestamp | None = None


class SendOp(_Op, tag="send"):
    to_nodes: Recipients
    message_type: MessageType
    content: Any = None
    from_node: str | None = None
    priority: PriorityName = "normal"
    ttl: Ttl | None = None
    metadata: dict[str, Any] | None = None
    idempotency_key: str | None = None


class AckOp(_Op, tag="ack"):
    message_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


Op = HeartbeatOp | StatusOp | TelemetryOp | SendOp | AckOp


_ops_decoder = msgspec.json.Decoder(Op | list[Op])


# --- answers: Structs, not dicts (one per op: cheaper to build and encode, and gc=False
# keeps them out of the cyclic collector's generations) ---


class Ok(msgspec.Struct, tag="ok", tag_field="type", gc=False):
    ref: Any = None


class OkRead(Ok, tag="ok"):
    message_id: str = ""


class OkSent(OkRead, tag="ok"):
    expires_at: str = ""


def _ok_sent(ref: Any, result: SendResult) -> OkSent:
    return OkSent(ref, result.message_id, result.expires_at)


Answer = Ok | dict[str, Any]  # an error answer is a dict (rare: no need for speed)


def _error(ref: Any, err: BrokerError) -> dict[str, Any]:
    return error_frame(err, ref)


class _Invalid(msgspec.Struct, gc=False):
    """An op that decoded but cannot be recorded (see `_screen`); answered with an error."""

    ref: Any
    message: str


def _screen(op: Any, path: str) -> Any:
    """`op`, or an _Invalid in its place when it holds an integer the log cannot store."""
    where = jsonlimits.find_out_of_range(op, path)
    if where is None:
        return op
    ref = op.ref if isinstance(op, _Op) else op.get("ref") if isinstance(op, dict) else None
    if jsonlimits.find_out_of_range(ref) is not None:
        ref = None  # the ref itself is the culprit: it cannot be echoed as it came
    return _Invalid(ref, str(jsonlimits.OutOfRange(where)))


class NodeSession:
    """One authenticated node connection: decodes frames, runs ops, answers."""

    __slots__ = ("conn", "free", "heartbeats", "ops", "principal", "tasks", "woken")

    def __init__(
        self,
        principal: Principal,
        conn: NodeConnection,
        app: web.Application,
        config: DeliveryConfig,
    ) -> None:
        self.principal = principal
        self.conn = conn
        self.ops = app[NODE_OPS]
        self.free = config.ws_max_pending_ops  # ops that may start now (each frame takes one)
        self.woken: Callable[[], None] | None = None  # called when one frees up
        self.tasks: set[asyncio.Task[None]] | None = None  # frames in progress (made on demand)
        self.heartbeats: HeartbeatBatch = app[HEARTBEATS]

    def on_text(self, data: str) -> None:
        """Handle one frame concurrently with the next ones (bounded per connection: the
        caller sees `free` first), so a pipelining node gets its ops committed together. A
        frame of heartbeats only joins the tick's heartbeat batch (broker.ws.heartbeats)
        instead of getting a task."""
        self.free -= 1
        try:
            ops: Any = jsonlimits.decode(_ops_decoder, data)
        except msgspec.DecodeError:  # a bad op or bad JSON: the frame's task sorts it out
            ops = None
        if ops is not None and self._heartbeats(ops):
            return
        if type(ops) is AckOp and jsonlimits.storable(ops):
            self._ack(ops)
            return
        task = asyncio.create_task(self._frame(data, ops))
        self._keep(task).add_done_callback(self._done)

    def _heartbeats(self, ops: Any) -> bool:
        """Hand a frame of valid heartbeat ops to the heartbeat batch; False for any other."""
        if type(ops) is HeartbeatOp:
            single, beats = True, [ops]
        elif type(ops) is list and ops and all(type(op) is HeartbeatOp for op in ops):
            single, beats = False, ops
        else:
            return False
        if not jsonlimits.storable(beats):
            return False  # answered by the frame's task: which field is bad
        events = self.ops.heartbeats(self.principal.id, beats)
        if events is None:
            return False  # answered by the frame's task: not found
        refs = [op.ref for op in beats]
        ok = _json.encode(Ok(refs[0]) if single else [Ok(ref) for ref in refs])
        self.heartbeats.add(self.conn, events, ok, refs, single, self.release)
        return True

    def _ack(self, op: AckOp) -> None:
        """A frame of one ack (a seed-style node sends one per push), answered without a task
        of its own: once its read is durable, from the future's callback."""
        try:
            fut = self.ops.ack_soon(self.principal, self.conn, op.message_id)
        except Exception as exc:
            self._reply(_error(op.ref, failure(exc)))
            return
        if fut is None:
            self._reply(OkRead(op.ref, op.message_id))
        else:
            fut.add_done_callback(functools.partial(self._acked, op))

    def _acked(self, op: AckOp, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():  # nobody cancels it: no answer to give
            self.release()
            return
        exc = fut.exception()
        if exc is None:
            self._reply(OkRead(op.ref, op.message_id))
        else:
            err = failure(exc) if isinstance(exc, Exception) else errors.internal()
            self._reply(_error(op.ref, err))

    def release(self) -> None:
        """An op is answered: one more may start."""
        self.free += 1
        if self.free == 1 and self.woken is not None:
            self.woken()

    def _reply(self, answer: Answer) -> None:
        """Write an op's answer (listed for the tick's write while the peer keeps up) and free
        its slot."""
        self.release()
        self.say(answer)

    def say(self, answer: Any) -> None:
        """Write an answer: listed for the tick's write while the peer keeps up."""
        frames = [_json.encode(answer)]
        if self.conn.queue(frames) is None:  # the slow path: aiohttp's writer, which waits
            task = asyncio.create_task(self._send_slowly(frames))
            self._keep(task).add_done_callback(self._forget)

    async def _send_slowly(self, frames: list[bytes]) -> None:
        await self.conn.send_many(frames)

    def _keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        if self.tasks is not None:
            self.tasks.discard(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._forget(task)
        self.release()

    async def _frame(self, data: str, ops: Any = None) -> None:
        """Run a frame's ops and answer; `ops` are the frame decoded as valid ops, if it is."""
        if ops is None:
            try:  # not every op is valid: decode the frame as it is, answer each op
                ops = jsonlimits.decode(_frame_decoder, data)
            except msgspec.DecodeError as exc:
                await self._answer(_error(None, ValidationFailed(f"malformed JSON: {exc}")))
                return
        if not jsonlimits.storable(ops):
            ops = (
                [_screen(op, f"$[{i}]") for i, op in enumerate(ops)]
                if isinstance(ops, list)
                else _screen(ops, "$")
            )
        if isinstance(ops, list):
            await self._answer(await self._batch(ops))
        else:
            await self._answer(await self._op(ops))

    async def _batch(self, items: list[Any]) -> list[Answer]:
        """Answer an array of ops: its sends and acks are recorded together (NodeOps.
        record_batch); the other ops run concurrently, each on its own."""
        answers: list[Answer | None] = [None] * len(items)
        sends: list[tuple[int, SendOp]] = []
        acks: list[tuple[int, AckOp]] = []
        others: list[tuple[int, Any]] = []
        for i, raw in enumerate(items):
            kind = type(raw)
            if kind is SendOp:
                sends.append((i, raw))
            elif kind is AckOp:
                acks.append((i, raw))
            elif kind is _Invalid:
                answers[i] = _error(raw.ref, ValidationFailed(raw.message))
            else:
                others.append((i, raw))
        if sends or acks:
            sent, read = await self.ops.record_batch(
                self.principal,
                self.conn,
                [op for _, op in sends],
                [op.message_id for _, op in acks],
            )
            for (i, op), result in zip(sends, sent, strict=True):
                answers[i] = (
                    _ok_sent(op.ref, result)
                    if type(result) is SendResult
                    else _error(op.ref, result)  # type: ignore[arg-type]
                )
            for (i, ack), outcome in zip(acks, read, strict=True):
                answers[i] = (
                    OkRead(ack.ref, ack.message_id) if outcome is None else _error(ack.ref, outcome)
                )
        if others:
            done = await asyncio.gather(*(self._op(raw) for _, raw in others))
            for (i, _), answer in zip(others, done, strict=True):
                answers[i] = answer
        return [a for a in answers if a is not None]

    async def _answer(self, answer: Any) -> None:
        if not self.conn.closed:
            await self.conn.send_many([_json.encode(answer)])

    async def _op(self, raw: Any) -> Answer:
        op: Op
        if isinstance(raw, HeartbeatOp | StatusOp | TelemetryOp | SendOp | AckOp):
            op = raw
        elif isinstance(raw, _Invalid):
            return _error(raw.ref, ValidationFailed(raw.message))
        else:
            ref = raw.get("ref") if isinstance(raw, dict) else None
            try:
                op = msgspec.convert(raw, Op)
            except msgspec.ValidationError as exc:
                return _error(ref, ValidationFailed(str(exc)))
        try:
            return await self._run(op)
        except Exception as exc:
            return _error(op.ref, failure(exc))

    async def _run(self, op: Op) -> Answer:
        node_id, ops = self.principal.id, self.ops
        if isinstance(op, AckOp):
            await ops.ack(self.principal, self.conn, op.message_id)
            return OkRead(op.ref, op.message_id)
        if isinstance(op, SendOp):
            result = await ops.messaging.send(self.principal, op, op.idempotency_key)
            return _ok_sent(op.ref, result)
        if isinstance(op, HeartbeatOp):
            await ops.heartbeat(node_id, op)
        elif isinstance(op, StatusOp):
            await ops.status(
                node_id,
                status=op.status,
                load=op.load,
                available_resources=op.available_resources,
                metadata=op.metadata,
                last_seen=op.last_seen,
            )
        else:
            await ops.telemetry(node_id, op.metrics, op.timestamp)
        return Ok(op.ref)
