"""The wiring: the one place that builds every service and starts it (STYLE.md 8).

`create_app` builds what needs no log (the authenticators, limiters, caches, the snapshotter that
opens the log) and installs the routes; `_serve`, the application's one cleanup context, opens the
log and starts the rest. Its code order *is* the start-up order, and the shutdown is that order
reversed (an `AsyncExitStack`): the log opens first and closes last; what reacts to appends
(`Runtime.react`) reacts in the order it is added here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from broker.config import Config
from broker.http import apikeys as apikeys_routes
from broker.http import console, openapi, ratelimit, redoc, system
from broker.http import events as events_routes
from broker.http import licensing as licensing_routes
from broker.http import log as log_routes
from broker.http import messages as messages_routes
from broker.http import nodes as nodes_routes
from broker.http import operators as operators_routes
from broker.http import passwords as passwords_routes
from broker.http import register as register_routes
from broker.http import telemetry as telemetry_routes
from broker.http import updates as updates_routes
from broker.http.limits import RateLimiter
from broker.http.middleware import request_context
from broker.http.routing import OpenApiCache
from broker.keys import (
    API_KEYS,
    AUTHENTICATOR,
    COMPACTOR,
    CONFIG,
    CONSOLE_FILES,
    DISPATCHER,
    FEEDS,
    HEARTBEATS,
    KEY_AUTHENTICATOR,
    LICENSING,
    LIMITER,
    MESSAGING,
    METRICS,
    NODE_OPS,
    NODES,
    OPENAPI,
    OPERATORS,
    PENDING_SOCKETS,
    REBUILDER,
    RUNTIME,
    SCRAPE_TOKEN,
    SNAPSHOTS,
    TAKEOVER,
    TELEMETRY,
    TELEMETRY_LIMITER,
    TOKENS,
    UPDATE_FILES,
    UPDATES,
    VERIFIER,
    WATCHED,
    WS_CAP,
)
from broker.metrics import Metrics
from broker.runtime import Reaction, Runtime
from broker.services import apikeys, eventlog, monitoring
from broker.services.connections import SHARED_BACKENDS, Takeover
from broker.services.delivery import Dispatcher
from broker.services.licensing import LicenseUses, Licensing
from broker.services.messaging import Messaging
from broker.services.nodeops import NodeOps
from broker.services.nodes import NodeService, build_discovery_indices
from broker.services.operators import Operators
from broker.services.telemetry import Telemetry, TenantRateLimiter
from broker.services.tokens import TokenService
from broker.services.updates import UpdateFiles, Updates
from broker.upkeep.compaction import Compactor
from broker.upkeep.snapshots import Snapshotter
from broker.upkeep.verification import Verifier
from broker.ws import nodes as node_sockets
from broker.ws import operators as operator_sockets
from broker.ws.heartbeats import HeartbeatBatch
from broker.ws.wire import Liveness

# Every route table, in the order they are installed (a route's place in the table decides nothing
# but the order of the OpenAPI document's paths).
ROUTES = (
    system.routes,
    nodes_routes.routes,
    operators_routes.routes,
    passwords_routes.routes,
    apikeys_routes.routes,
    register_routes.routes,  # POST /auth/register, off unless [auth] self_registration
    licensing_routes.routes,
    updates_routes.routes,
    telemetry_routes.routes,
    messages_routes.routes,
    node_sockets.routes,
    events_routes.routes,
    log_routes.routes,
    operator_sockets.routes,
    openapi.routes,
    redoc.routes,
    console.routes,  # the operator console's page and files (docs/console.md)
)


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[request_context],
        client_max_size=config.server.max_body_bytes,
    )
    app[CONFIG] = config
    metrics = app[METRICS] = Metrics()
    app[SNAPSHOTS] = Snapshotter(config)  # opens the log: newest valid snapshot + the tail
    tokens = app[TOKENS] = TokenService(config.auth, config.server.data_dir)
    # Bearer tokens and API keys wherever a token is accepted (a test may still replace
    # app[AUTHENTICATOR] with a stub after create_app returns).
    keys = app[KEY_AUTHENTICATOR] = apikeys.KeyAuthenticator(
        lambda: app[RUNTIME], lambda: tokens.clock()
    )
    app[AUTHENTICATOR] = apikeys.with_api_keys(keys, tokens.authenticate)
    app[NODES] = NodeService(config.auth, tokens)
    app[LIMITER] = RateLimiter(config.limits)
    if config.limits.enabled:  # the X-RateLimit-* headers; no hook to run per answer when off
        app.on_response_prepare.append(ratelimit.add_headers)
    app[TELEMETRY_LIMITER] = TenantRateLimiter(
        config.telemetry.rate_limit_per_minute, config.telemetry.rate_limit_burst
    )
    app[UPDATE_FILES] = UpdateFiles(config.server.data_dir, config.updates.max_file_bytes)
    app[REBUILDER] = eventlog.Rebuilder.for_config(config.delivery, config.events.rebuild_window)
    app[FEEDS] = eventlog.Feeds()
    app[OPENAPI] = OpenApiCache()
    app[WS_CAP] = node_sockets.connection_cap(config.delivery)
    app[PENDING_SOCKETS] = set()
    watched = monitoring.Watched(feeds=app[FEEDS], snapshots=app[SNAPSHOTS])
    metrics.registry.register(monitoring.StateCollector(watched))
    app[WATCHED] = watched
    for routes in ROUTES:
        routes.install(app)
    app.on_shutdown.append(_close_feeds)  # before the contexts unwind: feeds end their streams
    app.on_shutdown.append(node_sockets.close_all)  # aiohttp no longer knows the node sockets
    app.cleanup_ctx.append(_serve)
    app.on_startup.append(_started)  # after every cleanup context's start
    return app


async def _started(app: web.Application) -> None:
    """The start-up is over: the background work that waited for it may begin."""
    app[NODES].started.set()


async def _serve(app: web.Application) -> AsyncIterator[None]:
    config, metrics = app[CONFIG], app[METRICS]
    watched = app[WATCHED]
    async with contextlib.AsyncExitStack() as stack:
        if config.auth.metrics_token_file:  # a bad token file fails before the log opens
            token_file = Path(config.auth.metrics_token_file)
            app[SCRAPE_TOKEN] = await asyncio.to_thread(monitoring.load_scrape_token, token_file)

        # The log and the projections.
        snapshotter = app[SNAPSHOTS]
        store, projections = await snapshotter.open_log()
        stack.push_async_callback(store.close)
        runtime = Runtime(store, projections, metrics=metrics)
        stack.push_async_callback(runtime.stop)
        await runtime.start()
        app[RUNTIME] = watched.runtime = runtime
        stack.callback(setattr, watched, "runtime", None)

        # What is counted from the log, and how long its commits take.
        _react(stack, runtime, lambda envs: monitoring.count_outcomes(metrics, envs))
        if hasattr(store, "commit_observer"):  # the embedded log times its group commits
            store.commit_observer = lambda seconds, _n: metrics.commit_seconds.observe(seconds)
            stack.callback(setattr, store, "commit_observer", None)

        # Identity: tokens, nodes (and the discovery indices, built in the background).
        tokens, nodes = app[TOKENS], app[NODES]
        await tokens.start(runtime)
        stack.callback(tokens.stop)
        nodes.start(runtime)
        stack.callback(nodes.stop)
        _background(stack, build_discovery_indices(nodes), "discovery-indices")
        _background(stack, monitoring.watch_loop_lag(metrics.loop_lag.observe), "loop-lag")
        metrics.discovery_building.set_function(lambda: float(nodes.indices_building))
        # Open feeds check their credential again as soon as one may have been revoked.
        _react(stack, runtime, apikeys.on_revocations(app[FEEDS]))

        # The application's services (the handlers reach each through its key), and delivery:
        # the dispatcher pushes to connected nodes.
        uses = LicenseUses()
        stack.push_async_callback(uses.close)
        app[OPERATORS] = Operators(runtime, tokens)
        app[API_KEYS] = apikeys.ApiKeys(runtime, lambda: tokens.clock())
        app[LICENSING] = Licensing(runtime, uses)
        app[UPDATES] = Updates(runtime)
        app[TELEMETRY] = Telemetry(runtime, app[TELEMETRY_LIMITER], config.telemetry)
        messaging = app[MESSAGING] = Messaging(runtime, config.delivery)
        dispatcher = app[DISPATCHER] = Dispatcher(runtime, messaging, config.delivery)
        metrics.node_connections.set_function(lambda: len(dispatcher.connections))
        await dispatcher.start()
        stack.push_async_callback(dispatcher.stop)
        liveness = Liveness(dispatcher.connections, config.delivery.ws_heartbeat)
        _background(stack, liveness.run(), "ws-liveness")  # idle node sockets: one task for all
        app[NODE_OPS] = NodeOps(messaging, nodes, dispatcher)
        batch = app[HEARTBEATS] = HeartbeatBatch(runtime.record)
        stack.push_async_callback(batch.drain)
        # Across instances, a node's newest WebSocket wins (the shared backends).
        shared = config.store.backend in SHARED_BACKENDS
        takeover = app[TAKEOVER] = Takeover(runtime, dispatcher.connections, shared=shared)
        if shared:
            _react(stack, runtime, takeover.on_append)

        # The log's upkeep: snapshots, then compaction (a compaction takes a snapshot first).
        if snapshotter.attach(runtime):
            stack.push_async_callback(snapshotter.detach)
        compactor = app[COMPACTOR] = watched.compactor = Compactor(
            config.retention, runtime, snapshotter
        )
        if config.retention.every > 0 and Compactor.supports(store):
            _background(stack, compactor.run_every(config.retention.every), "compaction")
        # ... and verification from the verified checkpoint, in the background (sqlite).
        if config.retention.verify_every > 0 and config.store.backend == "sqlite":
            verifier = app[VERIFIER] = Verifier(
                config.store.path, config.retention.verify_every, metrics
            )
            stack.push_async_callback(verifier.close)
            _background(stack, verifier.run_every(), "verification")

        # The operator console's files, listed once.
        app[CONSOLE_FILES] = await asyncio.to_thread(console.list_assets)
        yield


async def _close_feeds(app: web.Application) -> None:
    await app[FEEDS].close_all()


def _react(stack: contextlib.AsyncExitStack, runtime: Runtime, reaction: Reaction) -> None:
    """Have `reaction` follow the projections until the stack unwinds."""
    runtime.react(reaction)
    stack.callback(runtime.unreact, reaction)


def _background(
    stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str
) -> None:
    """Run `work` as a task until the stack unwinds."""
    task = asyncio.get_running_loop().create_task(work, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
