"""ReDoc, the API reference rendered from /api/openapi.json, at /api/redoc (seed 003) and
/core-docs (seed 004). Its standalone bundle ships in this package (broker/assets/redoc): the page
loads nothing from a CDN."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from broker.auth import Public
from broker.routing import Routes

routes = Routes("docs")
ASSETS = Path(__file__).parent / "assets" / "redoc"
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


@routes.get(
    "/api/redoc",
    policy=Public(),
    summary="ReDoc API reference (served from local files)",
    response_content_type="text/html",
)
@routes.get(
    "/core-docs",
    policy=Public(),
    summary="ReDoc API reference (seed 004's path)",
    response_content_type="text/html",
)
async def redoc_page(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE, content_type="text/html")


@routes.get(
    "/api/redoc/redoc.standalone.js",
    policy=Public(),
    summary="ReDoc's standalone bundle",
    response_content_type="application/javascript",
)
async def redoc_bundle(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        BUNDLE,
        headers={
            "Cache-Control": "public, max-age=86400",
            "Content-Type": "application/javascript",
        },
    )


def setup(app: web.Application) -> None:
    routes.install(app)
