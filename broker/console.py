"""The operator console (docs/console.md): a browser app served from the package's own files.

- `GET /console`: the page (one HTML shell; the app routes by the URL's fragment).
- `GET /console/{asset}`: its scripts, styles and the vendored libraries (no CDN).
- `GET /`: a browser (`Accept: text/html`) is sent to `/console`; anything else gets the usual
  404 error body, as before.

The page holds no data: it signs in with the operator login and calls the JSON API with the
access token kept in memory (no cookie is ever set, so a cross-site request carries no
credential and CSRF has nothing to ride on). Its responses carry a strict Content-Security-Policy:
scripts, styles and connections from this origin only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from broker.auth import Public
from broker.errors import NotFound
from broker.routing import Routes

routes = Routes("console")
STATIC = Path(__file__).with_name("console_static")
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _list_assets() -> dict[str, Path]:
    """Every file under console_static by its path relative to it (blocking: in a thread)."""
    if not STATIC.is_dir():
        return {}
    return {
        p.relative_to(STATIC).as_posix(): p
        for p in STATIC.rglob("*")
        if p.is_file() and p.suffix in _TYPES
    }


_ASSETS: web.AppKey[dict[str, Path]] = web.AppKey("console_assets", dict)


async def _load_assets(app: web.Application) -> None:
    app[_ASSETS] = await asyncio.to_thread(_list_assets)


async def _file(request: web.Request, name: str, cache: str) -> web.FileResponse:
    path = request.app[_ASSETS].get(name)
    if path is None:
        raise NotFound(f"Not found: {request.path}")
    headers = {**HEADERS, "Cache-Control": cache, "Content-Type": _TYPES[path.suffix]}
    return web.FileResponse(path, headers=headers)


@routes.get(
    "/console",
    policy=Public(),
    summary="The operator console (a browser page; it signs in with /auth/login)",
    response_content_type="text/html",
)
async def console_page(request: web.Request) -> web.FileResponse:
    return await _file(request, "index.html", "no-cache")


@routes.get(
    "/console/{asset:.+}",
    policy=Public(),
    summary="The operator console's scripts, styles and libraries",
    response_content_type="application/octet-stream",
)
async def console_asset(request: web.Request) -> web.FileResponse:
    # no-cache: revalidated (ETag / Last-Modified) so an upgraded server is seen at once
    return await _file(request, request.match_info["asset"], "no-cache")


@routes.get(
    "/",
    policy=Public(),
    summary="A browser is sent to the console (/console); other clients get 404",
    response_content_type="text/html",
    errors=(404,),
)
async def root(request: web.Request) -> web.StreamResponse:
    if "text/html" in request.headers.get("Accept", ""):
        raise web.HTTPFound("/console")
    raise NotFound("Not found: / (the API is under /api/v1; the console at /console)")


def setup(app: web.Application) -> None:
    app.on_startup.append(_load_assets)
    routes.install(app)
