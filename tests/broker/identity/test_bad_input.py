"""Bad input on identity routes: 4xx with the error body, naming the field; never a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.broker.identity.helpers import (
    assert_error,
    bearer,
    challenge,
    node_body,
    node_session,
    public_pem,
    rsa_key,
)

Client = TestClient  # type: ignore[type-arg]


def pem_of(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def expect(resp: Any, status: int, code: str, mentions: str | None = None) -> None:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert_error(body, status, code)
    if mentions is not None:
        assert mentions in body["message"] or mentions in str(body["error"]["details"])


async def test_bad_public_keys_are_422_naming_the_field(client: Client) -> None:
    small = rsa_key(9, 1024)
    private_pem = (
        rsa_key(0)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    bad_keys = {
        "garbage": "not a key",
        "truncated": public_pem(rsa_key(0))[:200],
        "small RSA": public_pem(small),
        "EC": pem_of(ec.generate_private_key(ec.SECP256R1())),
        "Ed25519": pem_of(ed25519.Ed25519PrivateKey.generate()),
        "private key": private_pem,
        "empty": "",
    }
    for name, pem in bad_keys.items():
        resp = await client.post(
            "/api/v1/auth/register", json=node_body(f"n-{len(name)}", rsa_key(0), public_key=pem)
        )
        await expect(resp, 422, "VALIDATION_ERROR", "public_key")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"node_id": "has space"}, "node_id"),
        ({"node_id": "has:colon"}, "node_id"),
        ({"node_id": ""}, "node_id"),
        ({"node_id": 42}, "node_id"),
        ({"name": ""}, "name"),
        ({"name": ["x"]}, "name"),
        ({"type": None}, "type"),
        ({"capabilities": "routing"}, "capabilities"),
        ({"capabilities": [1, 2]}, "capabilities"),
        ({"metadata": ["not", "a", "dict"]}, "metadata"),
        ({"endpoint": 8443}, "endpoint"),
    ],
)
async def test_register_wrong_types_are_422(
    client: Client, change: dict[str, Any], field: str
) -> None:
    body = {**node_body("n-1", rsa_key(0)), **change}
    resp = await client.post("/api/v1/auth/register", json=body)
    await expect(resp, 422, "VALIDATION_ERROR", field)


async def test_register_missing_fields_and_malformed_json(client: Client) -> None:
    body = node_body("n-1", rsa_key(0))
    del body["public_key"]
    await expect(
        await client.post("/api/v1/auth/register", json=body), 422, "VALIDATION_ERROR", "public_key"
    )
    for raw in (b"{", b"[]", b"null", b'"text"', b"\xff\xfe"):
        resp = await client.post(
            "/api/v1/auth/register", data=raw, headers={"Content-Type": "application/json"}
        )
        await expect(resp, 422, "VALIDATION_ERROR")


async def test_oversized_body_is_413(client: Client) -> None:
    big = node_body("n-1", rsa_key(0), metadata={"blob": "x" * (2 * 1024 * 1024)})
    resp = await client.post("/api/v1/auth/register", json=big)
    await expect(resp, 413, "PAYLOAD_TOO_LARGE")
    resp = await client.post(
        "/auth/login",
        data=b"username=a&password=" + b"x" * (2 * 1024 * 1024),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 413
    assert (await resp.json())["status"] == "error"


async def test_bad_login_and_verify_bodies(client: Client) -> None:
    await node_session(client, "node-1")
    await expect(await client.post("/api/v1/auth/login", json={}), 422, "VALIDATION_ERROR")
    await expect(
        await client.post("/api/v1/auth/login", json={"node_id": ["x"]}), 422, "VALIDATION_ERROR"
    )
    text = await challenge(client, "node-1")
    cases = [
        {"node_id": "node-1", "challenge": text},
        {"node_id": "node-1", "challenge": text, "signature": 12},
        {"node_id": "node-1", "challenge": text, "signature": "ab" * 4000},
    ]
    for body in cases:
        await expect(await client.post("/api/v1/auth/verify", json=body), 422, "VALIDATION_ERROR")
    resp = await client.post(
        "/api/v1/auth/verify", json={"node_id": "ghost", "challenge": text, "signature": "00"}
    )
    await expect(resp, 401, "AUTHENTICATION_ERROR")


async def test_bad_status_and_heartbeat_bodies(client: Client) -> None:
    token = (await node_session(client, "node-1"))["access_token"]
    for body, field in (
        ({"load": "high"}, "load"),
        ({"status": 3}, "status"),
        ({"available_resources": [1]}, "available_resources"),
        ({"metadata": "x"}, "metadata"),
    ):
        resp = await client.put("/api/v1/nodes/node-1", headers=bearer(token), json=body)
        await expect(resp, 422, "VALIDATION_ERROR", field)
    for body, field in (({"metrics": [1]}, "metrics"), ({"timestamp": {"a": 1}}, "timestamp")):
        resp = await client.post("/api/v1/nodes/node-1/heartbeat", headers=bearer(token), json=body)
        await expect(resp, 422, "VALIDATION_ERROR", field)
    resp = await client.post(
        "/api/v1/nodes/node-1/heartbeat",
        headers={**bearer(token), "Content-Type": "application/json"},
        data=b"{oops",
    )
    await expect(resp, 422, "VALIDATION_ERROR")


async def test_random_bodies_never_5xx(client: Client) -> None:
    token = (await node_session(client, "node-1"))["access_token"]
    bodies: list[Any] = [
        None,
        0,
        -1.5,
        "",
        [],
        {},
        {"node_id": None},
        {"node_id": "node-1", "challenge": None, "signature": None},
        {"node_id": "node-1" * 100},
        {"status": {"nested": [1, {"deep": True}]}, "load": 1e308},
        {"load": -0.0},
        {"refresh_token": 5},
        {"username": "a", "password": "b" * 2000},
        {"name": "x", "permissions": "nodes:read"},
    ]
    routes = [
        ("POST", "/api/v1/auth/register"),
        ("POST", "/api/v1/auth/login"),
        ("POST", "/api/v1/auth/verify"),
        ("POST", "/api/v1/auth/refresh"),
        ("PUT", "/api/v1/nodes/node-1"),
        ("POST", "/api/v1/nodes/node-1/heartbeat"),
        ("POST", "/auth/login"),
        ("POST", "/auth/refresh"),
    ]
    for method, path in routes:
        for body in bodies:
            resp = await client.request(method, path, json=body, headers=bearer(token))
            assert 400 <= resp.status < 500 or resp.status == 200, (method, path, body)
            if resp.status >= 400:
                assert (await resp.json())["status"] == "error"


@pytest.mark.parametrize(
    "query", ["per_page=null", "limit=null", "presence=null", "online=null", "sort_by=null&page=2"]
)
async def test_a_query_parameter_given_as_null_is_422(client: Client, query: str) -> None:
    """`null` is no value of an integer, enum or boolean parameter (absent is the default)."""
    tokens = await node_session(client, "nullq-1")
    resp = await client.get(f"/api/v1/nodes?{query}", headers=bearer(tokens["access_token"]))
    await expect(resp, 422, "VALIDATION_ERROR", query.split("=")[0])
    ok = await client.get("/api/v1/nodes?type=null", headers=bearer(tokens["access_token"]))
    assert ok.status == 200  # a text filter takes the word "null" as it is


async def test_operator_login_multipart_without_boundary_is_400(client: Client) -> None:
    """Schemathesis sent `multipart/form-data` with no boundary to /auth/login: a 500 before."""
    resp = await client.post(
        "/auth/login",
        data=b"username=a&password=b",
        headers={"Content-Type": "multipart/form-data"},
    )
    await expect(resp, 400, "BAD_REQUEST", "malformed form body")


async def test_a_json_value_then_garbage_is_422(client: Client) -> None:
    """Schemathesis sent `9d` and bytes that are not UTF-8: the wrong type, then not JSON."""
    resp = await client.post(
        "/api/v1/auth/login", data=b"9d\xff\x14", headers={"Content-Type": "application/json"}
    )
    await expect(resp, 422, "VALIDATION_ERROR")
