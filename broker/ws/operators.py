"""The operators' WebSocket feed, `GET /ws` (DESIGN.md §7, seed 004).

Protocol (docs/websocket.md): the client authenticates with `Authorization: Bearer` at the
upgrade or with a first frame `{"type": "auth", "token": "Bearer …"}` within
`[events] ws_auth_timeout` seconds, as an operator holding `events:read`. Then

    {"type": "subscribe", "from_seq": N, "types": ["node.*"], "streams": ["node-1"]}

sends the matching history from N, `{"type": "caught_up", "seq": H}` (H: the head when the
subscription started), then live events as `{"type": "event", "seq", "event", "stream", "ts",
"data", …}`. `unsubscribe` stops it; a new `subscribe` replaces it. Every client op may carry a
`ref`, echoed in the `{"type": "ok", "op": …}` or `{"type": "error", "error": {code, message}}`
answer. The token is checked again every `ws_heartbeat` seconds (and may be replaced by a new
`auth` frame); a consumer that falls `feed_max_buffer` events behind, or whose socket does not
take a frame within `feed_send_timeout`, is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

import msgspec
import structlog
from aiohttp import WSMsgType, web

from broker import errors, jsonlimits
from broker.config import EventsConfig
from broker.errors import AuthenticationFailed, BrokerError, Disconnect, ValidationFailed
from broker.http.auth import Public, authenticate, credential
from broker.http.routing import Routes
from broker.keys import CONFIG, FEEDS, RUNTIME
from broker.principal import Principal
from broker.services import eventlog
from broker.ws.wire import error_frame
from eventstore.base import Envelope, EventStore

log = structlog.get_logger(__name__)
routes = Routes("events")
PERMISSION = "events:read"
MAX_FRAME = 64 * 1024

# How the feed's errors close it (broker.errors: codes, reasons, reconnect advice).
_CLOSES: dict[str, Disconnect] = {
    errors.AuthenticationFailed.code: errors.FEED_AUTH,
    errors.Forbidden.code: errors.FEED_FORBIDDEN,
    errors.SlowConsumer.code: errors.FEED_SLOW,
    errors.Unavailable.code: errors.FEED_UNAVAILABLE,
}


# --- client ops ---


class AuthOp(msgspec.Struct, kw_only=True, tag="auth", tag_field="type"):
    token: str
    ref: Any = None


class SubscribeOp(msgspec.Struct, kw_only=True, tag="subscribe", tag_field="type"):
    from_seq: Annotated[int, msgspec.Meta(ge=1)] | None = None  # None: only new events
    types: list[str] | str | None = None
    streams: list[str] | str | None = None
    ref: Any = None


class UnsubscribeOp(msgspec.Struct, kw_only=True, tag="unsubscribe", tag_field="type"):
    ref: Any = None


class PingOp(msgspec.Struct, kw_only=True, tag="ping", tag_field="type"):
    ref: Any = None


ClientOp = AuthOp | SubscribeOp | UnsubscribeOp | PingOp
_ops = msgspec.json.Decoder(ClientOp)
_any = msgspec.json.Decoder()
_json = msgspec.json.Encoder()


class _Closed(Exception):
    """The session ended (the socket is closed or being closed)."""


class FeedSession:
    """One operator's WebSocket: authentication, then at most one subscription at a time."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, cfg: EventsConfig) -> None:
        self.request = request
        self.app = request.app
        self.ws = ws
        self.cfg = cfg
        self.store: EventStore = request.app[RUNTIME].store
        self.header: str | None = None
        self.principal: Principal | None = None
        self.pump: asyncio.Task[None] | None = None

    # --- sending ---

    async def send(self, frame: bytes) -> None:
        async with asyncio.timeout(self.cfg.feed_send_timeout):
            await self.ws.send_frame(frame, WSMsgType.TEXT)

    async def reply(self, op: str, ref: Any, **fields: Any) -> None:
        await self.send(_json.encode({"type": "ok", "op": op, "ref": ref, **fields}))

    async def error(self, err: BrokerError, ref: Any = None) -> None:
        await self.send(_json.encode(error_frame(err, ref)))

    async def close(self, err: BrokerError, disconnect: Disconnect | None = None) -> None:
        """Send the error's frame and close (with the close its code calls for, the message as
        the reason); a peer that does not take them is cut off."""
        code = (disconnect or _CLOSES.get(err.code, errors.FEED_UNAVAILABLE)).code
        try:
            async with asyncio.timeout(2.0):
                await self.ws.send_frame(eventlog.encode_error(err), WSMsgType.TEXT)
                await self.ws.close(code=code, message=err.message[:120].encode())
        except Exception:
            if self.request.transport is not None:
                self.request.transport.abort()

    # --- auth ---

    async def authenticate(self, header: str | None) -> Principal:
        principal = await authenticate(self.app, header)
        if not principal.can(PERMISSION):
            raise _Forbidden(f"missing permission {PERMISSION}")
        self.header, self.principal = header, principal
        return principal

    async def first_auth(self) -> bool:
        """Authenticate from the upgrade's header or the first frame; False once closed."""
        header = credential(self.request.headers)
        ref = None
        try:
            if header is None:
                try:
                    msg = await self.ws.receive(timeout=self.cfg.ws_auth_timeout)
                except TimeoutError:
                    raise AuthenticationFailed(
                        f"send an auth frame within {self.cfg.ws_auth_timeout:g} s"
                    ) from None
                if msg.type != WSMsgType.TEXT:
                    return False
                try:
                    op = jsonlimits.decode(_ops, msg.data)
                except msgspec.DecodeError:
                    op = None
                if not isinstance(op, AuthOp):
                    raise AuthenticationFailed('the first frame must be {"type": "auth", ...}')
                header, ref = op.token, op.ref
            principal = await self.authenticate(header)
        except (AuthenticationFailed, _Forbidden) as exc:
            await self.close(exc)
            return False
        await self.reply("auth", ref, user=principal.name)
        return True

    async def recheck(self) -> bool:
        """The token still valid and allowed (expiry, logout, revoked role)? Closes if not."""
        try:
            await self.authenticate(self.header)
        except (AuthenticationFailed, _Forbidden) as exc:
            await self.close(exc)
            return False
        return True

    # --- the session ---

    async def run(self) -> None:
        if not await self.first_auth():
            return
        rechecks: set[asyncio.Task[bool]] = set()

        def recheck_now() -> None:  # a credential was revoked somewhere: is it ours?
            task = asyncio.create_task(self.recheck())
            rechecks.add(task)
            task.add_done_callback(rechecks.discard)

        feeds = self.app[FEEDS]
        feeds.rechecks.add(recheck_now)
        try:
            # A revocation committed between the first check and the line above (in the same
            # group commit as the key's use, say) called no recheck of ours: check once more.
            if not await self.recheck():
                return
            while not self.ws.closed:
                try:
                    msg = await self.ws.receive(timeout=self.cfg.ws_heartbeat)
                except TimeoutError:
                    if not await self.recheck():
                        return
                    continue
                if msg.type == WSMsgType.TEXT:
                    await self.handle(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self.error(ValidationFailed("frames are JSON text"))
                else:  # close, closing, error
                    return
        except (_Closed, ConnectionError, TimeoutError):
            return
        finally:
            feeds.rechecks.discard(recheck_now)
            await self.stop_pump()

    async def handle(self, data: str) -> None:
        try:
            op = jsonlimits.decode(_ops, data)
        except msgspec.ValidationError as exc:
            await self.error(ValidationFailed(str(exc)), _ref_of(data))
            return
        except msgspec.DecodeError as exc:
            await self.error(ValidationFailed(f"malformed JSON frame: {exc}"))
            return
        if isinstance(op, SubscribeOp):
            await self.subscribe(op)
        elif isinstance(op, UnsubscribeOp):
            stopped = await self.stop_pump()
            await self.reply("unsubscribe", op.ref, subscribed=stopped)
        elif isinstance(op, AuthOp):
            try:
                await self.authenticate(op.token)
            except (AuthenticationFailed, _Forbidden) as exc:
                await self.close(exc)
                raise _Closed from None
            await self.reply("auth", op.ref, user=self.principal.name if self.principal else "")
        else:
            await self.reply("ping", op.ref)

    async def subscribe(self, op: SubscribeOp) -> None:
        await self.stop_pump()
        types = eventlog.split_list(op.types)
        streams = eventlog.split_list(op.streams)
        head = await self.store.head()
        await self.reply("subscribe", op.ref, from_seq=op.from_seq, head=head)
        self.pump = asyncio.create_task(self.forward(op.from_seq, types, streams))

    async def stop_pump(self) -> bool:
        pump, self.pump = self.pump, None
        if pump is None or pump.done():
            return False
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        return True

    async def forward(
        self, from_seq: int | None, types: list[str] | None, streams: list[str] | None
    ) -> None:
        """Send the feed until it is stopped; disconnect a consumer that cannot keep up."""

        async def write(item: Envelope | eventlog.CaughtUp) -> None:
            await self.send(eventlog.encode_frame(item))

        try:
            await eventlog.feed(
                self.store, from_seq, types, streams, self.cfg.feed_max_buffer, write
            )
        except BrokerError as exc:  # it fell behind, or the log cannot be read
            await self.close(exc)
        except TimeoutError:
            await self.close(errors.SlowConsumer("the socket does not take frames"))
        except ConnectionError:
            pass


class _Forbidden(errors.Forbidden):
    """A valid token without the feed's permission (not an error `authenticate` raises)."""


def _ref_of(data: str) -> Any:
    try:
        raw = jsonlimits.decode(_any, data)
    except msgspec.DecodeError:
        return None
    return raw.get("ref") if isinstance(raw, dict) else None


@routes.get(
    "/ws",
    policy=Public(),  # authenticated by the first frame (or the upgrade's header), not here
    status=101,
    response_content_type="",
    summary="Operators' live event feed (WebSocket; auth frame, then subscribe)",
    extra={"websocket": True, "auth": "first frame or Authorization header: events:read"},
)
async def operator_ws(request: web.Request) -> web.WebSocketResponse:
    cfg = request.app[CONFIG].events
    ws = web.WebSocketResponse(
        heartbeat=cfg.ws_heartbeat, max_msg_size=MAX_FRAME, writer_limit=cfg.feed_write_buffer
    )
    await ws.prepare(request)
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=cfg.feed_write_buffer)
    feeds = request.app[FEEDS]
    session = FeedSession(request, ws, cfg)

    async def stop() -> None:
        going = errors.FEED_GOING_AWAY
        await session.close(errors.Unavailable(going.reason), going)

    feeds.stoppers.add(stop)
    try:
        if not feeds.closing:
            await session.run()
    finally:
        feeds.stoppers.discard(stop)
    if not ws.closed:
        await ws.close()
    return ws
