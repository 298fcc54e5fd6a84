"""Every typed application key, in one module (STYLE.md 8)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.config import Config
from broker.metrics import Metrics
from broker.principal import Principal
from broker.runtime import Runtime

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
RUNTIME = web.AppKey("runtime", Runtime)

# Turns a bearer token into a Principal or raises AuthenticationFailed (see broker.auth).
Authenticator = Callable[[str], Awaitable[Principal]]
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)

# Per-request keys (request[...]).
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
