"""Every typed application key, in one module (STYLE.md 8)."""

from __future__ import annotations

from aiohttp import web

from broker.config import Config
from broker.metrics import Metrics
from broker.runtime import Runtime

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
RUNTIME = web.AppKey("runtime", Runtime)

# Per-request keys (request[...]).
REQUEST_ID = "request_id"
