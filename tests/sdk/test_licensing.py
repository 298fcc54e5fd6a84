"""Seed 002 through the SDK against a served broker: license validation, update check,
a resumed download with its checksum verified, tenant telemetry; and the sync facade."""

from __future__ import annotations

import asyncio
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fleet_broker_client import (
    ChecksumMismatch,
    LicensedNode,
    LicenseExpired,
    NotFound,
    SyncLicensedNode,
    SyncNode,
)

from tests.sdk.served_broker import Broker, create_operator, operator


def a_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.bin", bytes(range(256)) * 4096)  # 1 MiB
    return buf.getvalue()


async def post(
    http: aiohttp.ClientSession, url: str, auth: dict[str, str], **kw: Any
) -> dict[str, Any]:
    async with http.post(url, headers=auth, **kw) as r:
        assert r.status == 201, await r.text()
        result: dict[str, Any] = await r.json()
        return result


async def test_seed_002_flows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    await create_operator(data)
    broker = Broker(data)
    await broker.start()
    try:
        async with aiohttp.ClientSession() as http:
            auth = await operator(http, broker.url)
            tenant = await post(
                http, f"{broker.url}/api/v1/admin/tenants", auth, json={"name": "Acme"}
            )
            lic = await post(
                http,
                f"{broker.url}/api/v1/admin/licenses",
                auth,
                json={"tenant_id": tenant["id"], "expires_at": "2999-01-01"},
            )
            old = await post(
                http,
                f"{broker.url}/api/v1/admin/licenses",
                auth,
                json={"tenant_id": tenant["id"], "expires_at": "2001-01-01"},
            )
            zipped = a_zip()
            form = aiohttp.FormData()
            form.add_field("version", "1.2.0")
            form.add_field("changelog", "- fixes")
            form.add_field("file", zipped, filename="u.zip", content_type="application/zip")
            update = await post(http, f"{broker.url}/api/v1/admin/updates", auth, data=form)

        async with LicensedNode(broker.url, lic["key"], version="1.0.0") as client:
            info = await client.validate_license()
            assert info.valid and info.tenant_id == tenant["id"] and info.usage_count == 1
            check = await client.check_update()
            assert check.update_available and check.update_id == update["id"]
            assert check.latest_version == "1.2.0" and check.file_size == len(zipped)
            # An interrupted download: the first 300 KB are there, with the ETag they came with.
            dest = tmp_path / "update.zip"
            part = tmp_path / "update.zip.part"
            part.write_bytes(zipped[:300_000])
            etag = f'"{hashlib.sha256(zipped).hexdigest()}"'
            (tmp_path / "update.zip.part.etag").write_text(etag)
            assert await client.download_update(check.update_id, dest) == dest
            assert dest.read_bytes() == zipped and not part.exists()
            # A damaged partial file is resumed too (Range: the server sends only the rest),
            # then caught by the checksum, and removed.
            damaged = tmp_path / "again.zip.part"
            damaged.write_bytes(b"\0" * 300_000)
            (tmp_path / "again.zip.part.etag").write_text(etag)
            with pytest.raises(ChecksumMismatch):
                await client.download_update(check.update_id, tmp_path / "again.zip")
            assert not (tmp_path / "again.zip").exists() and not damaged.exists()
            sent = await client.send_telemetry(
                uptime=86400, active_users=42, exercises_completed_today=156, ai_latency=247.5
            )
            assert sent.success
        async with LicensedNode(broker.url, old["key"]) as expired:
            with pytest.raises(LicenseExpired) as exc:
                await expired.validate_license()
            assert exc.value.message == "Licence expirée" and exc.value.status == 400
        async with LicensedNode(broker.url, "AAAAAAAA-AAAAAAAA-AAAAAAAA-AAAAAAAA") as unknown:
            with pytest.raises(NotFound):
                await unknown.validate_license()

        def script() -> None:  # a plain script: no asyncio in sight
            with SyncLicensedNode(broker.url, lic["key"]) as client:
                assert client.validate_license().usage_count == 2
            with SyncNode(broker.url, "sync-1", key_file=tmp_path / "sync.pem") as n:
                n.register()
                n.send("sync-1", "note", {"to": "self"})
                for msg in n.messages():
                    assert msg.content == {"to": "self"}
                    msg_id = msg.id
                    break
                n.mark_read(msg_id)
                assert n.pending() == []

        await asyncio.to_thread(script)
    finally:
        await broker.stop()
