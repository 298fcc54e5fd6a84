"""Tenants and their license keys: who they are, whether they are active, and how often each
license has been used. Keys are indexed by their SHA-256 only; the keys themselves never reach
the log."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from eventstore.base import Envelope
from eventstore.events import (
    LicenseIssued,
    LicenseRevoked,
    LicenseUpdated,
    LicenseUsed,
    TenantCreated,
    TenantUpdated,
)
from projections.base import Projection, handles


@dataclass(slots=True)
class Tenant:
    id: str
    name: str
    active: bool
    created_at: float
    updated_at: float
    license_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class License:
    id: str
    tenant_id: str
    key_hash: str
    key_last4: str
    expires_at: float
    max_usage_count: int | None
    usage_count: int
    revoked: bool
    revoked_at: float | None
    revoke_reason: str | None
    created_at: float
    updated_at: float
    last_used_at: float | None
    version: int  # the license stream's version: the expected version of its next use

    def status(self, now: float) -> str:
        """revoked | expired | exhausted | active, in that order of precedence."""
        if self.revoked:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_usage_count is not None and self.usage_count >= self.max_usage_count:
            return "exhausted"
        return "active"


@dataclass
class TenantsProjection(Projection):
    name = "tenants"
    tenants: dict[str, Tenant] = field(default_factory=dict)
    licenses: dict[str, License] = field(default_factory=dict)
    by_key_hash: dict[str, str] = field(default_factory=dict)

    # --- apply ---

    @handles(TenantCreated)
    def _tenant_created(self, env: Envelope) -> None:
        e: TenantCreated = env.event  # type: ignore[assignment]
        self.tenants[e.tenant_id] = Tenant(e.tenant_id, e.name, e.active, env.ts, env.ts)

    @handles(TenantUpdated)
    def _tenant_updated(self, env: Envelope) -> None:
        e: TenantUpdated = env.event  # type: ignore[assignment]
        if (t := self.tenants.get(e.tenant_id)) is None:
            return
        if e.name is not None:
            t.name = e.name
        if e.active is not None:
            t.active = e.active
        t.updated_at = env.ts

    @handles(LicenseIssued)
    def _issued(self, env: Envelope) -> None:
        e: LicenseIssued = env.event  # type: ignore[assignment]
        self.licenses[e.license_id] = License(
            id=e.license_id,
            tenant_id=e.tenant_id,
            key_hash=e.key_hash,
            key_last4=e.key_last4,
            expires_at=e.expires_at,
            max_usage_count=e.max_usage_count,
            usage_count=0,
            revoked=False,
            revoked_at=None,
            revoke_reason=None,
            created_at=env.ts,
            updated_at=env.ts,
            last_used_at=None,
            version=env.stream_version,
        )
        self.by_key_hash[e.key_hash] = e.license_id
        if (t := self.tenants.get(e.tenant_id)) is not None:
            t.license_ids.append(e.license_id)

    @handles(LicenseUpdated)
    def _license_updated(self, env: Envelope) -> None:
        e: LicenseUpdated = env.event  # type: ignore[assignment]
        if (lic := self.licenses.get(e.license_id)) is None:
            return
        if e.expires_at is not msgspec.UNSET:
            lic.expires_at = e.expires_at
        if e.max_usage_count is not msgspec.UNSET:
            lic.max_usage_count = e.max_usage_count
        lic.updated_at = env.ts
        lic.version = env.stream_version

    @handles(LicenseRevoked)
    def _revoked(self, env: Envelope) -> None:
        e: LicenseRevoked = env.event  # type: ignore[assignment]
        if (lic := self.licenses.get(e.license_id)) is None:
            return
        if not lic.revoked:
            lic.revoked, lic.revoked_at, lic.revoke_reason = True, env.ts, e.reason
        lic.updated_at = env.ts
        lic.version = env.stream_version

    @handles(LicenseUsed)
    def _used(self, env: Envelope) -> None:
        e: LicenseUsed = env.event  # type: ignore[assignment]
        if (lic := self.licenses.get(e.license_id)) is None:
            return
        lic.usage_count += 1
        lic.last_used_at = env.ts
        lic.version = env.stream_version

    # --- queries ---

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self.tenants.get(tenant_id)

    def license(self, license_id: str) -> License | None:
        return self.licenses.get(license_id)

    def license_by_key_hash(self, key_hash: str) -> License | None:
        lid = self.by_key_hash.get(key_hash)
        return self.licenses.get(lid) if lid is not None else None

    def find_tenants(self, search: str | None = None, active: bool | None = None) -> list[Tenant]:
        """Tenants whose name or id contains `search` (case-insensitive), optionally by state."""
        needle = search.casefold() if search else None
        return [
            t
            for t in self.tenants.values()
            if (active is None or t.active == active)
            and (needle is None or needle in t.name.casefold() or needle in t.id)
        ]

    def find_licenses(
        self,
        now: float,
        tenant_id: str | None = None,
        status: str | None = None,
    ) -> list[License]:
        """Licenses, optionally of one tenant and in one status (see `License.status`)."""
        if tenant_id is not None:
            t = self.tenants.get(tenant_id)
            source = [self.licenses[i] for i in t.license_ids] if t is not None else []
        else:
            source = list(self.licenses.values())
        if status is None:
            return source
        return [lic for lic in source if lic.status(now) == status]
