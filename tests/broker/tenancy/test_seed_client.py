"""Seed 002: the CyberSensei node client runs unchanged against a started broker."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.broker.tenancy.conftest import ADMIN, Admin, auth, zip_bytes
from tests.broker.tenancy.cybersensei_client import CyberSenseiClient


def base_url(api: TestClient) -> str:  # type: ignore[type-arg]
    return str(api.make_url("/"))


async def test_seed_client_end_to_end(
    api: TestClient,  # type: ignore[type-arg]
    admin: Admin,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = await admin.tenant("Acme Corporation")
    lic = await admin.license(tenant["id"], max_usage_count=1000)
    payload = zip_bytes({"cybersensei/app.py": b"print('1.2.0')\n" * 1000})
    upd = await admin.upload(
        "1.2.0", payload, changelog="- Correctifs de sécurité critiques\n- Nouveaux exercices"
    )

    node = CyberSenseiClient(backend_url=base_url(api), license_key=lic["key"])

    # 1. license validation at start-up
    assert await asyncio.to_thread(node.validate_license) is True
    assert node.tenant_id == tenant["id"]
    assert "Licence valide pour: Acme Corporation" in capsys.readouterr().out

    # 2. update check: 1.0.0 -> 1.2.0
    found = await asyncio.to_thread(node.check_updates)
    assert found == {
        "updateAvailable": True,
        "currentVersion": "1.0.0",
        "latestVersion": "1.2.0",
        "updateId": upd["id"],
        "changelog": "- Correctifs de sécurité critiques\n- Nouveaux exercices",
        "fileSize": len(payload),
    }

    # 3. download the ZIP, byte for byte
    out = tmp_path / "update.zip"
    assert await asyncio.to_thread(node.download_update, found["updateId"], str(out)) is True
    data = await asyncio.to_thread(out.read_bytes)
    assert hashlib.sha256(data).hexdigest() == upd["sha256"]

    # 4. telemetry (the client expects 201)
    metrics = node.collect_metrics()
    assert await asyncio.to_thread(node.send_telemetry, metrics) is True
    assert "Télémétrie envoyée" in capsys.readouterr().out

    # the operator sees the use and the sample
    resp = await api.get(f"/api/v1/admin/licenses/{lic['id']}", headers=auth(ADMIN))
    assert (await resp.json())["usage_count"] == 1
    resp = await api.get(f"/api/v1/admin/tenants/{tenant['id']}/telemetry", headers=auth(ADMIN))
    body = await resp.json()
    assert body["total_samples"] == 1
    assert body["latest"]["active_users"] == 42
    assert body["latest"]["ai_latency"] == 247.5
    assert body["latest"]["version"] == "1.0.0"
    assert body["latest"]["additional_data"] == {"cpu": 45.2, "memory": 62.8}


async def test_seed_client_up_to_date_and_refusals(
    api: TestClient,  # type: ignore[type-arg]
    admin: Admin,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = await admin.tenant("Initech")
    lic = await admin.license(tenant["id"])
    node = CyberSenseiClient(backend_url=base_url(api), license_key=lic["key"])
    assert await asyncio.to_thread(node.validate_license) is True
    # nothing published: up to date
    assert await asyncio.to_thread(node.check_updates) is None
    assert "Version à jour" in capsys.readouterr().out

    # an unknown key: the client prints the seed's message and refuses to start
    bad = CyberSenseiClient(base_url(api), "A1B2C3D4-E5F6G7H8-I9J0K1L2-M3N4O5P6")
    assert await asyncio.to_thread(bad.validate_license) is False
    assert "Licence invalide: Clé de licence invalide" in capsys.readouterr().out

    # an expired key
    old = await admin.license(tenant["id"], expires_at="2020-01-01T00:00:00Z")
    expired = CyberSenseiClient(base_url(api), old["key"])
    assert await asyncio.to_thread(expired.validate_license) is False
    assert "Licence invalide: Licence expirée" in capsys.readouterr().out

    # an inactive tenant: no telemetry either
    resp = await api.patch(
        f"/api/v1/admin/tenants/{tenant['id']}", json={"active": False}, headers=auth(ADMIN)
    )
    assert resp.status == 200
    assert await asyncio.to_thread(node.validate_license) is False
    assert "Licence invalide: Tenant inactif" in capsys.readouterr().out
    assert await asyncio.to_thread(node.send_telemetry, node.collect_metrics()) is False
    assert "Erreur télémétrie: 400" in capsys.readouterr().out
