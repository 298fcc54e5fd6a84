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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
