"""Every typed application key, in one module (STYLE.md 8)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from broker.config import Config
from broker.metrics import Metrics
from broker.principal import Authenticator, Principal
from broker.runtime import Runtime

if TYPE_CHECKING:  # only the fronts (broker.http, broker.ws) and the wiring read the keys
    from broker.http.limits import Decision, RateLimiter
    from broker.http.routing import OpenApiCache
    from broker.services.apikeys import ApiKeys, KeyAuthenticator
    from broker.services.connections import Takeover
    from broker.services.delivery import Dispatcher
    from broker.services.eventlog import Feeds, Rebuilder
    from broker.services.licensing import Licensing
    from broker.services.messaging import Messaging
    from broker.services.monitoring import Watched
    from broker.services.nodeops import NodeOps
    from broker.services.nodes import NodeService
    from broker.services.operators import Operators
    from broker.services.telemetry import Telemetry, TenantRateLimiter
    from broker.services.tokens import TokenService
    from broker.services.updates import UpdateFiles, Updates
    from broker.upkeep.compaction import Compactor
    from broker.upkeep.snapshots import Snapshotter
    from broker.upkeep.verification import Verifier
    from broker.ws.heartbeats import HeartbeatBatch
    from broker.ws.nodes import NodeSocket

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
RUNTIME = web.AppKey("runtime", Runtime)

AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator")

# Identity (broker.services.tokens, broker.services.nodes) and rate limits (broker.http.limits).
TOKENS: web.AppKey[TokenService] = web.AppKey("tokens")
NODES: web.AppKey[NodeService] = web.AppKey("nodes")
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter")
API_KEYS: web.AppKey[ApiKeys] = web.AppKey("api_keys")  # broker.services.apikeys
KEY_AUTHENTICATOR: web.AppKey[KeyAuthenticator] = web.AppKey("key_authenticator")
SCRAPE_TOKEN = web.AppKey("scrape_token", str)  # SHA-256 of [auth] metrics_token_file's token

# Tenants, licenses, updates, telemetry (broker.services: licensing, updates, telemetry).
OPERATORS: web.AppKey[Operators] = web.AppKey("operators")
LICENSING: web.AppKey[Licensing] = web.AppKey("licensing")
UPDATES: web.AppKey[Updates] = web.AppKey("updates")
UPDATE_FILES: web.AppKey[UpdateFiles] = web.AppKey("update_files")
TELEMETRY_LIMITER: web.AppKey[TenantRateLimiter] = web.AppKey("telemetry_limiter")
TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry")

# Messaging (broker.services.messaging) and delivery to connected nodes (broker.services.delivery).
MESSAGING: web.AppKey[Messaging] = web.AppKey("messaging")
DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
NODE_OPS: web.AppKey[NodeOps] = web.AppKey("node_ops")  # what a node does over its socket
HEARTBEATS: web.AppKey[HeartbeatBatch] = web.AppKey("heartbeats")
WS_CAP = web.AppKey("ws_cap", int)  # node WebSockets open at once (broker.ws.nodes)
# node WebSockets upgraded whose session is not open yet (closed at shutdown: broker.ws.nodes)
PENDING_SOCKETS: web.AppKey[set[NodeSocket]] = web.AppKey("pending_sockets")
TAKEOVER: web.AppKey[Takeover] = web.AppKey("takeover")  # one connection per node, all instances

# The operators' window on the log (broker.services.eventlog, broker.http.openapi,
# broker.upkeep.snapshots).
REBUILDER: web.AppKey[Rebuilder] = web.AppKey("rebuilder")
FEEDS: web.AppKey[Feeds] = web.AppKey("feeds")
OPENAPI: web.AppKey[OpenApiCache] = web.AppKey("openapi")
SNAPSHOTS: web.AppKey[Snapshotter] = web.AppKey("snapshots")
COMPACTOR: web.AppKey[Compactor] = web.AppKey("compactor")
VERIFIER: web.AppKey[Verifier] = web.AppKey("verifier")  # background verification (sqlite)
WATCHED: web.AppKey[Watched] = web.AppKey("watched")  # what /metrics reports at scrape time
CONSOLE_FILES: web.AppKey[dict[str, Path]] = web.AppKey("console_files")  # name -> file

# Per-request keys (request[...]).
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
RATE_LIMIT: web.RequestKey[Decision] = web.RequestKey("rate_limit")  # tightest limit applied
