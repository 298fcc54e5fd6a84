"""ReDoc at /api/redoc and /core-docs from files shipped in the package, /api/docs/ with a trailing
slash, and the X-API-Deprecated mechanism for routes being retired."""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config
from broker.http.auth import Public
from broker.http.routing import Deprecation, Routes

Client = TestClient  # type: ignore[type-arg]


async def test_redoc_pages_load_nothing_remote(client: Client) -> None:
    for path in ("/api/redoc", "/core-docs"):
        resp = await client.get(path)
        assert resp.status == 200 and resp.content_type == "text/html"
        html = await resp.text()
        assert 'spec-url="/api/openapi.json"' in html
        # every script and link of the page is a path on this server
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources == ["/api/redoc/redoc.standalone.js"]
    bundle = await client.get("/api/redoc/redoc.standalone.js")
    assert bundle.status == 200
    assert "javascript" in bundle.content_type
    body = await bundle.read()
    assert len(body) > 500_000 and b"Redoc" in body[:1000]


async def test_swagger_ui_with_trailing_slash(client: Client) -> None:
    plain, slashed = await client.get("/api/docs"), await client.get("/api/docs/")
    assert plain.status == slashed.status == 200
    assert await plain.text() == await slashed.text()


async def test_deprecated_route_headers_and_document(config: Config) -> None:
    routes = Routes("test")
    retiring = Deprecation(sunset="2027-06-30", successor="/api/v1/health")

    @routes.get("/old-health", policy=Public(), summary="Old health", deprecated=retiring)
    async def old(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @routes.get("/old-missing", policy=Public(), summary="Gone soon", deprecated=retiring)
    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = create_app(config)
    routes.install(app)
    async with TestClient(TestServer(app)) as c:
        for path, status in (("/old-health", 200), ("/old-missing", 404)):
            resp = await c.get(path)
            assert resp.status == status
            assert resp.headers["X-API-Deprecated"] == (
                "deprecated: this route will be removed on 2027-06-30; use /api/v1/health instead"
            )
            assert resp.headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
            assert resp.headers["Link"] == '</api/v1/health>; rel="successor-version"'
        current = await c.get("/health")
        assert "X-API-Deprecated" not in current.headers and "Sunset" not in current.headers
        doc = await (await c.get("/api/openapi.json")).json()
        op = doc["paths"]["/old-health"]["get"]
        assert op["deprecated"] is True and "2027-06-30" in op["description"]
        assert "deprecated" not in doc["paths"]["/health"]["get"]
