"""Fixtures for tenants, licenses, updates and telemetry: the app on a real socket with a stub
authenticator (operator tokens -> principals), and an `Admin` helper for the admin API."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config
from broker.errors import AuthenticationFailed
from broker.keys import AUTHENTICATOR
from broker.principal import Principal
from tests.conftest import make_config

ADMIN = "admin-token"  # licenses:admin + updates:admin
LICENSES_ONLY = "licenses-token"
VIEWER = "viewer-token"
NODE = "node-token"

PRINCIPALS = {
    ADMIN: Principal(
        "user", "usr_admin", "admin", frozenset({"licenses:admin", "updates:admin", "nodes:read"})
    ),
    LICENSES_ONLY: Principal("user", "usr_lic", "lic", frozenset({"licenses:admin"})),
    VIEWER: Principal("user", "usr_view", "viewer", frozenset({"nodes:read", "events:read"})),
    NODE: Principal("node", "node-1", "node-1"),
}


async def stub_authenticator(token: str) -> Principal:
    principal = PRINCIPALS.get(token)
    if principal is None:
        raise AuthenticationFailed("invalid token")
    return principal


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def zip_bytes(members: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in (members or {"app/VERSION": b"1.2.0\n"}).items():
            zf.writestr(name, data)
    return buf.getvalue()


class Admin:
    """The operator's side of the API, through a real client."""

    def __init__(self, client: TestClient) -> None:  # type: ignore[type-arg]
        self.client = client

    async def tenant(self, name: str = "Acme Corporation", active: bool = True) -> dict[str, Any]:
        resp = await self.client.post(
            "/api/v1/admin/tenants", json={"name": name, "active": active}, headers=auth()
        )
        assert resp.status == 201, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    async def license(
        self,
        tenant_id: str,
        expires_at: str = "2099-12-31T23:59:59Z",
        max_usage_count: int | None = None,
    ) -> dict[str, Any]:
        resp = await self.client.post(
            "/api/v1/admin/licenses",
            json={
                "tenant_id": tenant_id,
                "expires_at": expires_at,
                "max_usage_count": max_usage_count,
            },
            headers=auth(),
        )
        assert resp.status == 201, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    async def upload_raw(
        self,
        version: str,
        data: Any,
        changelog: str = "- fixes",
        tenant_ids: list[str] | None = None,
        filename: str = "update.zip",
        token: str = ADMIN,
    ) -> aiohttp.ClientResponse:
        form = aiohttp.FormData()
        form.add_field("version", version)
        form.add_field("changelog", changelog)
        if tenant_ids is not None:
            form.add_field("tenant_ids", ",".join(tenant_ids))
        form.add_field("file", data, filename=filename, content_type="application/zip")
        return await self.client.post("/api/v1/admin/updates", data=form, headers=auth(token))

    async def upload(self, version: str, data: bytes | None = None, **kw: Any) -> dict[str, Any]:
        resp = await self.upload_raw(version, data if data is not None else zip_bytes(), **kw)
        assert resp.status == 201, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


@pytest.fixture
def tenancy_config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def app_factory() -> Callable[[Config], Any]:
    def build(config: Config) -> Any:
        app = create_app(config)
        app[AUTHENTICATOR] = stub_authenticator
        return app

    return build


@pytest.fixture
async def api(
    tenancy_config: Config, app_factory: Callable[[Config], Any]
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with TestClient(TestServer(app_factory(tenancy_config))) as c:
        yield c


@pytest.fixture
def admin(api: TestClient) -> Admin:  # type: ignore[type-arg]
    return Admin(api)
