"""The OpenAPI 3.1 document, generated from the route tables, and Swagger UI served locally.

Every route registered through `broker.http.routing.Routes` carries its policy, its msgspec body,
query and response types, a summary and tags; `build_document` walks `app.router`, reads each
handler's `RouteInfo` and turns the types into JSON Schema with `msgspec.json.schema_components`
(shared under `#/components/schemas`). Nothing is kept by hand, so the document cannot drift from
the routes. Swagger UI's files come from the `swagger-ui-bundle-v2` package (no CDN).
"""

from __future__ import annotations

import asyncio
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from broker import __version__
from broker.errors import NotFound, Unavailable
from broker.http.auth import Authenticated, Permission, Public
from broker.http.routing import Policy, RouteInfo, Routes, route_info
from broker.keys import OPENAPI

routes = Routes("docs")
REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"{(\w+)(?::[^}]*)?}")
_METHODS = ("GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE")
DESCRIPTION = (
    "Event-sourced message broker for fleets of nodes and their operators. Every change is an "
    "event in one ordered log; see docs/api.md for the flows and docs/websocket.md for the "
    "WebSocket protocols. Authenticate with `Authorization: Bearer <access token>` (node tokens "
    "from /api/v1/auth/verify, operator tokens from /auth/login)."
)


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    details: list[Any]
    timestamp: str
    request_id: str


class ErrorBody(msgspec.Struct):
    """The one error body of every route (DESIGN.md §6)."""

    status: str
    statusCode: int  # noqa: N815 - the seed clients' spelling
    message: str
    error: ErrorDetail


# --- the document ---


HEADER = {"type": "string", "minLength": 1, "pattern": "^[!-~]+$"}  # a header's printable value


def _security(policy: Policy) -> list[dict[str, list[str]]]:
    return [] if isinstance(policy, Public) else [{"bearerAuth": []}]


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without the `null` branch (absent means None)."""
    any_of = schema.get("anyOf")
    if not any_of:
        return schema
    rest = [s for s in any_of if s != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    if out.get("default", 0) is None:
        del out["default"]
    if len(rest) == 1:
        return {**rest[0], **out}
    return {**out, "anyOf": rest}


def _operation_id(method: str, path: str, seen: set[str]) -> str:
    base = method.lower() + "_" + (re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root")
    op_id, n = base, 2
    while op_id in seen:
        op_id, n = f"{base}_{n}", n + 1
    seen.add(op_id)
    return op_id


def _schemas(types: list[Any]) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """JSON Schema per type (by position in `types`) and the shared components."""
    try:
        found, components = msgspec.json.schema_components(types, ref_template=REF)
        return dict(enumerate(found)), components
    except Exception:  # one bad type must not take the whole document down
        out: dict[int, dict[str, Any]] = {}
        components = {}
        for i, t in enumerate(types):
            try:
                (schema,), more = msgspec.json.schema_components([t], ref_template=REF)
            except Exception as exc:
                schema, more = {"description": f"(no schema: {exc})"}, {}
            out[i] = schema
            components.update(more)
        return out, components


_WRITES = ("POST", "PUT", "PATCH", "DELETE")
_NO_CONTENT = (101, 204, 304)  # answers that carry no body


def _error_responses(info: RouteInfo, path: str) -> dict[str, Any]:
    """Every error status the route can answer, each with the one error body: what the policy,
    the path, the body and the method imply, plus what the route declares itself (`errors`)."""
    codes: set[int] = {429, 503}  # rate limits; the log unavailable (or `min_seq` not reached)
    if info.body is not None:
        codes |= {400, 413, 422}  # malformed, too large, invalid
    if info.query is not None:
        codes.add(422)
    if not isinstance(info.policy, Public):
        codes.add(401)
        if isinstance(info.policy, Authenticated | Permission):
            codes.add(403)
    if "{" in path or info.body is not None or info.query is not None:
        codes.add(404)  # the resource named by the path, or one the body or query refers to
    if info.method in _WRITES:
        codes.add(409)  # a concurrent change of the same resource
    if info.extra.get("websocket"):
        codes |= {400, 401, 403}  # not an upgrade; a bad token or a refused Origin at upgrade
    codes |= set(info.errors)
    codes -= {info.status}
    ref = {"$ref": "#/components/responses/Error"}
    return {str(code): ref for code in sorted(codes)}


def _request_body(info: RouteInfo, schema: dict[str, Any], components: dict[str, Any]) -> Any:
    """The request body; required when its type has required fields (an empty body is `{}`)."""
    component = components.get(schema.get("$ref", "").rsplit("/", 1)[-1], schema)
    return {
        "required": bool(component.get("required")),
        "content": {info.content_type or "application/json": {"schema": schema}},
    }


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of `app`."""
    entries: list[tuple[str, str, RouteInfo | None]] = []
    for route in app.router.routes():
        if route.method not in _METHODS or route.resource is None:
            continue  # HEAD twins of GET routes, "*" catch-alls
        entries.append((route.method, route.resource.canonical, route_info(route.handler)))

    types: list[Any] = [ErrorBody]
    index: dict[int, int] = {}  # id(type) -> position in `types`
    for _m, _p, info in entries:
        for t in (info.body, info.query, info.response, *info.responses.values()) if info else ():
            if isinstance(t, str):
                continue
            if t is not None and id(t) not in index:
                index[id(t)] = len(types)
                types.append(t)
    schemas, components = _schemas(types)

    def schema_of(t: Any) -> dict[str, Any]:
        return schemas[index[id(t)]]

    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    tags: dict[str, None] = {}
    for method, path, info in entries:
        op: dict[str, Any] = {"operationId": _operation_id(method, path, seen)}
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAM.findall(path)
        ]
        if info is None:  # refused by the auth middleware; listed so nothing is hidden
            op.update(
                summary="(undeclared route: refused)",
                responses={"403": {"$ref": "#/components/responses/Error"}},
            )
            paths.setdefault(path, {})[method.lower()] = op
            continue
        op["summary"] = info.summary or f"{method} {path}"
        if info.tags:
            op["tags"] = list(info.tags)
            tags.update(dict.fromkeys(info.tags))
        op["description"] = f"Access: {info.policy.description}."
        if info.deprecated is not None:
            op["deprecated"] = True
            message = info.deprecated.message()
            op["description"] += f" {message[0].upper()}{message[1:]}."
        if info.extra.get("websocket"):
            op["description"] += " WebSocket: see docs/websocket.md."
        op["security"] = _security(info.policy)
        if isinstance(info.policy, Permission):
            op["x-permission"] = info.policy.permission
        if info.query is not None:
            qs = schema_of(info.query)
            component = components.get(qs.get("$ref", "").rsplit("/", 1)[-1], qs)
            required = set(component.get("required", ()))
            for name, prop in component.get("properties", {}).items():
                params.append(
                    {
                        "name": name,
                        "in": "query",
                        "required": name in required,
                        "schema": _non_null(prop),
                    }
                )
        for name in info.extra.get("headers", ()):  # a credential read from a header
            params.append({"name": name, "in": "header", "required": True, "schema": HEADER})
        if params:
            op["parameters"] = params
        if info.body is not None:
            op["requestBody"] = _request_body(info, schema_of(info.body), components)
        ok: dict[str, Any] = {"description": HTTPStatus(info.status).phrase}
        if info.status in _NO_CONTENT:
            pass
        elif info.response is not None:
            ok["content"] = {
                info.response_content_type or "application/json": {
                    "schema": schema_of(info.response)
                }
            }
        elif info.response_content_type:
            binary = not info.response_content_type.startswith("text/")
            string = {"type": "string", **({"format": "binary"} if binary else {})}
            ok["content"] = {info.response_content_type: {"schema": string}}
        responses = {str(info.status): ok, **_error_responses(info, path)}
        for status, body in info.responses.items():
            answer: dict[str, Any] = {"description": HTTPStatus(status).phrase}
            if isinstance(body, str):  # a content type, not JSON
                answer["content"] = {body: {"schema": {"type": "string", "format": "binary"}}}
            elif body is not None:
                answer["content"] = {"application/json": {"schema": schema_of(body)}}
            responses[str(status)] = answer
        op["responses"] = dict(sorted(responses.items()))
        paths.setdefault(path, {})[method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {"title": "fleet-broker", "version": __version__, "description": DESCRIPTION},
        "tags": [{"name": t} for t in tags],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                "Error": {
                    "description": "Error (the one error body; docs/errors.md lists the codes)",
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(name="ErrorBody")}}
                    },
                }
            },
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


@routes.get(
    "/api/openapi.json",
    policy=Public(),
    summary="This OpenAPI 3.1 document",
    response_content_type="application/json",
)
async def openapi_json(request: web.Request) -> web.Response:
    cache = request.app[OPENAPI]
    if cache.document is None:
        cache.document = msgspec.json.encode(build_document(request.app))
    return web.Response(body=cache.document, content_type="application/json")


# --- Swagger UI ---

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>fleet-broker API</title>
  <link rel="stylesheet" href="/api/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/api/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api/docs/swagger-ui-bundle.js"></script>
  <script src="/api/docs/swagger-ui-standalone-preset.js"></script>
  <script src="/api/docs/swagger-initializer.js"></script>
</body>
</html>
"""

_INITIALIZER = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/api/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout"
  });
};
"""


def _list_assets() -> dict[str, Path]:
    """The files of the installed Swagger UI distribution (blocking: run in a thread)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return {}
    root = Path(str(swagger_ui_path))
    if not root.is_dir():
        return {}
    return {p.name: p for p in root.iterdir() if p.is_file() and p.name != "index.html"}


async def _assets(app: web.Application) -> dict[str, Path]:
    cache = app[OPENAPI]
    if cache.assets is None:
        cache.assets = await asyncio.to_thread(_list_assets)
    return cache.assets


@routes.get(
    "/api/docs",
    policy=Public(),
    summary="Swagger UI (served from local files)",
    response_content_type="text/html",
)
@routes.get(
    "/api/docs/",
    policy=Public(),
    summary="Swagger UI (the same page, with a trailing slash)",
    response_content_type="text/html",
)
async def docs_page(request: web.Request) -> web.Response:
    if "swagger-ui-bundle.js" not in await _assets(request.app):
        raise Unavailable(
            "Swagger UI is not installed on this server (pip install swagger-ui-bundle-v2); "
            "the document itself is at /api/openapi.json"
        )
    return web.Response(text=_PAGE, content_type="text/html")


@routes.get(
    "/api/docs/swagger-initializer.js",
    policy=Public(),
    summary="Swagger UI set-up (points it at /api/openapi.json)",
    response_content_type="application/javascript",
)
async def docs_initializer(request: web.Request) -> web.Response:
    return web.Response(text=_INITIALIZER, content_type="application/javascript")


@routes.get(
    "/api/docs/{asset}",
    policy=Public(),
    summary="Swagger UI files",
    response_content_type="application/octet-stream",
)
async def docs_asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["asset"]
    path = (await _assets(request.app)).get(name)
    if path is None:
        raise NotFound(f"Not found: {request.path}")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})
