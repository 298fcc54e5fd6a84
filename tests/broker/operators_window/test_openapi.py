"""The OpenAPI document is generated from the route tables and lists every route; Swagger UI is
served from local files."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.app import create_app
from broker.http.openapi import build_document
from broker.http.routing import route_info
from tests.broker.operators_window.conftest import Client
from tests.conftest import make_config

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def walk_refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref)
        for value in node.values():
            walk_refs(value, found)
    elif isinstance(node, list):
        for value in node:
            walk_refs(value, found)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


async def test_every_route_is_documented(client: Client) -> None:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    app: web.Application = client.app  # type: ignore[assignment]
    routes = [r for r in app.router.routes() if r.method in METHODS]
    assert len(routes) > 40
    for route in routes:
        path = route.resource.canonical  # type: ignore[union-attr]
        op = doc["paths"].get(path, {}).get(route.method.lower())
        assert op is not None, f"{route.method} {path} is missing from the OpenAPI document"
        info = route_info(route.handler)
        assert info is not None, f"{route.method} {path} declares no policy"
        assert op["summary"] == info.summary
        public = type(info.policy).__name__ == "Public"
        assert op["security"] == ([] if public else [{"bearerAuth": []}]), path
        if info.response is not None:
            assert op["responses"][str(info.status)]["content"], path
        for name in (
            "{" + seg[1:-1].split(":")[0] + "}" for seg in path.split("/") if seg[:1] == "{"
        ):
            assert any(
                p["in"] == "path" and "{" + p["name"] + "}" == name for p in op["parameters"]
            )
    # and nothing that is not a route
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(r.resource.canonical, r.method) for r in routes}  # type: ignore[union-attr]


async def test_schemas_and_refs_resolve(client: Client) -> None:
    doc = await (await client.get("/api/openapi.json")).json()
    refs: set[str] = set()
    walk_refs(doc, refs)
    for ref in refs:
        resolve(doc, ref)
    events = doc["paths"]["/api/v1/events"]["get"]
    names = {p["name"] for p in events["parameters"]}
    assert {"from_seq", "to_seq", "types", "stream", "limit", "sort_order"} <= names
    assert events["x-permission"] == "events:read"
    page = resolve(doc, events["responses"]["200"]["content"]["application/json"]["schema"]["$ref"])
    assert {"total", "skip", "limit", "items", "has_more", "next_from_seq"} <= set(
        page["properties"]
    )
    error = resolve(doc, "#/components/schemas/ErrorBody")
    assert set(error["required"]) == {"status", "statusCode", "message", "error"}
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    login = doc["paths"]["/auth/login"]["post"]
    assert "application/x-www-form-urlencoded" in login["requestBody"]["content"]


def test_document_needs_no_running_app(tmp_path: Any) -> None:
    doc = build_document(create_app(make_config(tmp_path)))
    assert "/api/v1/admin/state/{projection}" in doc["paths"]
    assert doc["paths"]["/ws"]["get"]["responses"]["101"]["description"] == "Switching Protocols"


async def test_swagger_ui_served_locally(client: Client) -> None:
    resp = await client.get("/api/docs")
    assert resp.status == 200
    html = await resp.text()
    assert "swagger-ui-bundle.js" in html and "http" not in html.split("<body>")[1]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        resp = await client.get(f"/api/docs/{asset}")
        assert resp.status == 200, asset
        assert len(await resp.read()) > 1000
    init = await (await client.get("/api/docs/swagger-initializer.js")).text()
    assert "/api/openapi.json" in init and "petstore" not in init
    assert (await client.get("/api/docs/..%2Fsecret")).status == 404
    assert (await client.get("/api/docs/nope.js")).status == 404


def test_answers_without_a_body_declare_no_content(tmp_path: Any) -> None:
    doc = build_document(create_app(make_config(tmp_path)))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status in ("101", "204", "304"):
                assert "content" not in op["responses"].get(status, {}), (method, path, status)
    assert "204" in doc["paths"]["/api/v1/nodes/{node_id}"]["delete"]["responses"]
    assert "101" in doc["paths"]["/api/v1/ws"]["get"]["responses"]


def test_every_error_status_is_declared(tmp_path: Any) -> None:
    """No `4XX` catch-all: each status a route can answer is listed, with the error body."""
    doc = build_document(create_app(make_config(tmp_path)))
    error = {"$ref": "#/components/responses/Error"}
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "4XX" not in op["responses"]
    send = doc["paths"]["/api/v1/messages/send"]["post"]["responses"]
    assert {k: v for k, v in send.items() if v == error}.keys() == {
        "400",
        "401",
        "403",
        "404",  # a recipient that does not exist
        "409",
        "413",
        "422",
        "429",
        "503",
    }
    node = doc["paths"]["/api/v1/nodes/{node_id}"]["get"]["responses"]
    assert {"401", "403", "404", "429", "503"} <= node.keys() and "409" not in node
    health = doc["paths"]["/health"]["get"]["responses"]
    assert health["503"]["content"] == health["200"]["content"]  # the same body, unhealthy
    for path in ("/auth/login", "/api/v1/auth/verify", "/api/v1/auth/refresh", "/auth/refresh"):
        assert "401" in doc["paths"][path]["post"]["responses"], path  # credentials in the body
    for path in ("/update/check", "/api/license/validate"):
        assert "400" in doc["paths"][path]["get"]["responses"], path  # seed 002's refusals
    download = doc["paths"]["/update/download/{update_id}"]["get"]["responses"]
    assert {"200", "206", "304", "404", "416"} <= download.keys()


def test_a_body_with_required_fields_is_required(tmp_path: Any) -> None:
    doc = build_document(create_app(make_config(tmp_path)))
    assert doc["paths"]["/api/v1/auth/register"]["post"]["requestBody"]["required"] is True
    refresh = doc["paths"]["/api/v1/auth/refresh"]["post"]["requestBody"]
    assert refresh["required"] is False  # the token may come as the Bearer header instead


def test_constraints_the_server_checks_are_in_the_document(tmp_path: Any) -> None:
    """What the handlers refuse with a 422 is declared: sort keys, semantic versions, role names,
    the shortest password."""
    doc = build_document(create_app(make_config(tmp_path)))

    def param(path: str, name: str) -> dict[str, Any]:
        params = doc["paths"][path]["get"]["parameters"]
        return next(p["schema"] for p in params if p["name"] == name)

    assert set(param("/api/v1/nodes", "sort_by")["enum"]) >= {"registered_at", "node_id"}
    assert param("/api/v1/events", "sort_by")["enum"] == ["seq"]
    assert set(param("/admin/roles", "sort_by")["enum"]) == {"name", "created_at"}
    assert "pattern" in param("/update/check", "version")
    schemas = doc["components"]["schemas"]
    assert "pattern" in schemas["RoleRequest"]["properties"]["name"]
    assert schemas["CreateUserRequest"]["properties"]["password"]["minLength"] == 8
