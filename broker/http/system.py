"""System routes: health and Prometheus metrics."""

from __future__ import annotations

import hmac
import time
from typing import Any

import msgspec
from aiohttp import web

from broker import __version__
from broker.errors import Forbidden
from broker.http.auth import Public, authenticate, bearer_token, credential
from broker.http.bodies import json_response
from broker.http.routing import Routes
from broker.keys import METRICS, RUNTIME, SCRAPE_TOKEN
from broker.metrics import CONTENT_TYPE
from broker.services import monitoring

routes = Routes("system")


class HealthCheck(msgspec.Struct):
    status: str
    checks: dict[str, dict[str, Any]]
    version: str
    uptime: float


# 503 with the same body when the event log cannot be read.
UNHEALTHY = {503: HealthCheck}


@routes.get("/health", policy=Public(), response=HealthCheck, responses=UNHEALTHY, summary="Health")
@routes.get(
    "/api/v1/health", policy=Public(), response=HealthCheck, responses=UNHEALTHY, summary="Health"
)
async def health(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        head = await runtime.store.head()
        store = {"status": "ok", "backend": type(runtime.store).__name__, "head_seq": head}
        if hasattr(runtime.store, "health"):  # backend-specific state (nats: the stream's)
            store.update(await runtime.store.health())
    except Exception as exc:  # a health check reports, it does not fail
        head = runtime.projections.seq
        store = {"status": "error", "error": str(exc)}
    lag = max(0, head - runtime.projections.seq)
    checks = {
        "store": store,
        "projections": {
            "status": "ok" if lag == 0 else "catching_up",
            "seq": runtime.projections.seq,
            "lag": lag,
        },
    }
    healthy = store["status"] in ("ok", "degraded")  # degraded: writes refused, reads served
    return json_response(
        {
            "status": ("healthy" if store["status"] == "ok" else "degraded")
            if healthy
            else "unhealthy",
            "checks": checks,
            "version": __version__,
            "uptime": round(time.time() - runtime.started_at, 3),
        },
        status=200 if healthy else 503,
    )


# Public to the middleware: `_may_read_metrics` checks the caller (a token, a metrics:read
# API key, or the scrape token, which opens this route only).
@routes.get(
    "/metrics",
    policy=Public(),
    response_content_type=CONTENT_TYPE,
    summary="Metrics",
    errors=(401, 403),
)
@routes.get(
    "/api/v1/metrics",
    policy=Public(),
    response_content_type=CONTENT_TYPE,
    summary="Prometheus metrics (any token, a metrics:read API key, or the scrape token)",
    errors=(401, 403),
)
async def metrics(request: web.Request) -> web.Response:
    await _may_read_metrics(request)
    runtime = request.app[RUNTIME]
    m = request.app[METRICS]
    head = await runtime.store.head()
    m.head_seq.set(head)
    m.projection_seq.set(runtime.projections.seq)
    m.projection_lag.set(max(0, head - runtime.projections.seq))
    await m.refresh_process()
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})


async def _may_read_metrics(request: web.Request) -> None:
    """Let the caller read the metrics, or raise 401/403: the scrape token, any valid token, or
    an API key holding `metrics:read` (broker.services.monitoring)."""
    header = credential(request.headers)
    digest = request.app.get(SCRAPE_TOKEN)
    token = bearer_token(header)
    if digest and token is not None and hmac.compare_digest(monitoring.digest(token), digest):
        return
    principal = await authenticate(request.app, header)
    if principal.api_key and not principal.can(monitoring.READ):
        raise Forbidden(f"missing permission {monitoring.READ}")
