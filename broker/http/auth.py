"""Who is calling, and may they: principals, route policies, and `admit` enforcing them.

Token verification itself is pluggable: `app[AUTHENTICATOR]` turns a bearer token into a
`Principal` or raises AuthenticationFailed (the token service in `broker.services.tokens`
provides it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from broker.errors import AuthenticationFailed, Forbidden
from broker.http.routing import Call, Policy, RouteInfo
from broker.keys import AUTHENTICATOR, PRINCIPAL
from broker.principal import Principal

# --- policies ---


class Public(Policy):
    """Anyone, no token needed."""

    description = "public"


@dataclass(frozen=True)
class Authenticated(Policy):
    """Any valid access token; `kinds` narrows it to nodes or operators."""

    kinds: tuple[str, ...] = ("node", "user")

    @property
    def description(self) -> str:  # type: ignore[override]
        return "any valid token" if len(self.kinds) == 2 else f"{self.kinds[0]} token"


@dataclass(frozen=True)
class Permission(Policy):
    """An operator holding `permission`. With `node_self`, also the node named by the path
    parameter `node_self` (e.g. `node_id`) acting on itself."""

    permission: str
    node_self: str | None = None

    @property
    def description(self) -> str:  # type: ignore[override]
        who = f"operator with {self.permission}"
        return f"the node itself or {who}" if self.node_self else who


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def credential(headers: Mapping[str, str]) -> str | None:
    """The caller's credential as an `Authorization` value: the Authorization header, or else an
    `X-API-Key` header (an API key, broker.services.apikeys) presented as a bearer token."""
    header = headers.get("Authorization")
    if header is None and (key := headers.get("X-API-Key", "").strip()):
        return f"Bearer {key}"
    return header


async def authenticate(app: web.Application, header: str | None) -> Principal:
    token = bearer_token(header)
    if token is None:
        raise AuthenticationFailed(
            "missing bearer token", headers={"WWW-Authenticate": 'Bearer realm="broker"'}
        )
    authenticator = app.get(AUTHENTICATOR)
    if authenticator is None:
        raise AuthenticationFailed("token authentication is not configured")
    return await authenticator(token)


def check(policy: Policy, principal: Principal, request: Call) -> None:
    """Raise Forbidden unless `principal` passes `policy` for this request."""
    if isinstance(policy, Authenticated):
        if principal.kind not in policy.kinds:
            raise Forbidden(f"this route is for {' or '.join(policy.kinds)} tokens")
        return
    if isinstance(policy, Permission):
        if policy.node_self and principal.is_node:
            if request.match_info.get(policy.node_self) == principal.id:
                return
            raise Forbidden("a node may only act on itself")
        if not principal.can(policy.permission):
            raise Forbidden(f"missing permission {policy.permission}")
        return
    raise Forbidden("route policy not understood")


async def admit(request: Call, info: RouteInfo | None, principal: Principal | None) -> None:
    """Enforce the route's policy: pass public routes and aiohttp's own answers (404/405, raised
    by their handler), refuse a route of the router without a declared policy (fail closed),
    else authenticate the caller (unless the rate limiter already did: `principal`), check the
    policy and keep the principal on the request (`principal_of`). Called by the one middleware,
    `broker.http.middleware.request_context`, after the rate limit."""
    if info is None:
        match_info = request.match_info  # a route without metadata is aiohttp's only
        if (
            isinstance(match_info, web.UrlMappingMatchInfo)
            and match_info.http_exception is None
            and isinstance(match_info.route, web.AbstractRoute)
        ):
            raise Forbidden("this route declares no access policy")
        return
    if isinstance(info.policy, Public):
        return
    if principal is None:
        principal = await authenticate(request.app, credential(request.headers))
    check(info.policy, principal, request)
    request[PRINCIPAL] = principal


def principal_of(request: Call) -> Principal:
    return request[PRINCIPAL]
