"""The lean front: the hot routes answered below aiohttp's `Request` and `Response` objects.

`LeanRunner` (what `broker serve` runs) serves the application as aiohttp's `AppRunner` does,
but each connection is a `LeanProtocol`: aiohttp's own protocol (its C parser, keep-alive,
pipelining, graceful shutdown) that answers a parsed request itself when

- it is a hot route: one declared with `Routes.answer` (`POST /api/v1/messages/send`,
  `POST /api/v1/nodes/{node_id}/heartbeat`), its path a plain one (no query, no escapes);
- it is ordinary: HTTP/1.1 keep-alive, its body arrived whole with its headers (no chunks, no
  `Expect`, no upgrade, no `Content-Encoding`, at most `[server] max_body_bytes`), no
  `X-Min-Seq`;
- and nothing else is pending or in progress on the connection (aiohttp's task is waiting for a
  request, the socket is writable).

Every other request goes to aiohttp unchanged, and what arrives while a hot request is answered
waits for it: aiohttp gets it after the answer is written, so pipelined answers keep their order.

The answer is the middleware's contract through the middleware's own functions (request id,
rate limit and policy, the error body, X-Log-Seq, the request counter and the access log), the
route's own answer function (the services' commit is durable when it returns), then the status
line, the headers aiohttp would write and the msgspec-encoded body in one `transport.write`.
`[server] lean_front = false`, an application with other middlewares or response hooks, or
`Front.enabled = False` (tests) leave every request to aiohttp.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web, web_protocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader

from broker.http import ratelimit
from broker.http.bodies import error_body
from broker.http.middleware import (
    REQUEST_ID_VAR,
    account,
    admit_call,
    client_gone,
    error_for,
    log_seq,
    request_context,
    request_id_of,
)
from broker.http.routing import Answer, RouteInfo, route_info
from broker.keys import CONFIG, REQUEST_ID

log = structlog.get_logger("broker.http")

# The front steps into aiohttp's connection protocol (its request queue, waiter and keep-alive
# state: private attributes), so it runs only on the releases it was written and tested for;
# on another one aiohttp answers everything, as with `[server] lean_front = false`.
KNOWN_AIOHTTP = ("3.14",)
_PROTOCOL_STATE = (
    "_messages",
    "_waiter",
    "_handler_waiter",
    "_request_in_progress",
    "_keepalive_handle",
    "_force_close",
    "_manager",
    "_next_keepalive_close_time",
    "_keepalive_timeout",
)


def aiohttp_fits() -> bool:
    """True when the installed aiohttp is a release the front knows, with the state it uses."""
    release = ".".join(aiohttp.__version__.split(".")[:2])
    slots = set(getattr(web_protocol.RequestHandler, "__slots__", ()))
    return release in KNOWN_AIOHTTP and slots.issuperset(_PROTOCOL_STATE)


_json = msgspec.json.Encoder()
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")  # a path parameter aiohttp would take as it is
_TEMPLATE = re.compile(r"([^{}]*)\{([A-Za-z_][A-Za-z0-9_]*)\}([^{}]*)")
_NO_PARAMS: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class HotRoute:
    """A route the front answers: its path as prefix, at most one `{param}` segment, suffix."""

    method: str
    prefix: str
    param: str | None
    suffix: str
    name: str  # aiohttp's canonical path: the request counter's label
    info: RouteInfo
    answer: Answer

    @classmethod
    def of(cls, info: RouteInfo, canonical: str) -> HotRoute | None:
        if info.answer is None or info.deprecated is not None:
            return None
        if "{" not in canonical:
            return cls(info.method, canonical, None, "", canonical, info, info.answer)
        template = _TEMPLATE.fullmatch(canonical)
        if template is None or not template[1].endswith("/") or template[3][:1] not in ("", "/"):
            return None  # several parameters, a pattern, or a parameter inside a segment
        prefix, param, suffix = template.groups()
        return cls(info.method, prefix, param, suffix, canonical, info, info.answer)

    def params(self, path: str) -> dict[str, str] | None:
        """The path's parameters if it is this route's, else None."""
        if self.param is None:
            return _NO_PARAMS if path == self.prefix else None
        if not (path.startswith(self.prefix) and path.endswith(self.suffix)):
            return None
        value = path[len(self.prefix) : len(path) - len(self.suffix)]
        if _SEGMENT.fullmatch(value) is None or value in (".", ".."):
            return None  # aiohttp's router would decode or normalise it: leave it to aiohttp
        return {self.param: value}


class LeanCall(dict[Any, Any]):
    """A hot request as the contract code and the answer functions read it
    (`broker.http.routing.Call`); its items are the request's values (REQUEST_ID, PRINCIPAL,
    RATE_LIMIT), as aiohttp's request holds them."""

    __slots__ = (
        "app",
        "method",
        "path",
        "headers",
        "match_info",
        "content",
        "client_max_size",
        "remote",
    )

    def __init__(
        self,
        app: web.Application,
        message: RawRequestMessage,
        payload: StreamReader,
        params: dict[str, str],
        remote: str | None,
        max_size: int,
    ) -> None:
        self.app = app
        self.method = message.method
        self.path = message.path
        self.headers = message.headers
        self.match_info = params
        self.content = payload
        self.client_max_size = max_size
        self.remote = remote

    async def read(self) -> bytes:
        return self.content.read_nowait()  # the front takes only bodies that arrived whole


Hot = tuple[HotRoute, dict[str, str], RawRequestMessage]  # a request the front answers


class Front:
    """An application's hot routes, and how the front answers them."""

    def __init__(self, app: web.Application, routes: list[HotRoute], limit_headers: bool) -> None:
        self.app = app
        self.routes = routes
        self.limit_headers = limit_headers  # [limits] on: the X-RateLimit-* hook's headers
        self.max_body = app[CONFIG].server.max_body_bytes
        self.enabled = True  # False: every request to aiohttp (tests compare the two paths)

    @classmethod
    def of(cls, app: web.Application) -> Front | None:
        """The front for `app`, or None when aiohttp must answer everything: the front is off
        in the configuration, or the application is not wired as `create_app` wires it (one
        middleware, `request_context`; no response hook but the rate limiter's)."""
        config = app.get(CONFIG)
        if config is None or not config.server.lean_front:
            return None
        if not aiohttp_fits():
            log.warning(
                "lean_front_off",
                reason=f"aiohttp {aiohttp.__version__} is not a release the front was written "
                f"for ({', '.join(KNOWN_AIOHTTP)}.x): every request goes to aiohttp",
            )
            return None
        hooks = list(app.on_response_prepare)
        if list(app.middlewares) != [request_context] or hooks not in ([], [ratelimit.add_headers]):
            return None
        routes = []
        for resource in app.router.resources():
            for route in resource:
                info = route_info(route.handler)
                if info is not None and route.method == info.method:
                    hot = HotRoute.of(info, resource.canonical)
                    if hot is not None:
                        routes.append(hot)
        return cls(app, routes, bool(hooks)) if routes else None

    def match(self, message: Any, payload: StreamReader) -> Hot | None:
        """The hot route of a parsed request and its path parameters, when the front may
        answer it (the module's docstring); else None."""
        if not isinstance(message, RawRequestMessage):  # a parse error: aiohttp's 400
            return None
        path, method = message.path, message.method
        for route in self.routes:
            if route.method == method and (params := route.params(path)) is not None:
                break
        else:
            return None
        if (
            message.version != HttpVersion11
            or message.should_close
            or message.upgrade
            or message.chunked
            or message.compression is not None
            or not payload.is_eof()
            or payload.total_bytes > self.max_body
        ):
            return None
        headers = message.headers
        if "Expect" in headers or "X-Min-Seq" in headers or "Transfer-Encoding" in headers:
            return None
        return route, params, message

    async def answer(
        self,
        route: HotRoute,
        params: dict[str, str],
        message: RawRequestMessage,
        payload: StreamReader,
        remote: str | None,
    ) -> bytes | None:
        """The request's whole answer as bytes (None: the client is gone), every step of the
        middleware's contract taken through its functions (broker.http.middleware)."""
        call = LeanCall(self.app, message, payload, params, remote, self.max_body)
        request_id = call[REQUEST_ID] = request_id_of(message.headers)
        bound = REQUEST_ID_VAR.set(request_id)
        t0 = time.perf_counter()
        try:
            extra = None
            try:
                await admit_call(call, route.info)
                body = _json.encode(await route.answer(call))
                status = route.info.status
            except ConnectionError:
                client_gone(call)
                return None
            except Exception as exc:
                err = error_for(exc, call.path)
                status, extra = err.status, err.headers
                body = error_body(status, err.code, err.message, err.details, request_id)
            wire = self._wire(call, status, extra, request_id, body)
            account(call, route.name, status, len(body), t0)
            return wire
        finally:
            REQUEST_ID_VAR.reset(bound)

    def _wire(
        self,
        call: LeanCall,
        status: int,
        extra: dict[str, str] | None,
        request_id: str,
        body: bytes,
    ) -> bytes:
        """Status line, headers (in aiohttp's order: the error's own, Content-Type, the
        middleware's, Content-Length, Date, Server, then the rate limiter's hook), body."""
        head = [_STATUS_LINES[status]]
        if extra:
            head.extend(f"{name}: {value}\r\n" for name, value in extra.items())
        head.append(f"Content-Type: application/json\r\nX-Request-ID: {request_id}\r\n")
        seq = log_seq(self.app)
        if seq is not None:
            head.append(f"X-Log-Seq: {seq}\r\n")
        head.append(f"Content-Length: {len(body)}\r\nDate: {rfc822_formatted_time()}\r\n")
        head.append(_SERVER)
        if self.limit_headers:
            limits: dict[str, str] = {}
            ratelimit.put_headers(call, limits)
            for name, value in limits.items():
                if extra is None or name not in extra:
                    head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        return "".join(head).encode() + body


_STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n" for s in HTTPStatus}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n"


class LeanProtocol(web_protocol.RequestHandler):
    """aiohttp's connection protocol, answering hot requests itself (the module's docstring).

    While a hot request is answered, aiohttp's task keeps waiting: its waiter is parked here
    (`_parked`) so that what arrives meanwhile is parsed and queued but not handed to it; once
    the answer is written, the waiter is given back, and woken when requests are queued."""

    __slots__ = ("_front", "_parked", "_hot", "_ip")

    def __init__(self, manager: LeanServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._front = manager.front
        self._parked: asyncio.Future[None] | None = None
        self._hot: asyncio.Task[None] | None = None
        self._ip: str | None = None  # the client's address, once asked

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if (
            waiter is None  # aiohttp is answering a request, or the front is (_parked)
            or waiter.done()
            or self._messages
            or self._paused  # the client does not read: aiohttp's writer waits for it
            or not self._front.enabled
        ):
            super().data_received(data)
            return
        self._waiter = None  # what this data holds is not aiohttp's yet
        super().data_received(data)
        messages = self._messages
        if messages and not self._force_close:
            message, payload = messages[0]
            found = self._front.match(message, payload)
            if found is not None:
                messages.popleft()
                if self._parser is not None:
                    self._parser.message_consumed()
                self._parked = waiter
                self._request_in_progress = True  # a graceful shutdown waits for the answer
                if self._manager is not None:
                    self._manager.requests_count += 1
                self._hot = self._loop.create_task(self._serve(*found, payload))
                return
        self._waiter = waiter
        if messages:
            waiter.set_result(None)

    async def _serve(
        self,
        route: HotRoute,
        params: dict[str, str],
        message: RawRequestMessage,
        payload: StreamReader,
    ) -> None:
        try:
            wire = await self._front.answer(route, params, message, payload, self._remote())
            if wire is not None and self.transport is not None:
                self.transport.write(wire)
        except Exception:  # a bug of the front's own: never leave the connection hanging
            log.exception("lean_front_failed")
            self.force_close()
        finally:
            self._resume()

    def _resume(self) -> None:
        """Give aiohttp its waiter back: cancelled if the connection closed meanwhile (as
        `close()` would have), woken if requests were queued, else the keep-alive timer on."""
        waiter, self._parked, self._hot = self._parked, None, None
        self._request_in_progress = False
        if self._handler_waiter is not None and not self._handler_waiter.done():
            self._handler_waiter.set_result(None)  # a graceful shutdown waited for it
        if waiter is None or waiter.done():  # aiohttp's task was cancelled meanwhile
            return
        self._waiter = waiter
        if self._force_close or self._close:
            waiter.cancel()
        elif self._messages:
            waiter.set_result(None)
        else:  # as aiohttp's task does after each answer
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _remote(self) -> str | None:
        if self._ip is None:  # as aiohttp's `BaseRequest.remote`
            peer = self.peername
            if peer is None:
                return None
            self._ip = str(peer[0]) if isinstance(peer, list | tuple) else str(peer)
        return self._ip


class LeanServer(web.Server):
    """aiohttp's server whose connections are `LeanProtocol`s."""

    def __init__(self, front: Front, server: web.Server) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        self.front = front

    def __call__(self) -> LeanProtocol:
        return LeanProtocol(self, loop=self._loop, **self._kwargs)


class LeanRunner(web.AppRunner):
    """aiohttp's `AppRunner`, serving with the lean front when the application allows it
    (`Front.of`); `front` is None otherwise."""

    front: Front | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the application started: its routes are final
        self.front = Front.of(self.app)
        return server if self.front is None else LeanServer(self.front, server)
