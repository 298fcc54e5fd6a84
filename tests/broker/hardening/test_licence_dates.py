"""A licence date is checked at the edge, and one recorded before that check still renders."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from broker.keys import RUNTIME
from eventstore.events import LicenseIssued
from tests.broker.tenancy.conftest import Admin, auth

Client = TestClient  # type: ignore[type-arg]


async def test_a_date_outside_what_utc_renders_is_422(api: Client, admin: Admin) -> None:
    tenant = await admin.tenant()
    for when in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):
        resp = await api.post(
            "/api/v1/admin/licenses",
            json={"tenant_id": tenant["id"], "expires_at": when},
            headers=auth(),
        )
        assert resp.status == 422, await resp.text()
        assert "expires_at" in (await resp.json())["message"]
    lic = await admin.license(tenant["id"])
    resp = await api.patch(
        f"/api/v1/admin/licenses/{lic['id']}",
        json={"expires_at": "9999-12-31T23:59:59-14:00"},
        headers=auth(),
    )
    assert resp.status == 422, await resp.text()
    resp = await api.get("/api/v1/admin/licenses", headers=auth())
    assert resp.status == 200, await resp.text()


async def test_a_recorded_date_outside_the_range_still_renders(api: Client, admin: Admin) -> None:
    """A log written before dates were checked: the list and the licence answer, at the bound."""
    tenant = await admin.tenant()
    await api.server.app[RUNTIME].record(
        [
            LicenseIssued(
                license_id="lic_far",
                tenant_id=tenant["id"],
                key_hash="0" * 64,
                key_last4="ABCD",
                expires_at=253402300799.0 + 14 * 3600,
            )
        ]
    )
    resp = await api.get("/api/v1/admin/licenses", headers=auth())
    assert resp.status == 200, await resp.text()
    (far,) = [lic for lic in (await resp.json())["items"] if lic["id"] == "lic_far"]
    assert far["expires_at"].startswith("9999-12-31T23:59:59")
    resp = await api.get("/api/v1/admin/licenses/lic_far", headers=auth())
    assert resp.status == 200, await resp.text()
