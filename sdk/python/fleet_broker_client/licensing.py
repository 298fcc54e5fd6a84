"""`LicensedNode`: the seed 002 flows — license validation at start-up, update checks, update
downloads that resume (HTTP Range) and verify their SHA-256, tenant telemetry.

These routes take no token: the license key, then the tenant id it yields, are the
credentials.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from fleet_broker_client.errors import (
    ChecksumMismatch,
    TransportError,
    error_from_body,
)
from fleet_broker_client.models import LicenseInfo, TelemetryResult, UpdateInfo
from fleet_broker_client.transport import Backoff, Transport, with_retries

CHUNK = 256 * 1024


class LicensedNode:
    """A licensed installation talking to the broker (seed 002)."""

    def __init__(
        self,
        server: str,
        license_key: str,
        *,
        version: str = "1.0.0",
        retry: Backoff | None = None,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.license_key = license_key
        self.version = version
        self.retry = retry or Backoff(attempts=3)
        self._http = Transport(server, http)
        self.tenant_id: str | None = None
        self.license: LicenseInfo | None = None

    async def __aenter__(self) -> LicensedNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    def _tenant(self) -> str:
        if self.tenant_id is None:
            raise RuntimeError("validate the license first (validate_license())")
        return self.tenant_id

    async def validate_license(self) -> LicenseInfo:
        """Validate the key (each success counts one use): `LicenseExpired`, `LicenseRevoked`,
        `LicenseLimitReached`, `TenantInactive` or `NotFound` when it is refused."""

        async def once() -> LicenseInfo:
            return await self._http.request(
                "GET", "/api/license/validate", LicenseInfo, params={"key": self.license_key}
            )

        # Not retried after a transport error: a lost answer may have counted a use.
        info: LicenseInfo = await with_retries(self.retry, once, retry=False)
        self.license, self.tenant_id = info, info.tenant_id
        return info

    async def check_update(self, version: str | None = None) -> UpdateInfo:
        params = {"tenantId": self._tenant(), "version": version or self.version}

        async def once() -> UpdateInfo:
            return await self._http.request("GET", "/update/check", UpdateInfo, params=params)

        result: UpdateInfo = await with_retries(self.retry, once)
        return result

    async def send_telemetry(
        self,
        *,
        uptime: float,
        active_users: int,
        exercises_completed_today: int,
        ai_latency: float | None = None,
        version: str | None = None,
        additional_data: Mapping[str, Any] | None = None,
    ) -> TelemetryResult:
        body: dict[str, Any] = {
            "tenantId": self._tenant(),
            "uptime": uptime,
            "activeUsers": active_users,
            "exercisesCompletedToday": exercises_completed_today,
            "aiLatency": ai_latency,
            "version": version or self.version,
            "additionalData": dict(additional_data or {}),
        }

        async def once() -> TelemetryResult:
            return await self._http.request("POST", "/telemetry", TelemetryResult, json=body)

        result: TelemetryResult = await with_retries(self.retry, once)
        return result

    async def download_update(self, update_id: str, dest: str | os.PathLike[str]) -> Path:
        """Download an update to `dest`, resuming an interrupted download (`dest` + `.part`,
        HTTP Range with If-Range) and checking the SHA-256 the server announces before the
        file takes its name. Raises `ChecksumMismatch` (the partial file is removed)."""
        target = Path(dest)
        part = target.with_name(target.name + ".part")
        tag_file = target.with_name(target.name + ".part.etag")

        async def once() -> str:
            return await self._fetch(update_id, part, tag_file)

        expected: str = await with_retries(self.retry, once)
        digest = await asyncio.to_thread(_sha256, part)
        if digest != expected:
            await asyncio.to_thread(_remove, part, tag_file)
            raise ChecksumMismatch(
                f"update {update_id}: SHA-256 {digest}, the server announced {expected}"
            )
        await asyncio.to_thread(os.replace, part, target)
        await asyncio.to_thread(_remove, tag_file)
        return target

    async def _fetch(self, update_id: str, part: Path, tag_file: Path) -> str:
        """One attempt: append to `part` from where it stops; the announced SHA-256."""
        have = part.stat().st_size if part.exists() else 0
        etag = tag_file.read_text() if have and tag_file.exists() else None
        headers = {}
        if have and etag:
            headers = {"Range": f"bytes={have}-", "If-Range": etag}
        url = self._http.url(f"/update/download/{update_id}")
        try:
            async with self._http.session.get(url, headers=headers) as resp:
                if resp.status == 416:  # nothing past what we hold: it is complete
                    return etag.strip('"') if etag else ""
                if resp.status >= 400:
                    raise error_from_body(resp.status, await _json_or_none(resp))
                expected = resp.headers.get("X-Checksum-SHA256") or (
                    resp.headers.get("ETag", "").strip('"')
                )
                new_tag = resp.headers.get("ETag")
                mode = "ab" if resp.status == 206 else "wb"
                if new_tag:
                    await asyncio.to_thread(tag_file.write_text, new_tag)
                f = await asyncio.to_thread(open, part, mode)
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        await asyncio.to_thread(f.write, chunk)
                finally:
                    await asyncio.to_thread(f.close)
                return expected
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"download {update_id}: {exc!r}") from exc


async def _json_or_none(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
