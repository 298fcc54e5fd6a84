"""Request rate limits: in-process token buckets per IP and per principal (DESIGN.md §6).

- A request with a valid token is charged to its principal (`[limits] per_principal`); one without
  (public routes, a missing or invalid token, unknown paths) to its IP (`per_ip`).
- Routes declaring `extra={"rate_limit": "login"}` (node login and verify, operator login) use the
  stricter `login_per_ip`, and their handlers also charge the node id or username they act on
  (`charge_subject`, `login_per_subject`).
- Every response carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`
  (epoch seconds when the bucket is full again) of the tightest bucket charged; past a limit the
  answer is 429 RATE_LIMIT with `Retry-After`.

A bucket of `limit` tokens refills at `limit / window` per second, so a burst of `limit` requests is
allowed, then a steady `limit` per window. Buckets live in this process only: behind several broker
instances each enforces its own share. (No rate-limit library is among the dependencies; the
algorithm is a dozen lines.)
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping

from aiohttp import web

from broker.errors import AuthenticationFailed, RateLimited
from broker.http.auth import Public, authenticate, credential
from broker.http.limits import Decision, RateLimiter
from broker.http.routing import Call, RouteInfo
from broker.keys import LIMITER, RATE_LIMIT
from broker.principal import Principal

LOGIN = "login"  # the value of RouteInfo.extra["rate_limit"] on login routes


def _denied(decision: Decision, what: str) -> RateLimited:
    wait = max(1, math.ceil(decision.retry_after))
    return RateLimited(
        f"rate limit exceeded for this {what}; retry in {wait} s",
        headers=decision.headers(),
    )


def charge_subject(request: web.Request, subject: str) -> None:
    """Charge a login-type request to the node id or username it names (429 past the limit)."""
    limiter = request.app.get(LIMITER)
    if limiter is None or not limiter.enabled:
        return
    decision = limiter.hit(limiter.login_subject, subject)
    if not decision.allowed:
        raise _denied(decision, "account")
    current = request.get(RATE_LIMIT)
    if current is None or decision.remaining < current.remaining:
        request[RATE_LIMIT] = decision


async def charge(request: Call, limiter: RateLimiter, info: RouteInfo | None) -> Principal | None:
    """Charge the request (refusing it past the limit) and return the principal authenticated to
    charge it, if any, for `broker.http.auth.admit` to authorise without verifying the token
    again. Called by the one middleware (`broker.http.middleware.request_context`) before auth,
    with `[limits]` on; `add_headers` (an on_response_prepare hook) puts the X-RateLimit-*
    headers on whatever response goes out, errors included."""
    if info is None or isinstance(info.policy, Public):
        login = info is not None and info.extra.get("rate_limit") == LOGIN
        decision = limiter.hit(
            limiter.login_ip if login else limiter.ip, limiter.client_ip(request)
        )
        request[RATE_LIMIT] = decision
        if not decision.allowed:
            raise _denied(decision, "address")
        return None
    try:
        principal = await authenticate(request.app, credential(request.headers))
    except AuthenticationFailed:
        decision = request[RATE_LIMIT] = limiter.hit(limiter.ip, limiter.client_ip(request))
        if not decision.allowed:
            raise _denied(decision, "address") from None
        raise
    decision = request[RATE_LIMIT] = limiter.hit(
        limiter.principal, f"{principal.kind}:{principal.id}"
    )
    if not decision.allowed:
        raise _denied(decision, "token")
    return principal


async def add_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    put_headers(request, response.headers)  # type: ignore[arg-type]


def put_headers(request: Call, headers: MutableMapping[str, str]) -> None:
    """The X-RateLimit-* headers of the tightest bucket charged, where the answer has none:
    `add_headers` on aiohttp's answers, the lean front (broker.http.lean) on its own."""
    decision = request.get(RATE_LIMIT)
    if decision is not None:
        for name, value in decision.headers().items():
            headers.setdefault(name, value)
