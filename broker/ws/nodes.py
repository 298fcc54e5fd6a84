"""The node WebSocket, `GET /api/v1/ws` (DESIGN.md §7).

Auth by `Authorization: Bearer` at the upgrade, or by a first frame `{"type": "auth", "token":
"Bearer …"}` within `ws_auth_timeout`. Then JSON text frames, each one op or an array of ops:
`heartbeat`, `status`, `telemetry`, `send`, `ack`, each with an optional `ref`. Every op is
answered `{"type": "ok", "ref": …}` once its events are durable, or `{"type": "error", "ref": …,
"error": {"code", "message"}}`; an array of ops is answered by an array, in the same order. A bad
op never closes the socket. Pushed messages arrive as `{"type": "message", …}`; the node answers
`{"type": "ack", "message_id": …}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from typing import Annotated, Any

import msgspec
import structlog
from aiohttp import WSMsgType, web

from broker import errors, jsonlimits
from broker.config import DeliveryConfig
from broker.http.auth import Public, authenticate
from broker.http.routing import Routes
from broker.keys import (
    CONFIG,
    DISPATCHER,
    HEARTBEATS,
    MESSAGING,
    METRICS,
    NODES,
    TAKEOVER,
    WS_CAP,
)
from broker.principal import Principal
from broker.services.delivery import CLOSE_REPLACED, CLOSE_TRY_AGAIN, Dispatcher, NodeConnection
from broker.services.messaging import (
    MessageType,
    Messaging,
    PriorityName,
    Recipients,
    SendResult,
    Ttl,
)
from broker.services.nodes import Label, Timestamp
from broker.ws.heartbeats import HeartbeatBatch
from eventstore.base import ConcurrencyError, EventNotEncodable, StoreUnavailable
from eventstore.events import (
    BaseEvent,
    MessageRead,
    MessageSent,
    MessagesRead,
    NodeHeartbeat,
    NodeTelemetry,
)

log = structlog.get_logger(__name__)
routes = Routes("websocket")

CLOSE_POLICY = 1008  # RFC 6455: policy violation (bad or missing auth)

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


class AuthFrame(msgspec.Struct, kw_only=True, tag="auth", tag_field="type"):
    token: str


_auth_decoder = msgspec.json.Decoder(AuthFrame)


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


def _error(ref: Any, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "ref": ref, "error": {"code": code, "message": message}}


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

    def __init__(
        self,
        principal: Principal,
        conn: NodeConnection,
        app: web.Application,
        config: DeliveryConfig,
    ) -> None:
        self.principal = principal
        self.conn = conn
        self.app = app
        self.messaging: Messaging = app[MESSAGING]
        self.dispatcher: Dispatcher = app[DISPATCHER]
        self.slots = asyncio.Semaphore(config.ws_max_pending_ops)
        self.tasks: set[asyncio.Task[None]] = set()
        self.heartbeats: HeartbeatBatch = app[HEARTBEATS]
        self.nodes = self.messaging.runtime.nodes

    async def on_text(self, data: str) -> None:
        """Handle one frame concurrently with the next ones (bounded per connection), so a
        pipelining node gets its ops committed together. A frame of heartbeats only joins the
        tick's heartbeat batch (broker.ws.heartbeats) instead of getting a task."""
        await self.slots.acquire()
        try:
            ops: Any = jsonlimits.decode(_ops_decoder, data)
        except msgspec.DecodeError:  # a bad op or bad JSON: the frame's task sorts it out
            ops = None
        if ops is not None and self._heartbeats(ops, data):
            return
        task = asyncio.create_task(self._frame(data, ops))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _heartbeats(self, ops: Any, data: str) -> bool:
        """Hand a frame of valid heartbeat ops to the heartbeat batch; False for any other."""
        if type(ops) is HeartbeatOp:
            single, beats = True, [ops]
        elif type(ops) is list and ops and all(type(op) is HeartbeatOp for op in ops):
            single, beats = False, ops
        else:
            return False
        node_id = self.principal.id
        if node_id not in self.nodes.nodes or jsonlimits.may_hold_big_int(data):
            return False  # answered by the frame's task: not found, or which field is bad
        events: list[BaseEvent] = [
            NodeHeartbeat(
                node_id=node_id, timestamp=op.timestamp, status=op.status, metrics=op.metrics or {}
            )
            for op in beats
        ]
        refs = [op.ref for op in beats]
        ok = _json.encode(Ok(refs[0]) if single else [Ok(ref) for ref in refs])
        self.heartbeats.add(self.conn, events, ok, refs, single, self.slots.release)
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    async def _frame(self, data: str, ops: Any = None) -> None:
        """Run a frame's ops and answer; `ops` are the frame decoded as valid ops, if it is."""
        if ops is None:
            try:  # not every op is valid: decode the frame as it is, answer each op
                ops = jsonlimits.decode(_frame_decoder, data)
            except msgspec.DecodeError as exc:
                await self._answer(_error(None, "VALIDATION_ERROR", f"malformed JSON: {exc}"))
                return
        if jsonlimits.may_hold_big_int(data):
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
        """Answer an array of ops. Sends and acks are validated here and recorded in ONE append
        (their events are independent: each send claims its own new message id); the other ops
        run concurrently, each on its own."""
        messaging, principal = self.messaging, self.principal
        answers: list[Answer | None] = [None] * len(items)
        events: list[BaseEvent] = []
        sends: list[tuple[int, SendOp, MessageSent]] = []
        acks: list[tuple[int, AckOp]] = []
        read_ids: dict[str, None] = {}  # the frame's acks, in order, once each
        claimed: set[str] = set()
        slow: list[tuple[int, Any]] = []
        for i, raw in enumerate(items):
            kind = type(raw)
            if kind is _Invalid:
                answers[i] = _error(raw.ref, "VALIDATION_ERROR", raw.message)
                continue
            try:
                if kind is SendOp:
                    prepared = messaging.prepare_send(principal, raw, raw.idempotency_key)
                elif kind is AckOp:
                    if messaging.unread(principal, raw.message_id):
                        acks.append((i, raw))
                        read_ids[raw.message_id] = None
                    else:  # read already: nothing to record
                        answers[i] = OkRead(raw.ref, raw.message_id)
                    continue
                else:
                    slow.append((i, raw))
                    continue
            except errors.BrokerError as exc:
                answers[i] = _error(raw.ref, exc.code, exc.message)
                continue
            if type(prepared) is not MessageSent:  # a retry: the earlier send's answer
                answers[i] = _ok_sent(raw.ref, prepared)  # type: ignore[arg-type]
            elif prepared.message_id not in claimed:
                claimed.add(prepared.message_id)
                events.append(prepared)
                sends.append((i, raw, prepared))
            else:
                slow.append((i, raw))  # the same idempotency key twice in one frame
        if len(read_ids) == 1:
            events.append(
                MessageRead(message_id=next(iter(read_ids)), node_id=self.principal.id, via="ws")
            )
        elif read_ids:  # one event for the frame's acks, not one per message
            events.append(MessagesRead(node_id=self.principal.id, message_ids=list(read_ids)))
        if events:
            try:
                with self.dispatcher.acking(self.conn, read_ids):
                    envs = await self.messaging.runtime.record(
                        events, {m: 0 for m in claimed} or None
                    )
            except (ConcurrencyError, EventNotEncodable):  # settle each op on its own
                # (a racing retry elsewhere, or one op the log cannot store: it fails alone)
                slow.extend((i, op) for i, op, _ in sends)
                slow.extend(acks)
            except StoreUnavailable:
                for i, op in [(i, op) for i, op, _ in sends] + acks:
                    answers[i] = _error(
                        op.ref, "SERVICE_UNAVAILABLE", "the event log is unavailable"
                    )
            else:
                recorded = self.messaging.recorded
                for (i, op, event), env in zip(sends, envs, strict=False):
                    answers[i] = _ok_sent(op.ref, recorded(event, env))
                for i, ack in acks:
                    answers[i] = OkRead(ack.ref, ack.message_id)
        if slow:
            done = await asyncio.gather(*(self._op(raw) for _, raw in slow))
            for (i, _), answer in zip(slow, done, strict=True):
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
            return _error(raw.ref, "VALIDATION_ERROR", raw.message)
        else:
            ref = raw.get("ref") if isinstance(raw, dict) else None
            try:
                op = msgspec.convert(raw, Op)
            except msgspec.ValidationError as exc:
                return _error(ref, "VALIDATION_ERROR", str(exc))
        ref = op.ref
        try:
            return await self._run(op)
        except errors.BrokerError as exc:
            return _error(ref, exc.code, exc.message)
        except ConcurrencyError:
            return _error(ref, "CONFLICT", "changed concurrently; retry")
        except EventNotEncodable as exc:
            return _error(ref, "VALIDATION_ERROR", str(exc))
        except StoreUnavailable:
            return _error(ref, "SERVICE_UNAVAILABLE", "the event log is unavailable; retry later")
        except Exception:
            log.exception("ws_op_failed", op=type(op).__name__)
            return _error(ref, "INTERNAL", "internal error")

    async def _run(self, op: Op) -> Answer:
        node_id = self.principal.id
        if isinstance(op, AckOp):
            with self.dispatcher.acking(self.conn, (op.message_id,)):
                await self.messaging.read(self.principal, op.message_id, via="ws")
            return OkRead(op.ref, op.message_id)
        if isinstance(op, SendOp):
            result = await self.messaging.send(self.principal, op, op.idempotency_key)
            return _ok_sent(op.ref, result)
        nodes = self.app[NODES]
        if isinstance(op, HeartbeatOp):
            await nodes.heartbeat(
                node_id, timestamp=op.timestamp, status=op.status, metrics=op.metrics
            )
        elif isinstance(op, StatusOp):
            await nodes.update_status(
                node_id,
                by="node",
                status=op.status,
                load=op.load,
                available_resources=op.available_resources,
                metadata=op.metadata,
                last_seen=op.last_seen,
            )
        else:
            nodes.get(node_id)  # 404 for a node deregistered meanwhile
            await self.messaging.runtime.record(
                [NodeTelemetry(node_id=node_id, metrics=op.metrics, timestamp=op.timestamp)]
            )
        return Ok(op.ref)


def _origin_allowed(request: web.Request, config: DeliveryConfig) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin in config.allowed_origins


async def _first_frame_auth(
    ws: web.WebSocketResponse, app: web.Application, timeout: float
) -> Principal | None:
    try:
        async with asyncio.timeout(timeout):
            msg = await ws.receive()
            while msg.type in (WSMsgType.PING, WSMsgType.PONG):  # no autoping: see node_ws
                if msg.type == WSMsgType.PING:
                    await ws.pong(msg.data)
                msg = await ws.receive()
    except TimeoutError:
        await ws.send_str(
            _json.encode(_error(None, "AUTHENTICATION_ERROR", "auth timeout")).decode()
        )
        return None
    if msg.type != WSMsgType.TEXT:
        return None
    try:
        frame = jsonlimits.decode(_auth_decoder, msg.data)
        token = (
            frame.token if frame.token.lower().startswith("bearer ") else f"Bearer {frame.token}"
        )
        return await authenticate(app, token)
    except (msgspec.ValidationError, msgspec.DecodeError):
        reason = 'the first frame must be {"type": "auth", "token": "Bearer …"}'
    except errors.BrokerError as exc:
        reason = exc.message
    await ws.send_str(_json.encode(_error(None, "AUTHENTICATION_ERROR", reason)).decode())
    return None


@routes.get(
    "/api/v1/ws",
    policy=Public(),
    status=101,
    response_content_type="",
    summary="Node WebSocket (auth at upgrade or first frame)",
    extra={"websocket": True},
)
async def node_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[CONFIG].delivery
    if not _origin_allowed(request, config):
        raise errors.Forbidden("Origin not allowed")
    principal: Principal | None = None
    if request.headers.get("Authorization"):
        principal = await authenticate(app, request.headers["Authorization"])  # 401 before upgrade
        if not principal.is_node:
            raise errors.Forbidden("this WebSocket is for nodes; operators use /ws")
    ws = web.WebSocketResponse(  # Pongs are seen here: they prove the node reads (delivery)
        heartbeat=config.ws_heartbeat, max_msg_size=config.ws_max_message_bytes, autoping=False
    )
    await ws.prepare(request)
    if principal is None:
        principal = await _first_frame_auth(ws, app, config.ws_auth_timeout)
        if principal is None:
            await ws.close(code=CLOSE_POLICY, message=b"authentication failed")
            return ws
        if not principal.is_node:
            await ws.send_str(
                _json.encode(_error(None, "AUTHORIZATION_ERROR", "nodes only")).decode()
            )
            await ws.close(code=CLOSE_POLICY, message=b"nodes only")
            return ws
    dispatcher: Dispatcher = app[DISPATCHER]
    if len(dispatcher.connections) >= app[WS_CAP] and principal.id not in dispatcher.connections:
        # At capacity: refused cleanly (a node's reconnection replaces its old one: let it in).
        app[METRICS].ws_refused.labels("capacity").inc()
        await ws.close(code=CLOSE_TRY_AGAIN, message=b"server at capacity, try again later")
        return ws
    # Not an isinstance check: uvloop's transports (0.22+) are no asyncio.Transport subclasses,
    # and every push then went the slow way (aiohttp's writer, one awaited call per frame).
    conn = NodeConnection(
        principal.id, ws, config.ws_send_timeout, request.transport, principal.session
    )
    session = NodeSession(principal, conn, app, config)
    welcome = {"type": "welcome", "node_id": principal.id, "window": config.window}
    old = dispatcher.connect(conn)
    pump: asyncio.Task[None] | None = None
    try:
        if old is not None:
            await old.close(CLOSE_REPLACED, "replaced by a newer connection")
        # Other instances drop their older connection of the node; the welcome follows, so a
        # node that got it knows this connection is the one every instance considers current.
        await app[TAKEOVER].announce(conn)
        await ws.send_str(_json.encode(welcome).decode())
        pump = asyncio.create_task(dispatcher.pump(conn), name=f"push-{principal.id}")
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await session.on_text(msg.data)
            elif msg.type == WSMsgType.PONG:
                conn.pong()
            elif msg.type == WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await session._answer(_error(None, "VALIDATION_ERROR", "send JSON text frames"))
            else:
                break
    finally:
        dispatcher.disconnect(conn)
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if session.tasks:
            await asyncio.gather(*session.tasks, return_exceptions=True)
    return ws


def connection_cap(config: DeliveryConfig) -> int:
    """How many node WebSockets may be open at once (see DeliveryConfig.ws_max_connections)."""
    if config.ws_max_connections > 0:
        return config.ws_max_connections
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - config.fd_reserve)
