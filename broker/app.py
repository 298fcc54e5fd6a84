"""The application factory: the only place that wires things (STYLE.md 8)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from broker import (
    compaction,
    connections,
    openapi,
    ratelimit,
    redoc,
    routes_apikeys,
    routes_events,
    routes_licensing,
    routes_log,
    routes_messages,
    routes_nodes,
    routes_operators,
    routes_passwords,
    routes_register,
    routes_telemetry,
    routes_updates,
    snapshots,
    system,
    tokens,
    ws_nodes,
    ws_operators,
)
from broker.auth import auth_middleware
from broker.config import Config
from broker.keys import CONFIG, METRICS, RUNTIME, SNAPSHOTS
from broker.metrics import Metrics
from broker.middleware import request_context
from broker.runtime import Runtime


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[request_context, ratelimit.rate_limit, auth_middleware],
        client_max_size=config.server.max_body_bytes,
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_runtime_ctx)
    tokens.setup(app)  # the real authenticator; its context needs the runtime's
    ratelimit.setup(app)
    system.setup(app)
    routes_nodes.setup(app)
    routes_operators.setup(app)
    routes_passwords.setup(app)
    routes_apikeys.setup(app)  # API keys wherever tokens are accepted: after tokens.setup
    routes_register.setup(app)  # POST /auth/register, off unless [auth] self_registration
    routes_licensing.setup(app)
    routes_updates.setup(app)
    routes_telemetry.setup(app)
    routes_messages.setup(app)
    ws_nodes.setup(app)
    connections.setup(app)  # across instances, a node's newest WebSocket wins (nats backend)
    routes_events.setup(app)
    routes_log.setup(app)
    ws_operators.setup(app)
    openapi.setup(app)
    redoc.setup(app)
    snapshots.setup(app)
    compaction.setup(app)  # after snapshots: a compaction takes one first
    return app


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    store, projections = await app[SNAPSHOTS].open_log()  # newest valid snapshot + the tail
    runtime = Runtime(store, projections, metrics=app[METRICS])
    try:
        await runtime.start()
        app[RUNTIME] = runtime
        yield
    finally:
        await runtime.stop()
        await store.close()
