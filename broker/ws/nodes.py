"""The node WebSocket, `GET /api/v1/ws` (DESIGN.md §7).

Auth by `Authorization: Bearer` at the upgrade, or by a first frame `{"type": "auth", "token":
"Bearer …"}` within `ws_auth_timeout`. Then JSON text frames, each one op or an array of ops:
`heartbeat`, `status`, `telemetry`, `send`, `ack`, each with an optional `ref` (the session:
`broker.ws.session`). Every op is answered `{"type": "ok", "ref": …}` once its events are
durable, or `{"type": "error", "ref": …, "error": {"code", "message"}}`; an array of ops is
answered by an array, in the same order. A bad op never closes the socket. Pushed messages
arrive as `{"type": "message", …}`; the node answers `{"type": "ack", "message_id": …}`.

aiohttp answers the upgrade; then the socket is the broker's own (`NodeSocket`, a
`broker.ws.protocol.FrameProtocol`) and aiohttp's request ends (issue 15: what an idle node
WebSocket holds).
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import msgspec
import structlog
from aiohttp import WSMsgType, web

from broker import errors, jsonlimits
from broker.config import DeliveryConfig
from broker.http.auth import Public, authenticate
from broker.http.routing import Routes
from broker.keys import CONFIG, DISPATCHER, METRICS, PENDING_SOCKETS, TAKEOVER, WS_CAP
from broker.principal import Principal
from broker.ws.protocol import FrameProtocol, take_over, unread_bytes
from broker.ws.session import NodeSession
from broker.ws.wire import NodeConnection, error_frame, text_frames

log = structlog.get_logger(__name__)
routes = Routes("websocket")

_json = msgspec.json.Encoder()
_TEXT, _BINARY, _PING, _PONG = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG


class AuthFrame(msgspec.Struct, kw_only=True, tag="auth", tag_field="type"):
    token: str


_auth_decoder = msgspec.json.Decoder(AuthFrame)


class NodeSocket(FrameProtocol):
    """A node's WebSocket once aiohttp has answered its upgrade: its first frame's auth when
    the upgrade had none (`await_auth`), then its session (`open`: the connection cap, the
    dispatcher's connection, the welcome). Frames that arrive while either is under way wait
    (reading paused); so do text frames while the session has `ws_max_pending_ops` ops in
    progress. Until its session opens, the socket is listed in the app's PENDING_SOCKETS
    (closed by `close_all`); then it is the dispatcher's connection."""

    __slots__ = ("app", "conn", "session", "timer", "work")

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        config = request.app[CONFIG].delivery
        super().__init__(request, ws, config.ws_max_message_bytes, config.ws_send_timeout)
        self.app = request.app
        self.conn: NodeConnection | None = None
        self.session: NodeSession | None = None
        self.timer: asyncio.TimerHandle | None = None  # the first frame's deadline
        self.work: asyncio.Task[None] | None = None  # the auth or the opening under way
        self.app[PENDING_SOCKETS].add(self)

    def await_auth(self) -> None:
        timeout = self.app[CONFIG].delivery.ws_auth_timeout
        self.timer = self._loop.call_later(timeout, self._auth_timeout)

    def open(self, principal: Principal) -> None:
        self.work = asyncio.get_running_loop().create_task(self._open(principal))
        self.work.add_done_callback(self._worked)

    def on_message(self, msg: Any) -> bool:
        session, kind = self.session, msg.type
        if session is not None and self.work is None:
            conn = session.conn
            conn.quiet = 0  # heard from (Liveness)
            if kind is _TEXT:
                if session.free <= 0:
                    return False
                session.on_text(msg.data)
            elif kind is _PONG:
                conn.pong()
            elif kind is _PING:
                conn.flush()  # the frames listed this tick go before the Pong
                self.write_pong(msg.data)
            else:
                err = errors.ValidationFailed("send JSON text frames")
                session.say(error_frame(err))
            return True
        if self.work is not None:
            return False  # the auth or the opening first
        if kind is _PING:  # no auth yet: a Ping is answered, a Pong ignored
            self.write_pong(msg.data)
            return True
        if kind is _PONG:
            return True
        self._stop_timer()
        if kind is not _TEXT:
            self.refuse(errors.AUTH_FAILED)
            return True
        self.work = asyncio.get_running_loop().create_task(self._auth(msg.data))
        self.work.add_done_callback(self._worked)
        return True

    def close_sent(self) -> bool:
        return self.closed or (self.conn is not None and self.conn.closed)

    def on_lost(self) -> None:
        self._stop_timer()
        self.app[PENDING_SOCKETS].discard(self)
        if self.conn is not None:
            self.app[DISPATCHER].disconnect(self.conn)  # its pump, if one runs, is cancelled

    def on_failed(self) -> None:
        self.on_lost()  # its session ends now, its connection once the peer ends it

    def refuse(self, disconnect: errors.Disconnect, err: errors.BrokerError | None = None) -> None:
        """Close before the session opens: the error frame, if any, then the Close frame."""
        if err is not None:
            self._write_text(error_frame(err))
        self.app[PENDING_SOCKETS].discard(self)
        self.send_close(disconnect.code, disconnect.reason)

    def _write_text(self, answer: Any) -> None:
        self._write(text_frames([_json.encode(answer)]))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _auth_timeout(self) -> None:
        self.timer = None
        if self.work is None and self.session is None:
            self.refuse(errors.AUTH_FAILED, errors.AuthenticationFailed("auth timeout"))

    def _worked(self, task: asyncio.Task[None]) -> None:
        self.work = None
        if not task.cancelled() and task.exception() is not None:
            log.error("node_socket_failed", exc_info=task.exception())
            self._end()
        self._pump()  # what waited behind it

    async def _auth(self, data: str) -> None:
        """The first frame's auth: the session opens, or the socket is refused."""
        try:
            frame = jsonlimits.decode(_auth_decoder, data)
            token = frame.token
            principal = await authenticate(
                self.app, token if token.lower().startswith("bearer ") else f"Bearer {token}"
            )
        except (msgspec.ValidationError, msgspec.DecodeError):
            reason = 'the first frame must be {"type": "auth", "token": "Bearer …"}'
        except errors.BrokerError as exc:
            reason = exc.message
        else:
            if not principal.is_node:
                self.refuse(errors.NODES_ONLY, errors.Forbidden(errors.NODES_ONLY.reason))
                return
            await self._open(principal)
            return
        self.refuse(errors.AUTH_FAILED, errors.AuthenticationFailed(reason))

    async def _open(self, principal: Principal) -> None:
        app = self.app
        if self.transport is None or self.closed:
            return
        dispatcher = app[DISPATCHER]
        if (
            len(dispatcher.connections) >= app[WS_CAP]
            and principal.id not in dispatcher.connections
        ):
            # At capacity: refused cleanly (a node's reconnection replaces its old one: let it in).
            app[METRICS].ws_refused.labels("capacity").inc()
            self.refuse(errors.TRY_AGAIN)
            return
        config = app[CONFIG].delivery
        conn = self.conn = NodeConnection(
            principal.id, self, config.ws_send_timeout, self.transport, principal.session
        )
        session = self.session = NodeSession(principal, conn, app, config)
        session.woken = self.wake
        app[PENDING_SOCKETS].discard(self)
        old = dispatcher.connect(conn)
        if old is not None:
            await old.close(errors.REPLACED)
        # Other instances drop their older connection of the node; the welcome follows, so a
        # node that got it knows this connection is the one every instance considers current.
        await app[TAKEOVER].announce(conn)
        welcome = {"type": "welcome", "node_id": principal.id, "window": config.window}
        if self.compress:  # aiohttp's writer compresses it
            try:
                await self.send_frame(_json.encode(welcome), _TEXT)
            except ConnectionError:
                return  # gone: on_lost disconnected it
        else:
            self._write_text(welcome)  # not a push: no read check follows it (NodeConnection)
        dispatcher.open(conn)  # pushes follow the welcome, from a pump started when there is mail


def _origin_allowed(request: web.Request, config: DeliveryConfig) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin in config.allowed_origins


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
    # Pongs are seen by the socket: they prove the node reads (delivery). No heartbeat:
    # broker.ws.wire.Liveness checks every connection from one task, instead of a timer each.
    ws = web.WebSocketResponse(max_msg_size=config.ws_max_message_bytes, autoping=False)
    early = unread_bytes(request) if ws.can_prepare(request) else b""
    await ws.prepare(request)
    sock = NodeSocket(request, ws)
    response = take_over(request, sock)
    if principal is None:
        sock.await_auth()
    else:
        sock.open(principal)
    if early:
        sock.data_received(early)
    return response


async def close_all(app: web.Application) -> None:
    """Graceful shutdown: every node socket gets its Close frame (SHUTDOWN), while the server
    still runs to read the nodes' answers; aiohttp no longer knows these sockets."""
    pending: set[NodeSocket] = app[PENDING_SOCKETS]
    for sock in list(pending):
        sock.refuse(errors.SHUTDOWN)
    dispatcher = app.get(DISPATCHER)
    if dispatcher is not None:
        for conn in list(dispatcher.connections.values()):
            await conn.close(errors.SHUTDOWN)


def connection_cap(config: DeliveryConfig) -> int:
    """How many node WebSockets may be open at once (see DeliveryConfig.ws_max_connections)."""
    if config.ws_max_connections > 0:
        return config.ws_max_connections
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - config.fd_reserve)
