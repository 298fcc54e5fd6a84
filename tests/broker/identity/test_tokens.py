"""Tokens: the JWT matrix (each -> 401), refresh rotation and reuse detection, revocation,
persistence across restarts, JWKS, the verification cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.app import create_app
from broker.config import AuthConfig, Config
from broker.errors import AuthenticationFailed
from broker.keys import RUNTIME, TOKENS
from tests.broker.identity.helpers import (
    assert_error,
    bearer,
    login,
    node_session,
    operator_token,
    register,
)
from tests.conftest import make_config

Client = TestClient  # type: ignore[type-arg]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


def signed(client: Client, claims: dict[str, Any], key: Any = None) -> str:
    service = client.app[TOKENS]
    return jwt.encode(
        claims, key or service._private, algorithm="EdDSA", headers={"kid": service.kid}
    )


def hs256(claims: dict[str, Any], secret: bytes) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


async def status_with(client: Client, token: str) -> int:
    resp = await client.get("/api/v1/nodes", headers=bearer(token))
    if resp.status != 200:
        assert_error(await resp.json(), resp.status, "AUTHENTICATION_ERROR")
    return resp.status


async def test_a_valid_token_works(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    assert await status_with(client, tokens["access_token"]) == 200
    claims = claims_of(tokens["access_token"])
    assert {"iss", "aud", "sub", "exp", "iat", "jti", "typ"} <= set(claims)
    assert claims["typ"] == "access" and claims["kind"] == "node" and claims["sub"] == "node-1"
    assert claims["exp"] - claims["iat"] == 900
    refresh = claims_of(tokens["refresh_token"])
    assert refresh["typ"] == "refresh" and refresh["exp"] - refresh["iat"] == 30 * 86400
    assert jwt.get_unverified_header(tokens["access_token"])["alg"] == "EdDSA"


async def test_jwt_matrix_is_401(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    await register(client, "node-2", 1)
    good = claims_of(tokens["access_token"])
    now = int(time.time())
    service = client.app[TOKENS]
    public = service._public
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    header, payload, signature = tokens["access_token"].split(".")
    tampered_payload = b64(json.dumps({**good, "sub": "node-2"}).encode())
    none_header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    without_exp = {k: v for k, v in good.items() if k != "exp"}
    matrix = {
        "alg none": f"{none_header}.{payload}.",
        "alg none, no dot": f"{none_header}.{payload}",
        "HS256 keyed with our PEM public key": hs256(good, pem),
        "HS256 keyed with our raw public key": hs256(good, raw),
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "expired": signed(client, {**good, "iat": now - 4000, "exp": now - 3600}),
        "missing exp": signed(client, without_exp),
        "wrong aud": signed(client, {**good, "aud": "someone-else"}),
        "wrong iss": signed(client, {**good, "iss": "someone-else"}),
        "another key": signed(client, good, Ed25519PrivateKey.generate()),
        "refresh as access": tokens["refresh_token"],
        "unknown typ": signed(client, {**good, "typ": "id"}),
        "unknown kind": signed(client, {**good, "kind": "admin"}),
        "garbage": "garbage",
        "three garbage parts": "a.b.c",
        "empty signature": f"{header}.{payload}.",
    }
    for name, token in matrix.items():
        assert await status_with(client, token) == 401, name
    resp = await client.get("/api/v1/nodes")
    assert resp.status == 401
    resp = await client.get("/api/v1/nodes", headers={"Authorization": "Basic abc"})
    assert resp.status == 401
    assert await status_with(client, tokens["access_token"]) == 200  # the real one still works


async def test_access_token_used_as_refresh_is_401(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(tokens["access_token"]))
    assert resp.status == 401
    assert_error(await resp.json(), 401, "AUTHENTICATION_ERROR")
    for junk in ("garbage", "a.b.c"):
        resp = await client.post("/api/v1/auth/refresh", headers=bearer(junk))
        assert resp.status == 401
    resp = await client.post("/api/v1/auth/refresh")
    assert resp.status == 401


async def test_refresh_rotates_and_reuse_revokes_the_family(client: Client) -> None:
    first = await node_session(client, "node-1")
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(first["refresh_token"]))
    assert resp.status == 200
    second = await resp.json()
    assert set(second) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert second["refresh_token"] != first["refresh_token"]
    assert claims_of(second["access_token"])["fam"] == claims_of(first["access_token"])["fam"]
    assert await status_with(client, second["access_token"]) == 200

    # the rotated-out token again: refused, and the whole family is revoked
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(first["refresh_token"]))
    assert resp.status == 401
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(second["refresh_token"]))
    assert resp.status == 401
    assert await status_with(client, second["access_token"]) == 401
    assert await status_with(client, first["access_token"]) == 401
    # a fresh login is a new family and works
    third = await login(client, "node-1")
    assert await status_with(client, third["access_token"]) == 200
    store = client.app[RUNTIME].store
    revoked = [e async for e in store.read(1, types=["token.family_revoked"])]
    assert [e.event.reason for e in revoked] == ["reuse"]


async def test_refresh_token_in_json_body(client: Client) -> None:
    first = await node_session(client, "node-1")
    resp = await client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert resp.status == 200


async def test_refresh_tokens_are_stored_only_as_hashes(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    refreshed = await (
        await client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
    ).json()
    store = client.app[RUNTIME].store
    dump = b"".join([msgspec.json.encode(env.event) async for env in store.read(1)])
    for token in (tokens["refresh_token"], refreshed["refresh_token"]):
        assert token.encode() not in dump
        assert token.split(".")[2].encode() not in dump
        assert hashlib.sha256(token.encode()).hexdigest().encode() in dump


async def test_deregistered_node_tokens_stop_working(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    admin = await operator_token(client, "root", ["admin"])
    resp = await client.delete("/api/v1/nodes/node-1", headers=bearer(admin))
    assert resp.status == 204
    assert await status_with(client, tokens["access_token"]) == 401
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
    assert resp.status == 401
    # the same id registered again: the old tokens still do not work, new ones do
    await register(client, "node-1", 1)
    assert await status_with(client, tokens["access_token"]) == 401
    fresh = await login(client, "node-1", 1)
    assert await status_with(client, fresh["access_token"]) == 200


async def test_logout_revokes_access_and_refresh(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    resp = await client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    assert resp.status == 200
    assert await status_with(client, tokens["access_token"]) == 401
    resp = await client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
    assert resp.status == 401


async def test_too_many_sessions_revoke_the_oldest(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config = msgspec.structs.replace(config, auth=AuthConfig(max_sessions=2))
    async with TestClient(TestServer(create_app(config))) as client:
        first = await node_session(client, "node-1")
        second = await login(client, "node-1")
        assert await status_with(client, first["access_token"]) == 200
        third = await login(client, "node-1")
        assert await status_with(client, first["access_token"]) == 401
        assert await status_with(client, second["access_token"]) == 200
        assert await status_with(client, third["access_token"]) == 200


async def test_tokens_and_sessions_survive_a_restart(config: Config) -> None:
    async with TestClient(TestServer(create_app(config))) as client:
        tokens = await node_session(client, "node-1")
        rotated = await (
            await client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
        ).json()
        kid = client.app[TOKENS].kid
    assert (Path(config.server.data_dir) / "jwt_ed25519.pem").stat().st_mode & 0o077 == 0
    async with TestClient(TestServer(create_app(config))) as client:
        assert client.app[TOKENS].kid == kid  # the same key, read back from the data dir
        assert await status_with(client, rotated["access_token"]) == 200
        # rotation state came back from the log: the old refresh token is reuse
        resp = await client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
        assert resp.status == 401
        assert await status_with(client, rotated["access_token"]) == 401


async def test_jwks_verifies_our_tokens(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    resp = await client.get("/.well-known/jwks.json")
    assert resp.status == 200
    jwks = await resp.json()
    (key,) = jwks["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA"
    assert "d" not in key  # never the private part
    assert jwt.get_unverified_header(tokens["access_token"])["kid"] == key["kid"]
    claims = jwt.decode(
        tokens["access_token"],
        jwt.PyJWK(key).key,
        algorithms=["EdDSA"],
        audience="fleet-broker",
        issuer="fleet-broker",
    )
    assert claims["sub"] == "node-1"


async def test_cached_token_still_expires(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    service = client.app[TOKENS]
    principal = service.verify_access(tokens["access_token"], time.time())
    assert principal.kind == "node" and principal.id == "node-1"
    assert tokens["access_token"] in service._cache
    assert service.verify_access(tokens["access_token"], time.time()) is principal
    with pytest.raises(AuthenticationFailed, match="expired"):
        service.verify_access(tokens["access_token"], time.time() + 900 + 10)
    assert tokens["access_token"] not in service._cache


async def test_token_cache_is_bounded(tmp_path: Path) -> None:
    config = msgspec.structs.replace(make_config(tmp_path), auth=AuthConfig(token_cache_size=3))
    async with TestClient(TestServer(create_app(config))) as client:
        await node_session(client, "node-1")
        good = claims_of((await login(client, "node-1"))["access_token"])
        service = client.app[TOKENS]
        now = time.time()
        for i in range(10):
            token = signed(client, {**good, "jti": f"j{i}"})
            assert service.verify_access(token, now).id == "node-1"
            assert len(service._cache) <= 3


async def test_family_unseen_by_this_instance(client: Client) -> None:
    """A token whose login this instance has not applied yet (another instance issued it a moment
    ago) is accepted for a short grace period after its iat, not later."""
    tokens = await node_session(client, "node-1")
    good = claims_of(tokens["access_token"])
    now = int(time.time())
    fresh = signed(client, {**good, "fam": "rtf:elsewhere", "jti": "x1", "iat": now})
    assert await status_with(client, fresh) == 200
    old = signed(client, {**good, "fam": "rtf:elsewhere", "jti": "x2", "iat": now - 120})
    assert await status_with(client, old) == 401
