"""Tenants and licenses: the admin API, the node's validation, its errors, and usage counting."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from broker.keys import OPERATORS, RUNTIME
from broker.services.licensing import LicenseUses, hash_key
from eventstore.base import ConcurrencyError
from tests.broker.tenancy.conftest import LICENSES_ONLY, NODE, VIEWER, Admin, auth

KEY_FORMAT = re.compile(r"^[A-Z2-7]{8}-[A-Z2-7]{8}-[A-Z2-7]{8}-[A-Z2-7]{8}$")


def assert_error(body: dict[str, Any], status: int, code: str, message: str | None = None) -> None:
    assert body["status"] == "error"
    assert body["statusCode"] == status
    assert body["error"]["code"] == code
    assert body["error"]["message"] == body["message"]
    if message is not None:
        assert body["message"] == message


async def validate(api: TestClient, key: str) -> tuple[int, dict[str, Any]]:  # type: ignore[type-arg]
    resp = await api.get("/api/license/validate", params={"key": key})
    return resp.status, await resp.json()


# --- tenants ---


async def test_tenant_crud_list_search_and_paging(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    created = await admin.tenant("Acme Corporation")
    assert set(created) >= {"id", "name", "active", "created_at"}
    assert created["active"] is True and created["created_at"].endswith("Z")
    for name in ("Globex", "Initech", "Umbrella", "Acme Labs"):
        await admin.tenant(name)

    resp = await api.get("/api/v1/admin/tenants", params={"search": "acme"}, headers=auth())
    page = await resp.json()
    assert page["total"] == 2 and {t["name"] for t in page["items"]} == {
        "Acme Corporation",
        "Acme Labs",
    }
    resp = await api.get(
        "/api/v1/admin/tenants",
        params={"sort_by": "name", "sort_order": "desc", "skip": "1", "limit": "2"},
        headers=auth(),
    )
    page = await resp.json()
    assert [t["name"] for t in page["items"]] == ["Initech", "Globex"]
    assert (page["total"], page["skip"], page["limit"], page["has_more"]) == (5, 1, 2, True)
    resp = await api.get(
        "/api/v1/admin/tenants", params={"page": "3", "per_page": "2"}, headers=auth()
    )
    page = await resp.json()
    assert (page["skip"], page["limit"], len(page["items"]), page["has_more"]) == (4, 2, 1, False)

    resp = await api.patch(
        f"/api/v1/admin/tenants/{created['id']}",
        json={"name": "Acme Corp", "active": False},
        headers=auth(),
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["name"] == "Acme Corp" and body["active"] is False
    resp = await api.get(f"/api/v1/admin/tenants/{created['id']}", headers=auth())
    assert (await resp.json())["name"] == "Acme Corp"
    resp = await api.get("/api/v1/admin/tenants", params={"active": "false"}, headers=auth())
    assert [t["id"] for t in (await resp.json())["items"]] == [created["id"]]


async def test_tenant_errors(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    resp = await api.get("/api/v1/admin/tenants/nope", headers=auth())
    assert resp.status == 404
    assert_error(await resp.json(), 404, "NOT_FOUND")
    resp = await api.post("/api/v1/admin/tenants", json={"name": ""}, headers=auth())
    assert resp.status == 422
    resp = await api.post("/api/v1/admin/tenants", json={"name": 5}, headers=auth())
    body = await resp.json()
    assert resp.status == 422 and "name" in body["message"]
    resp = await api.get("/api/v1/admin/tenants", params={"sort_by": "secret"}, headers=auth())
    assert resp.status == 422
    resp = await api.get("/api/v1/admin/tenants", params={"limit": "0"}, headers=auth())
    assert resp.status == 422 and "limit" in (await resp.json())["message"]


async def test_admin_routes_need_permission(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    resp = await api.get("/api/v1/admin/tenants")
    assert resp.status == 401
    for token in (VIEWER, NODE):
        resp = await api.get("/api/v1/admin/tenants", headers=auth(token))
        assert resp.status == 403, token
        resp = await api.post("/api/v1/admin/licenses", json={}, headers=auth(token))
        assert resp.status == 403, token
    resp = await api.get("/api/v1/admin/licenses", headers=auth(LICENSES_ONLY))
    assert resp.status == 200
    resp = await api.get("/api/v1/admin/updates", headers=auth(LICENSES_ONLY))
    assert resp.status == 403


# --- licenses ---


async def test_license_key_shown_once_and_stored_hashed(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    tenant = await admin.tenant()
    lic = await admin.license(tenant["id"], max_usage_count=10)
    key = lic["key"]
    assert KEY_FORMAT.match(key), key
    assert lic["max_usage_count"] == 10 and lic["usage_count"] == 0 and lic["status"] == "active"
    assert lic["key_last4"] == key[-4:]

    resp = await api.get(f"/api/v1/admin/licenses/{lic['id']}", headers=auth())
    one = await resp.json()
    assert "key" not in one
    resp = await api.get(
        "/api/v1/admin/licenses", params={"tenant_id": tenant["id"]}, headers=auth()
    )
    listed = await resp.json()
    assert listed["total"] == 1 and "key" not in listed["items"][0]

    # the log holds the SHA-256 of the key, never the key
    runtime = api.server.app[RUNTIME]
    async for env in runtime.store.read():
        assert key not in repr(env.event)
    stored = runtime.tenants.license(lic["id"])
    assert stored is not None and stored.key_hash == hashlib.sha256(key.encode()).hexdigest()

    keys = {(await admin.license(tenant["id"]))["key"] for _ in range(5)}
    assert len(keys) == 5 and key not in keys


async def test_validate_success_counts_and_matches_the_seed(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    tenant = await admin.tenant("Acme Corporation")
    lic = await admin.license(tenant["id"], "2025-12-31T23:59:59Z", max_usage_count=None)
    # push the expiry into the future with PATCH, keeping the seed's shape of dates
    resp = await api.patch(
        f"/api/v1/admin/licenses/{lic['id']}",
        json={"expires_at": "2999-12-31T23:59:59.000Z", "max_usage_count": 1000},
        headers=auth(),
    )
    assert resp.status == 200
    status, body = await validate(api, lic["key"])
    assert status == 200
    assert body == {
        "valid": True,
        "tenantId": tenant["id"],
        "tenantName": "Acme Corporation",
        "expiresAt": "2999-12-31T23:59:59.000Z",
        "usageCount": 1,
        "maxUsageCount": 1000,
    }
    status, body = await validate(api, lic["key"].lower())  # keys are case-insensitive
    assert status == 200 and body["usageCount"] == 2
    resp = await api.get(f"/api/v1/admin/licenses/{lic['id']}", headers=auth())
    got = await resp.json()
    assert got["usage_count"] == 2 and got["last_used_at"] is not None
    # HEAD must not count a use
    resp = await api.head("/api/license/validate", params={"key": lic["key"]})
    assert resp.status == 405
    assert api.server.app[RUNTIME].tenants.license(lic["id"]).usage_count == 2  # type: ignore[union-attr]


async def test_validate_errors_use_the_seed_messages(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    tenant = await admin.tenant()
    status, body = await validate(api, "A1B2C3D4-E5F6G7H8-I9J0K1L2-M3N4O5P6")
    assert status == 404
    assert_error(body, 404, "NOT_FOUND", "Clé de licence invalide")

    expired = await admin.license(tenant["id"], "2020-01-01")
    status, body = await validate(api, expired["key"])
    assert status == 400
    assert_error(body, 400, "LICENSE_EXPIRED", "Licence expirée")

    revoked = await admin.license(tenant["id"])
    resp = await api.post(
        f"/api/v1/admin/licenses/{revoked['id']}/revoke", json={"reason": "leak"}, headers=auth()
    )
    assert resp.status == 200 and (await resp.json())["status"] == "revoked"
    status, body = await validate(api, revoked["key"])
    assert_error(body, 400, "LICENSE_REVOKED", "Licence révoquée")

    limited = await admin.license(tenant["id"], max_usage_count=1)
    assert (await validate(api, limited["key"]))[0] == 200
    status, body = await validate(api, limited["key"])
    assert_error(body, 400, "LICENSE_LIMIT_REACHED", "Limite d'utilisation atteinte")
    resp = await api.get(f"/api/v1/admin/licenses/{limited['id']}", headers=auth())
    got = await resp.json()
    assert got["usage_count"] == 1 and got["status"] == "exhausted"  # the refusal did not count
    # raising the limit (or making it unlimited) lets it be used again
    await api.patch(
        f"/api/v1/admin/licenses/{limited['id']}", json={"max_usage_count": None}, headers=auth()
    )
    status, body = await validate(api, limited["key"])
    assert status == 200 and body["usageCount"] == 2 and body["maxUsageCount"] is None

    active = await admin.license(tenant["id"])
    await api.patch(f"/api/v1/admin/tenants/{tenant['id']}", json={"active": False}, headers=auth())
    status, body = await validate(api, active["key"])
    assert_error(body, 400, "TENANT_INACTIVE", "Tenant inactif")

    resp = await api.get("/api/license/validate")
    assert resp.status == 422 and "key" in (await resp.json())["message"]


async def test_license_admin_errors(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    tenant = await admin.tenant()
    bad = [
        {"tenant_id": "nope", "expires_at": "2030-01-01T00:00:00Z"},
        {"tenant_id": tenant["id"], "expires_at": "next tuesday"},
        {"tenant_id": tenant["id"], "expires_at": "2030-01-01", "max_usage_count": 0},
        {"tenant_id": tenant["id"], "expires_at": "2030-01-01", "max_usage_count": "ten"},
        {"tenant_id": tenant["id"]},
    ]
    for body in bad:
        resp = await api.post("/api/v1/admin/licenses", json=body, headers=auth())
        assert resp.status == 422, body
    resp = await api.get("/api/v1/admin/licenses/nope", headers=auth())
    assert resp.status == 404
    resp = await api.post("/api/v1/admin/licenses/nope/revoke", json={}, headers=auth())
    assert resp.status == 404
    resp = await api.get("/api/v1/admin/licenses", params={"status": "weird"}, headers=auth())
    assert resp.status == 422


# --- concurrency ---


@pytest.mark.parametrize("limit,attempts", [(5, 40), (1, 12), (25, 25)])
async def test_concurrent_validations_never_count_past_the_limit(
    api: TestClient,  # type: ignore[type-arg]
    admin: Admin,
    limit: int,
    attempts: int,
) -> None:
    tenant = await admin.tenant()
    lic = await admin.license(tenant["id"], max_usage_count=limit)
    results = await asyncio.gather(*(validate(api, lic["key"]) for _ in range(attempts)))
    ok = sorted(body["usageCount"] for status, body in results if status == 200)
    refused = [body for status, body in results if status != 200]
    assert ok == list(range(1, limit + 1))  # each use got its own count, none past the limit
    assert len(refused) == attempts - limit
    assert all(b["message"] == "Limite d'utilisation atteinte" for b in refused)
    runtime = api.server.app[RUNTIME]
    assert runtime.tenants.license(lic["id"]).usage_count == limit  # type: ignore[union-attr]
    used = [env async for env in runtime.store.read(types=["license.used"])]
    assert len(used) == limit


async def test_uses_are_recounted_after_a_concurrent_write(
    api: TestClient,  # type: ignore[type-arg]
    admin: Admin,
) -> None:
    """A write to the license between decision and append (an operator, another instance) makes
    the append fail on the expected version; the batch is decided again, never overcounted."""
    tenant = await admin.tenant()
    lic = await admin.license(tenant["id"], max_usage_count=3)
    runtime = api.server.app[RUNTIME]
    real_record = runtime.record
    interfered = 0

    async def record(events: Any, expected_version: Any = None) -> Any:
        nonlocal interfered
        if events and events[0].type_name() == "license.used" and interfered < 2:
            interfered += 1
            # Another instance counts one use first.
            from eventstore.events import LicenseUsed

            cur = runtime.tenants.license(lic["id"])
            await real_record(
                [LicenseUsed(license_id=lic["id"], tenant_id=tenant["id"],
                             usage_count=cur.usage_count + 1)],  # type: ignore[union-attr]
                expected_version=cur.version,  # type: ignore[union-attr]
            )  # fmt: skip
        return await real_record(events, expected_version)

    runtime.record = record  # type: ignore[method-assign]
    uses = LicenseUses()
    results = await asyncio.gather(
        *(uses.use(runtime, lic["key"]) for _ in range(3)), return_exceptions=True
    )
    counts = sorted(r.usage_count for r in results if not isinstance(r, BaseException))
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert interfered == 2
    assert counts == [3]  # two uses went to "the other instance"; one left for us
    assert len(refusals) == 2 and all(r.code == "LICENSE_LIMIT_REACHED" for r in refusals)  # type: ignore[attr-defined]
    assert runtime.tenants.license(lic["id"]).usage_count == 3  # type: ignore[union-attr]


async def test_store_rejects_a_stale_use() -> None:
    """The guarantee the counter relies on: a use appended at a stale version is refused."""
    from eventstore.events import LicenseIssued, LicenseUsed
    from eventstore.memory import MemoryStore

    store = MemoryStore()
    issued = LicenseIssued(
        license_id="l1", tenant_id="t1", key_hash=hash_key("K"), key_last4="K", expires_at=1e12
    )
    await store.append([issued], expected_version=0)
    await store.append([LicenseUsed(license_id="l1", tenant_id="t1", usage_count=1)], 1)
    with pytest.raises(ConcurrencyError):
        await store.append([LicenseUsed(license_id="l1", tenant_id="t1", usage_count=2)], 1)


async def test_with_real_operator_tokens(client: TestClient) -> None:  # type: ignore[type-arg]
    """The admin API behind the real token service: an `operator` may, a `viewer` may not."""

    tokens = {}
    for username, role in (("ops", "operator"), ("watcher", "viewer")):
        await client.app[OPERATORS].create_user(
            username=username, password="s3cret-pass", roles=[role]
        )
        resp = await client.post(
            "/auth/login", data={"username": username, "password": "s3cret-pass"}
        )
        assert resp.status == 200, await resp.text()
        tokens[role] = (await resp.json())["access_token"]
    resp = await client.post(
        "/api/v1/admin/tenants", json={"name": "Acme"}, headers=auth(tokens["operator"])
    )
    assert resp.status == 201
    tenant = await resp.json()
    resp = await client.post(
        "/api/v1/admin/licenses",
        json={"tenant_id": tenant["id"], "expires_at": "2099-01-01"},
        headers=auth(tokens["operator"]),
    )
    assert resp.status == 201
    key = (await resp.json())["key"]
    resp = await client.get("/api/v1/admin/tenants", headers=auth(tokens["viewer"]))
    assert resp.status == 403
    assert_error(await resp.json(), 403, "AUTHORIZATION_ERROR")
    status, body = await validate(client, key)
    assert status == 200 and body["tenantName"] == "Acme"
