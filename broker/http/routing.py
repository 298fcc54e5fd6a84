"""Route tables that carry, per route, who may call it and what it reads and returns.

Every handler is registered through a `Routes` table:

    routes = Routes()

    @routes.post("/api/v1/messages/send", policy=Authenticated(), body=SendRequest,
                 response=SendResponse, summary="Send a message")
    async def send(request: web.Request) -> web.Response: ...

and each module exposes `setup(app)` calling `routes.install(app)`. The auth middleware enforces
`policy` before the handler runs; the OpenAPI document is generated from the same metadata, so
no route can exist without a declared policy or be missing from the docs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Protocol

from aiohttp import StreamReader, web

from broker.http.bodies import json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Call(Protocol):
    """What the contract code (the middleware's steps, `auth`, `ratelimit`) and the answers of
    `Routes.answer` read of a request: aiohttp's `web.Request`, or the lean front's own
    (`broker.http.lean.LeanCall`) for the hot routes."""

    @property
    def app(self) -> web.Application: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def match_info(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> StreamReader: ...
    @property
    def client_max_size(self) -> int: ...

    async def read(self) -> bytes: ...
    def __getitem__(self, key: Any, /) -> Any: ...
    def __setitem__(self, key: Any, value: Any, /) -> None: ...
    def get(self, key: Any, /) -> Any: ...


# What a route declared with `Routes.answer` computes: its 2xx body as a msgspec value.
Answer = Callable[[Any], Awaitable[Any]]


class Policy:
    """Who may call a route. Subclasses live in `broker.http.auth`."""

    description = "declared"


@dataclass(frozen=True, slots=True)
class Deprecation:
    """A route being retired: answered as usual until `sunset` (an ISO date), with the headers
    of `headers()` on every answer, and marked deprecated in the OpenAPI document."""

    sunset: str
    successor: str = ""  # the path to use instead, if any

    def message(self) -> str:
        instead = f"; use {self.successor} instead" if self.successor else ""
        return f"deprecated: this route will be removed on {self.sunset}{instead}"

    def headers(self) -> dict[str, str]:
        day = date.fromisoformat(self.sunset)
        when = datetime(day.year, day.month, day.day, tzinfo=UTC)
        headers = {"X-API-Deprecated": self.message(), "Sunset": format_datetime(when, True)}
        if self.successor:
            headers["Link"] = f'<{self.successor}>; rel="successor-version"'
        return headers


@dataclass(frozen=True, slots=True)
class RouteInfo:
    method: str
    path: str
    policy: Policy
    body: Any = None  # msgspec type of the JSON body, if any
    query: Any = None  # msgspec Struct describing the query parameters, if any
    response: Any = None  # msgspec type of the 2xx JSON response, if any
    status: int = 200
    summary: str = ""
    tags: tuple[str, ...] = ()
    content_type: str = "application/json"  # of the request body
    response_content_type: str = "application/json"
    errors: tuple[int, ...] = ()  # error statuses beyond those the policy, path and body imply
    responses: dict[int, Any] = field(default_factory=dict)  # other answers: status -> body type
    deprecated: Deprecation | None = None  # X-API-Deprecated and Sunset on every answer
    extra: dict[str, Any] = field(default_factory=dict)
    answer: Answer | None = None  # `Routes.answer`: the body, without a Response (lean front)


ROUTE_INFO_ATTR = "__route_info__"


def route_info(handler: Any) -> RouteInfo | None:
    """The declared metadata of a (possibly wrapped) handler, or None."""
    return getattr(handler, ROUTE_INFO_ATTR, None)


class Routes:
    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.entries: list[tuple[RouteInfo, Handler]] = []

    def route(
        self, method: str, path: str, *, policy: Policy, **meta: Any
    ) -> Callable[[Handler], Handler]:
        if not isinstance(policy, Policy):
            raise TypeError(f"{method} {path}: policy must be a Policy")

        def register(handler: Handler) -> Handler:
            tags = meta.pop("tags", (self.tag,) if self.tag else ())
            info = RouteInfo(method.upper(), path, policy, tags=tuple(tags), **meta)

            # One handler may serve several paths (seed aliases): keep a per-path wrapper.
            async def bound(request: web.Request) -> web.StreamResponse:
                return await handler(request)

            bound.__name__ = handler.__name__
            bound.__doc__ = handler.__doc__
            setattr(bound, ROUTE_INFO_ATTR, info)
            self.entries.append((info, bound))
            return handler

        return register

    def answer(self, method: str, path: str, **kw: Any) -> Callable[[Answer], Answer]:
        """A route whose function computes the answer's JSON body (a msgspec value) from the
        request, leaving the Response to the caller: aiohttp's handler wraps it in one; the
        lean front (`broker.http.lean`) writes it straight to the socket for the same route."""

        def register(answer: Answer) -> Answer:
            status = kw.get("status", 200)

            async def handler(request: web.Request) -> web.StreamResponse:
                return json_response(await answer(request), status)

            handler.__name__, handler.__doc__ = answer.__name__, answer.__doc__
            self.route(method, path, answer=answer, **kw)(handler)
            return answer

        return register

    def get(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **kw)

    def patch(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **kw)

    def install(self, app: web.Application) -> None:
        for info, handler in self.entries:
            if info.method == "GET":
                app.router.add_get(info.path, handler, allow_head=True)
            else:
                app.router.add_route(info.method, info.path, handler)


class OpenApiCache:
    """The document and the Swagger UI asset list, built once per application."""

    def __init__(self) -> None:
        self.document: bytes | None = None
        self.assets: dict[str, Path] | None = None
