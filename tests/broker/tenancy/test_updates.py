"""Software updates: multipart upload, admin API, the node's check and its ranged download."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from broker.config import Config, UpdatesConfig
from broker.keys import CONFIG, RUNTIME
from tests.broker.tenancy.conftest import LICENSES_ONLY, Admin, auth, zip_bytes


async def check(api: TestClient, tenant_id: str, version: str) -> tuple[int, dict[str, Any]]:  # type: ignore[type-arg]
    resp = await api.get("/update/check", params={"tenantId": tenant_id, "version": version})
    return resp.status, await resp.json()


async def test_upload_is_content_addressed(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    data = zip_bytes({"a.txt": b"hello" * 1000})
    upd = await admin.upload("1.2.0", data, changelog="- notes")
    assert set(upd) >= {"id", "version", "file_size", "sha256", "created_at"}
    assert upd["version"] == "1.2.0" and upd["file_size"] == len(data)
    assert upd["sha256"] == hashlib.sha256(data).hexdigest()
    root = Path(api.server.app[CONFIG].server.data_dir) / "updates"
    assert (root / upd["sha256"]).read_bytes() == data
    assert list((root / ".incoming").iterdir()) == []
    # the event holds the hash and the size, not the bytes
    events = [env async for env in api.server.app[RUNTIME].store.read(types=["update.*"])]
    assert len(events) == 1
    assert events[0].event.sha256 == upd["sha256"] and events[0].event.file_size == len(data)  # type: ignore[attr-defined]

    resp = await api.get(f"/api/v1/admin/updates/{upd['id']}", headers=auth())
    assert (await resp.json())["changelog"] == "- notes"
    resp = await api.get("/api/v1/admin/updates", params={"sort_by": "version"}, headers=auth())
    assert (await resp.json())["total"] == 1


async def test_upload_validation(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    resp = await admin.upload_raw("1.0.0", b"this is not a zip file")
    assert resp.status == 422 and "ZIP" in (await resp.json())["message"]
    resp = await admin.upload_raw("1.0.0", b"PK\x03\x04 but no central directory at all")
    assert resp.status == 422
    resp = await admin.upload_raw("1.0.0", b"")
    assert resp.status == 422
    for bad in ("1.0", "v1.2.0", "latest", "1.0.0.0"):
        resp = await admin.upload_raw(bad, zip_bytes())
        body = await resp.json()
        assert resp.status == 422 and body["error"]["details"][0]["field"] == "version", bad
    resp = await admin.upload_raw("1.0.0", zip_bytes(), tenant_ids=["no-such-tenant"])
    assert resp.status == 422 and "tenant_ids" in (await resp.json())["message"]
    resp = await api.post(
        "/api/v1/admin/updates", json={"version": "1.0.0"}, headers=auth()
    )  # not multipart
    assert resp.status == 422
    resp = await admin.upload_raw("1.0.0", zip_bytes(), token=LICENSES_ONLY)
    assert resp.status == 403
    # nothing was left behind by the refusals
    root = Path(api.server.app[CONFIG].server.data_dir) / "updates"
    assert [p.name for p in root.iterdir() if p.name != ".incoming"] == []
    assert list((root / ".incoming").iterdir()) == []

    await admin.upload("1.0.0")
    resp = await admin.upload_raw("1.0.0", zip_bytes({"other": b"x"}))
    assert resp.status == 409


async def test_upload_size_limit(tmp_path: Path, app_factory: Any, tenancy_config: Config) -> None:
    config = Config(
        server=tenancy_config.server,
        store=tenancy_config.store,
        log=tenancy_config.log,
        updates=UpdatesConfig(max_file_bytes=64 * 1024),
    )
    async with TestClient(TestServer(app_factory(config))) as api:
        admin = Admin(api)
        ok = zip_bytes({"small": b"x" * 1000})
        await admin.upload("1.0.0", ok)
        big = zip_bytes({"big": bytes(range(256)) * 1024})  # 256 KiB stored
        resp = await admin.upload_raw("1.1.0", big)
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
        root = Path(config.server.data_dir) / "updates"
        assert list((root / ".incoming").iterdir()) == []


async def test_check_latest_by_semver_and_audience(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    acme = await admin.tenant("Acme")
    globex = await admin.tenant("Globex")
    await admin.upload("1.9.0", zip_bytes({"v": b"1.9"}))
    u110 = await admin.upload("1.10.0", zip_bytes({"v": b"1.10"}), changelog="- ten")
    u200 = await admin.upload("2.0.0", zip_bytes({"v": b"2"}), tenant_ids=[globex["id"]])

    status, body = await check(api, acme["id"], "1.0.0")
    assert status == 200
    assert body == {
        "updateAvailable": True,
        "currentVersion": "1.0.0",
        "latestVersion": "1.10.0",
        "updateId": u110["id"],
        "changelog": "- ten",
        "fileSize": u110["file_size"],
    }
    status, body = await check(api, globex["id"], "1.10.0")
    assert body["updateAvailable"] is True and body["updateId"] == u200["id"]
    status, body = await check(api, acme["id"], "1.10.0")
    assert body == {
        "updateAvailable": False,
        "currentVersion": "1.10.0",
        "latestVersion": "1.10.0",
        "updateId": None,
        "changelog": None,
        "fileSize": None,
    }
    # withdrawing 1.10.0 makes 1.9.0 the latest for Acme
    resp = await api.post(f"/api/v1/admin/updates/{u110['id']}/withdraw", json={}, headers=auth())
    assert resp.status == 200 and (await resp.json())["withdrawn"] is True
    status, body = await check(api, acme["id"], "1.0.0")
    assert body["latestVersion"] == "1.9.0"
    resp = await api.get(f"/update/download/{u110['id']}")
    assert resp.status == 404


async def test_check_errors(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    tenant = await admin.tenant()
    status, body = await check(api, "no-such-tenant", "1.0.0")
    assert status == 404 and body["statusCode"] == 404
    status, body = await check(api, tenant["id"], "one.two")
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR"
    resp = await api.get("/update/check", params={"tenantId": tenant["id"]})
    assert resp.status == 422 and "version" in (await resp.json())["message"]
    await api.patch(f"/api/v1/admin/tenants/{tenant['id']}", json={"active": False}, headers=auth())
    status, body = await check(api, tenant["id"], "1.0.0")
    assert status == 400 and body["message"] == "Tenant inactif"
    assert body["error"]["code"] == "TENANT_INACTIVE"


async def test_download_headers_range_and_conditionals(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    data = zip_bytes({"payload.bin": bytes(range(256)) * 400})
    upd = await admin.upload("3.0.0", data)
    url = f"/update/download/{upd['id']}"
    sha = hashlib.sha256(data).hexdigest()

    resp = await api.get(url)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/zip"
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["ETag"] == f'"{sha}"'
    assert resp.headers["X-Checksum-SHA256"] == sha
    expected_digest = base64.b64encode(bytes.fromhex(sha)).decode()
    assert resp.headers["Repr-Digest"] == f"sha-256=:{expected_digest}:"
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert "update.zip" in resp.headers["Content-Disposition"]
    assert await resp.read() == data

    resp = await api.head(url)
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(data))
    assert await resp.read() == b""

    # resume: the second half
    half = len(data) // 2
    resp = await api.get(url, headers={"Range": f"bytes={half}-"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {half}-{len(data) - 1}/{len(data)}"
    assert resp.headers["Content-Length"] == str(len(data) - half)
    assert await resp.read() == data[half:]
    resp = await api.get(url, headers={"Range": "bytes=10-19"})
    assert resp.status == 206 and await resp.read() == data[10:20]
    resp = await api.get(url, headers={"Range": "bytes=-100"})
    assert resp.status == 206 and await resp.read() == data[-100:]
    resp = await api.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(data)}"
    # If-Range with our ETag resumes; with another one it sends the whole file
    resp = await api.get(url, headers={"Range": "bytes=0-9", "If-Range": f'"{sha}"'})
    assert resp.status == 206 and await resp.read() == data[:10]
    resp = await api.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert resp.status == 200 and await resp.read() == data
    resp = await api.get(url, headers={"If-None-Match": f'"{sha}"'})
    assert resp.status == 304

    resp = await api.get("/update/download/no-such-update")
    assert resp.status == 404 and (await resp.json())["statusCode"] == 404
