"""HTTP routes for tenants and licenses: the operators' admin API and the nodes' license check.

`GET /api/license/validate` is public: the seed 002 client sends no token, the license key is
the credential. Everything under `/api/v1/admin/` needs the `licenses:admin` permission.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from broker.errors import MethodNotAllowed
from broker.http.auth import Permission, Public
from broker.http.bodies import decode_body, json_response
from broker.http.routing import Routes
from broker.keys import LICENSING
from broker.pagination import Page, PageQuery, decode_query, paginate
from broker.services import licensing
from eventstore.timestamps import iso
from projections.tenants import License, Tenant, TenantsProjection

routes = Routes("licensing")
ADMIN = Permission("licenses:admin")

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=licensing.MAX_NAME)]
UsageLimit = Annotated[int, msgspec.Meta(ge=1)]


# --- wire types ---


class TenantCreate(msgspec.Struct, kw_only=True):
    name: Name
    active: bool = True


class TenantPatch(msgspec.Struct, kw_only=True):
    name: Name | None = None
    active: bool | None = None


class TenantOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    active: bool
    created_at: str
    updated_at: str
    license_count: int


class TenantListQuery(PageQuery, kw_only=True):
    sort_by: Literal["name", "created_at", "updated_at"] | None = None
    search: str | None = None  # in the name or the id, case-insensitive
    active: bool | None = None


class LicenseCreate(msgspec.Struct, kw_only=True):
    tenant_id: str
    expires_at: str  # ISO 8601; any date, past ones included
    max_usage_count: UsageLimit | None = None  # null: unlimited


class LicensePatch(msgspec.Struct, kw_only=True):
    expires_at: str | msgspec.UnsetType = msgspec.UNSET
    max_usage_count: UsageLimit | None | msgspec.UnsetType = msgspec.UNSET


class LicenseRevoke(msgspec.Struct, kw_only=True):
    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


LicenseStatus = Literal["active", "expired", "exhausted", "revoked"]


class LicenseOut(msgspec.Struct, kw_only=True):
    id: str
    tenant_id: str
    tenant_name: str | None
    key_last4: str
    expires_at: str
    max_usage_count: int | None
    usage_count: int
    status: LicenseStatus
    revoked: bool
    revoked_at: str | None
    revoke_reason: str | None
    created_at: str
    updated_at: str
    last_used_at: str | None


class LicenseCreated(LicenseOut, kw_only=True):
    key: str  # shown this once: the server keeps only its hash


class LicenseListQuery(PageQuery, kw_only=True):
    sort_by: Literal["created_at", "updated_at", "expires_at", "usage_count"] | None = None
    tenant_id: str | None = None
    status: LicenseStatus | None = None


class ValidateQuery(msgspec.Struct, kw_only=True):
    key: str


class LicenseValidation(msgspec.Struct, kw_only=True):
    """The seed's success body, field for field."""

    valid: bool
    tenantId: str
    tenantName: str
    expiresAt: str
    usageCount: int
    maxUsageCount: int | None


# --- rendering ---


def tenant_out(t: Tenant) -> TenantOut:
    return TenantOut(
        id=t.id,
        name=t.name,
        active=t.active,
        created_at=iso(t.created_at) or "",
        updated_at=iso(t.updated_at) or "",
        license_count=len(t.license_ids),
    )


def license_fields(lic: License, tenants: TenantsProjection, now: float) -> dict[str, object]:
    tenant = tenants.tenant(lic.tenant_id)
    return {
        "id": lic.id,
        "tenant_id": lic.tenant_id,
        "tenant_name": tenant.name if tenant is not None else None,
        "key_last4": lic.key_last4,
        "expires_at": iso(lic.expires_at),
        "max_usage_count": lic.max_usage_count,
        "usage_count": lic.usage_count,
        "status": lic.status(now),
        "revoked": lic.revoked,
        "revoked_at": iso(lic.revoked_at),
        "revoke_reason": lic.revoke_reason,
        "created_at": iso(lic.created_at),
        "updated_at": iso(lic.updated_at),
        "last_used_at": iso(lic.last_used_at),
    }


def license_out(lic: License, tenants: TenantsProjection, now: float) -> LicenseOut:
    return LicenseOut(**license_fields(lic, tenants, now))  # type: ignore[arg-type]


# --- admin: tenants ---

TENANT_SORT = {
    "name": lambda t: t.name.casefold(),
    "created_at": lambda t: t.created_at,
    "updated_at": lambda t: t.updated_at,
}


@routes.post(
    "/api/v1/admin/tenants",
    policy=ADMIN,
    body=TenantCreate,
    response=TenantOut,
    status=201,
    summary="Create a tenant",
)
async def create_tenant(request: web.Request) -> web.Response:
    body = await decode_body(request, TenantCreate)
    tenant = await request.app[LICENSING].create_tenant(body.name, body.active)
    return json_response(tenant_out(tenant), status=201)


@routes.get(
    "/api/v1/admin/tenants",
    policy=ADMIN,
    query=TenantListQuery,
    response=Page[TenantOut],
    summary="List tenants (paginated, searchable)",
)
async def list_tenants(request: web.Request) -> web.Response:
    q = decode_query(request, TenantListQuery)
    tenants = request.app[LICENSING].tenants.find_tenants(q.search, q.active)
    return json_response(paginate(tenants, q, TENANT_SORT, "created_at", tenant_out))


@routes.get(
    "/api/v1/admin/tenants/{tenant_id}", policy=ADMIN, response=TenantOut, summary="Get a tenant"
)
async def get_tenant(request: web.Request) -> web.Response:
    tenant = request.app[LICENSING].get_tenant(request.match_info["tenant_id"])
    return json_response(tenant_out(tenant))


@routes.patch(
    "/api/v1/admin/tenants/{tenant_id}",
    policy=ADMIN,
    body=TenantPatch,
    response=TenantOut,
    summary="Rename, activate or deactivate a tenant",
)
async def patch_tenant(request: web.Request) -> web.Response:
    body = await decode_body(request, TenantPatch)
    tenant = await request.app[LICENSING].update_tenant(
        request.match_info["tenant_id"], body.name, body.active
    )
    return json_response(tenant_out(tenant))


# --- admin: licenses ---

LICENSE_SORT = {
    "created_at": lambda lic: lic.created_at,
    "updated_at": lambda lic: lic.updated_at,
    "expires_at": lambda lic: lic.expires_at,
    "usage_count": lambda lic: lic.usage_count,
}


@routes.post(
    "/api/v1/admin/licenses",
    policy=ADMIN,
    body=LicenseCreate,
    response=LicenseCreated,
    status=201,
    summary="Issue a license key (the key is shown in this response only)",
)
async def create_license(request: web.Request) -> web.Response:
    body = await decode_body(request, LicenseCreate)
    service = request.app[LICENSING]
    expires_at = licensing.parse_time(body.expires_at, "expires_at")
    lic, key = await service.issue_license(body.tenant_id, expires_at, body.max_usage_count)
    fields = license_fields(lic, service.tenants, time.time())
    return json_response(
        LicenseCreated(key=key, **fields),  # type: ignore[arg-type]
        status=201,
        headers={"Cache-Control": "no-store"},
    )


@routes.get(
    "/api/v1/admin/licenses",
    policy=ADMIN,
    query=LicenseListQuery,
    response=Page[LicenseOut],
    summary="List licenses (never their keys)",
)
async def list_licenses(request: web.Request) -> web.Response:
    q = decode_query(request, LicenseListQuery)
    tenants = request.app[LICENSING].tenants
    now = time.time()
    found = tenants.find_licenses(now, q.tenant_id, q.status)
    page = paginate(found, q, LICENSE_SORT, "created_at", lambda x: license_out(x, tenants, now))
    return json_response(page)


@routes.get(
    "/api/v1/admin/licenses/{license_id}",
    policy=ADMIN,
    response=LicenseOut,
    summary="Get a license",
)
async def get_license(request: web.Request) -> web.Response:
    service = request.app[LICENSING]
    lic = service.get_license(request.match_info["license_id"])
    return json_response(license_out(lic, service.tenants, time.time()))


@routes.patch(
    "/api/v1/admin/licenses/{license_id}",
    policy=ADMIN,
    body=LicensePatch,
    response=LicenseOut,
    summary="Change a license's expiry or maximum use count (null: unlimited)",
)
async def patch_license(request: web.Request) -> web.Response:
    body = await decode_body(request, LicensePatch)
    service = request.app[LICENSING]
    expires_at: float | msgspec.UnsetType = msgspec.UNSET
    if body.expires_at is not msgspec.UNSET:
        expires_at = licensing.parse_time(body.expires_at, "expires_at")
    lic = await service.update_license(
        request.match_info["license_id"], expires_at, body.max_usage_count
    )
    return json_response(license_out(lic, service.tenants, time.time()))


@routes.post(
    "/api/v1/admin/licenses/{license_id}/revoke",
    policy=ADMIN,
    body=LicenseRevoke,
    response=LicenseOut,
    summary="Revoke a license",
)
async def revoke_license(request: web.Request) -> web.Response:
    body = await decode_body(request, LicenseRevoke)
    service = request.app[LICENSING]
    lic = await service.revoke_license(request.match_info["license_id"], body.reason)
    return json_response(license_out(lic, service.tenants, time.time()))


# --- nodes (seed 002) ---


@routes.get(
    "/api/license/validate",
    policy=Public(),
    query=ValidateQuery,
    response=LicenseValidation,
    summary="Validate a license key at node start-up (counts one use)",
    errors=(400,),  # LICENSE_EXPIRED, LICENSE_REVOKED, ... TENANT_INACTIVE, as seed 002 expects
    tags=("nodes: licensing",),
)
async def validate_license(request: web.Request) -> web.Response:
    if request.method == "HEAD":  # a validation counts a use: HEAD must not
        raise MethodNotAllowed("HEAD would count a license use; use GET", headers={"Allow": "GET"})
    q = decode_query(request, ValidateQuery)
    use = await request.app[LICENSING].validate(q.key)
    return json_response(
        LicenseValidation(
            valid=True,
            tenantId=use.tenant_id,
            tenantName=use.tenant_name,
            expiresAt=iso(use.expires_at) or "",
            usageCount=use.usage_count,
            maxUsageCount=use.max_usage_count,
        ),
        headers={"Cache-Control": "no-store"},
    )
