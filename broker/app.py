"""The application factory: the only place that wires things (STYLE.md 8)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from broker.config import Config
from broker.http import apikeys as routes_apikeys
from broker.http import console, openapi, ratelimit, redoc, system
from broker.http import events as routes_events
from broker.http import licensing as routes_licensing
from broker.http import log as routes_log
from broker.http import messages as routes_messages
from broker.http import nodes as routes_nodes
from broker.http import operators as routes_operators
from broker.http import passwords as routes_passwords
from broker.http import register as routes_register
from broker.http import telemetry as routes_telemetry
from broker.http import updates as routes_updates
from broker.http.auth import auth_middleware
from broker.http.middleware import request_context
from broker.keys import CONFIG, METRICS, RUNTIME, SNAPSHOTS
from broker.metrics import Metrics
from broker.runtime import Runtime
from broker.services import connections, tokens
from broker.upkeep import compaction, snapshots
from broker.ws import nodes as ws_nodes
from broker.ws import operators as ws_operators


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
    console.setup(app)  # the operator console's page and files (docs/console.md)
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
