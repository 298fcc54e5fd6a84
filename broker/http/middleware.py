"""The one middleware: request ids, rate limits and auth, the one error body for every error,
request metrics and access logs."""

from __future__ import annotations

import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from broker import errors
from broker.http import auth, ratelimit
from broker.http.bodies import error_response
from broker.http.routing import Call, RouteInfo, route_info
from broker.ids import random_hex8
from broker.keys import LIMITER, METRICS, PRINCIPAL, REQUEST_ID, RUNTIME

log = structlog.get_logger("broker.http")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _context_var(key: str) -> ContextVar[Any]:
    """structlog's context variable for `key` (what `bind_contextvars` sets and the logs'
    `merge_contextvars` reads), to be set and reset directly: a tenth of the cost per request."""
    tokens = structlog.contextvars.bind_contextvars(**{key: None})
    var = tokens[key].var
    var.reset(tokens[key])
    return var


REQUEST_ID_VAR = _context_var("request_id")


def _translate(exc: BaseException, path: str) -> errors.BrokerError | None:
    """Map exceptions raised below the handlers to the catalog; None = unexpected."""
    if isinstance(exc, errors.BrokerError):
        return exc
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            return errors.NotFound(f"Not found: {path}")
        if exc.status == 405:
            allow = exc.headers.get("Allow", "")
            return errors.MethodNotAllowed(
                f"Method not allowed (allowed: {allow})", headers={"Allow": allow}
            )
        if exc.status == 413:
            return errors.PayloadTooLarge("request body too large")
        err = errors.BrokerError(exc.reason)
        err.status, err.code = exc.status, errors.code_for_status(exc.status)
        return err
    if isinstance(exc, HttpProcessingError):  # e.g. a malformed multipart part header
        return errors.BadRequest(f"malformed request: {exc.message or type(exc).__name__}")
    if isinstance(exc, msgspec.ValidationError):
        return errors.ValidationFailed(str(exc))
    return errors.from_store(exc)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware, every step in one pass: the request id (and the logs' context), the
    `min_seq` wait, the rate limit and the route's policy (`admit_call`), the handler, the error
    body for whatever it raised, the X-Request-ID, deprecation and X-Log-Seq headers, the
    request counter and the access log (`account`). The route's metadata is looked up once:
    aiohttp hands this middleware the route's handler, which carries it. The lean front
    (broker.http.lean) runs the same steps, through the same functions, for the hot routes."""
    app = request.app
    request_id = request[REQUEST_ID] = request_id_of(request.headers)
    bound = REQUEST_ID_VAR.set(request_id)  # the logs' request_id (merge_contextvars)
    t0 = time.perf_counter()
    info = route_info(handler)
    try:
        try:
            if "?" in request.raw_path or "X-Min-Seq" in request.headers:
                await _wait_for_min_seq(request)
            await admit_call(request, info)
            response = await handler(request)
        except web.HTTPException as exc:
            if 300 <= exc.status < 400:  # redirects pass through as they are
                raise
            response = _error(exc, request)
        except ConnectionError:  # the client went away (e.g. before a WebSocket's 101)
            client_gone(request)
            raise  # aiohttp drops the connection quietly: nobody is left to answer
        except Exception as exc:
            response = _error(exc, request)
        if not response.prepared:
            headers = response.headers
            headers["X-Request-ID"] = request_id
            if info is not None and info.deprecated is not None:
                headers.update(info.deprecated.headers())
            seq = log_seq(app)
            if seq is not None:  # what this answer reflects: wait for it elsewhere
                headers["X-Log-Seq"] = seq
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        account(request, name, response.status, response.content_length, t0)
        return response
    finally:
        REQUEST_ID_VAR.reset(bound)


def request_id_of(headers: Mapping[str, str]) -> str:
    """The request's id: the client's X-Request-ID when it is a safe one, else a new one."""
    incoming = headers.get("X-Request-ID")
    if incoming is not None and _SAFE_ID.match(incoming):
        return incoming
    return "req_" + random_hex8()


async def admit_call(request: Call, info: RouteInfo | None) -> None:
    """The rate limit (`ratelimit.charge`, with `[limits]` on), then the route's policy
    (`auth.admit`, with the principal the limiter authenticated, if any)."""
    limiter = request.app.get(LIMITER)
    principal = None
    if limiter is not None and limiter.enabled:
        principal = await ratelimit.charge(request, limiter, info)
    await auth.admit(request, info, principal)


def error_for(exc: BaseException, path: str) -> errors.BrokerError:
    """The catalog's error for what a request raised; an unexpected one is logged, and is 500."""
    err = _translate(exc, path)
    if err is None:
        log.exception("unhandled_error", error=type(exc).__name__)
        err = errors.BrokerError("internal error")
    return err


def log_seq(app: web.Application) -> str | None:
    """The X-Log-Seq of an answer: the last seq the projections applied."""
    runtime = app.get(RUNTIME)
    return None if runtime is None else str(runtime.projections.seq)


def client_gone(request: Call) -> None:
    log.info("client_gone", method=request.method, path=request.path)


def account(request: Call, route: str, status: int, size: int | None, t0: float) -> None:
    """Count the answered request and write its access log line (only built when written)."""
    _requests_counted(request.app[METRICS].http_requests, request.method, route, status)
    if log.is_enabled_for(logging.INFO):
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=status,
            ms=round((time.perf_counter() - t0) * 1000, 2),
            **_who(request, size),
        )


_children: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, int], Any]] = (
    weakref.WeakKeyDictionary()
)


def _requests_counted(counter: Any, method: str, route: str, status: int) -> None:
    """Count the request in `counter` (method, route, status), with its labelled child looked
    up once per label set and kept: `labels()` takes a lock and builds its key every call."""
    global _last
    if _last[0] is counter:
        children = _last[1]
    else:
        found = _children.get(counter)
        children = _children[counter] = {} if found is None else found
        _last = (counter, children)
    key = (method, route, status)
    child = children.get(key)
    if child is None:
        child = children[key] = counter.labels(*key)
    child.inc()


_last: tuple[Any, dict[tuple[str, str, int], Any]] = (None, {})  # the counter of the last call


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def _who(request: Call, size: int | None) -> dict[str, Any]:
    """The access log's answer to "who": the client's address (as the rate limiter sees it:
    the trusted proxy's last X-Forwarded-For entry when `[limits] trust_forwarded_for`), the
    principal (node, user, or API key), the user agent, the bytes of the body, and a W3C
    `traceparent` when the client sent a valid one."""
    limiter = request.app.get(LIMITER)
    principal = request.get(PRINCIPAL)
    who: dict[str, Any] = {
        "client": limiter.client_ip(request) if limiter else request.remote,
        "principal": (
            None
            if principal is None
            else f"key:{principal.api_key}"
            if principal.api_key
            else f"{principal.kind}:{principal.id}"
        ),
        "user_agent": request.headers.get("User-Agent"),
        "bytes": size,
    }
    traceparent = request.headers.get("traceparent", "")
    if _TRACEPARENT.match(traceparent):
        who["traceparent"] = traceparent
    return who


MIN_SEQ_WAIT = 5.0  # seconds a read may wait for this instance to reach `min_seq`


async def _wait_for_min_seq(request: web.Request) -> None:
    """`?min_seq=N` (or `X-Min-Seq: N`): answer only once this instance's projections have
    applied seq N, e.g. a write acknowledged by another instance (its `X-Log-Seq`)."""
    raw = request.query.get("min_seq") or request.headers.get("X-Min-Seq")
    if raw is None:
        return
    try:
        seq = int(raw)
    except ValueError:
        raise errors.ValidationFailed("min_seq must be an integer") from None
    runtime = request.app.get(RUNTIME)
    if runtime is not None and not await runtime.wait_for_seq(seq, MIN_SEQ_WAIT):
        raise errors.Unavailable(
            f"this instance has not reached seq {seq} yet; retry", headers={"Retry-After": "1"}
        )


def _error(exc: BaseException, request: web.Request) -> web.Response:
    return error_response(error_for(exc, request.path), request[REQUEST_ID])
