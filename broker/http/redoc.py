"""ReDoc, the API reference rendered from /api/openapi.json, at /api/redoc (seed 003) and
/core-docs (seed 004). Its standalone bundle ships in this package (broker/assets/redoc): the page
loads nothing from a CDN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from broker.http.auth import Public
from broker.http.routing import Routes

routes = Routes("docs")
ASSETS = Path(__file__).parent.parent / "assets" / "redoc"
BUNDLE = ASSETS / "redoc.standalone.js"

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>fleet-broker API reference</title>
</head>
<body>
  <redoc spec-url="/api/openapi.json"></redoc>
  <script src="/api/redoc/redoc.standalone.js"></script>
</body>
</html>
"""


def _public(path: str, summary: str, content_type: str = "text/html") -> Any:
    return routes.get(path, policy=Public(), summary=summary, response_content_type=content_type)


@_public("/api/redoc", "ReDoc API reference (served from local files)")
@_public("/core-docs", "ReDoc API reference (seed 004's path)")
async def redoc_page(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE, content_type="text/html")


@_public("/api/redoc/redoc.standalone.js", "ReDoc's standalone bundle", "application/javascript")
async def redoc_bundle(request: web.Request) -> web.FileResponse:
    cache = {"Cache-Control": "public, max-age=86400", "Content-Type": "application/javascript"}
    return web.FileResponse(BUNDLE, headers=cache)
