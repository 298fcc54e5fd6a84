"""System routes: health and Prometheus metrics."""

from __future__ import annotations

import time

from aiohttp import web

from broker import __version__
from broker.http import json_response
from broker.keys import METRICS, RUNTIME
from broker.metrics import CONTENT_TYPE


async def health(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        head = await runtime.store.head()
        store = {"status": "ok", "backend": type(runtime.store).__name__, "head_seq": head}
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
    healthy = store["status"] == "ok"
    return json_response(
        {
            "status": "healthy" if healthy else "unhealthy",
            "checks": checks,
            "version": __version__,
            "uptime": round(time.time() - runtime.started_at, 3),
        },
        status=200 if healthy else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    m = request.app[METRICS]
    head = await runtime.store.head()
    m.head_seq.set(head)
    m.projection_seq.set(runtime.projections.seq)
    m.projection_lag.set(max(0, head - runtime.projections.seq))
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})


def setup(app: web.Application) -> None:
    for prefix in ("", "/api/v1"):
        app.router.add_get(f"{prefix}/health", health)
        app.router.add_get(f"{prefix}/metrics", metrics)
