"""Tenants and license keys: the commands behind the admin API and `GET /api/license/validate`.

A license key is 32 characters of RFC 4648 base32 (160 bits from `secrets`) in four groups of
eight, `XXXXXXXX-XXXXXXXX-XXXXXXXX-XXXXXXXX`, shown once when issued. The log keeps its SHA-256
(enough for a random 160-bit key: nothing to brute-force) and its last four characters.

License uses are counted by `LicenseUses`: every successful validation appends `license.used` to
the license's own stream with the expected stream version, so no use is ever counted past
`max_usage_count`, even with several broker instances sharing the log.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog

from broker.errors import (
    BrokerError,
    Conflict,
    LicenseExpired,
    LicenseLimitReached,
    LicenseRevoked,
    NotFound,
    TenantInactive,
    ValidationFailed,
)
from broker.runtime import Runtime
from eventstore.base import ConcurrencyError
from eventstore.events import (
    LicenseIssued,
    LicenseUpdated,
    LicenseUsed,
    TenantCreated,
    TenantUpdated,
)
from eventstore.events import (
    LicenseRevoked as LicenseRevokedEvent,
)
from eventstore.timestamps import EARLIEST, LATEST
from projections.tenants import License, Tenant, TenantsProjection

log = structlog.get_logger(__name__)

# The seed's messages (002), word for word.
MSG_INVALID_KEY = "Clé de licence invalide"
MSG_EXPIRED = "Licence expirée"
MSG_TENANT_INACTIVE = "Tenant inactif"
MSG_REVOKED = "Licence révoquée"
MSG_LIMIT = "Limite d'utilisation atteinte"

MAX_NAME = 200
MAX_KEY_LENGTH = 64


# --- keys and times ---


def generate_key() -> str:
    """A fresh license key: 160 random bits as `XXXXXXXX-XXXXXXXX-XXXXXXXX-XXXXXXXX`."""
    raw = base64.b32encode(secrets.token_bytes(20)).decode("ascii")
    return "-".join(raw[i : i + 8] for i in range(0, 32, 8))


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256 of the key, trimmed and upper-cased."""
    return hashlib.sha256(key.strip().upper().encode()).hexdigest()


# The instants a date-time in UTC can render: 0001-01-01 to 9999-12-31 (a date with an offset
# can name an instant outside them, e.g. 9999-12-31T23:59:59-14:00).


def parse_time(value: str, field: str) -> float:
    """An ISO 8601 date or date-time as epoch seconds; no offset means UTC. 422 otherwise,
    including for an instant outside 0001-01-01..9999-12-31 UTC."""
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValidationFailed(
            f"{field} must be an ISO 8601 date-time, not {value!r}", details=[{"field": field}]
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        ts = parsed.timestamp()
        if EARLIEST <= ts <= LATEST:
            return ts
    except (OverflowError, ValueError):
        pass
    raise ValidationFailed(
        f"{field} must lie between 0001-01-01 and 9999-12-31 UTC, not {value!r}",
        details=[{"field": field}],
    )


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise ValidationFailed(
            f"name must have 1 to {MAX_NAME} characters", details=[{"field": "name"}]
        )
    return name


class Licensing:
    """Tenants and their licenses: the commands that record them and the lookups that find them."""

    def __init__(self, runtime: Runtime, uses: LicenseUses) -> None:
        self.runtime = runtime
        self.uses = uses

    @property
    def tenants(self) -> TenantsProjection:
        return self.runtime.tenants

    async def validate(self, key: str) -> LicenseUse:
        """Count a use of the license `key` (seed 002's validation), or raise why it may not."""
        return await self.uses.use(self.runtime, key)

    # --- tenants ---

    async def create_tenant(self, name: str, active: bool = True) -> Tenant:
        """Record a new tenant and return it."""
        tenant_id = str(uuid.uuid4())
        await self.runtime.record(
            [TenantCreated(tenant_id=tenant_id, name=_clean_name(name), active=active)],
            expected_version=0,
        )
        tenant = self.runtime.tenants.tenant(tenant_id)
        assert tenant is not None  # applied before record() returns
        return tenant

    def get_tenant(self, tenant_id: str) -> Tenant:
        tenant = self.runtime.tenants.tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"Tenant not found: {tenant_id}")
        return tenant

    async def update_tenant(
        self, tenant_id: str, name: str | None = None, active: bool | None = None
    ) -> Tenant:
        """Rename and/or (de)activate a tenant; a no-op PATCH records nothing."""
        tenant = self.get_tenant(tenant_id)
        new_name = _clean_name(name) if name is not None else None
        if new_name == tenant.name:
            new_name = None
        if active == tenant.active:
            active = None
        if new_name is not None or active is not None:
            await self.runtime.record(
                [TenantUpdated(tenant_id=tenant_id, name=new_name, active=active)]
            )
        return tenant

    # --- licenses ---

    async def issue_license(
        self, tenant_id: str, expires_at: float, max_usage_count: int | None
    ) -> tuple[License, str]:
        """Issue a license to a tenant; returns it with its key, which is never shown again."""
        if self.runtime.tenants.tenant(tenant_id) is None:
            raise ValidationFailed(
                f"unknown tenant_id: {tenant_id}", details=[{"field": "tenant_id"}]
            )
        while True:
            key = generate_key()
            key_hash = hash_key(key)
            if self.runtime.tenants.license_by_key_hash(key_hash) is None:
                break
        license_id = str(uuid.uuid4())
        event = LicenseIssued(
            license_id=license_id,
            tenant_id=tenant_id,
            key_hash=key_hash,
            key_last4=key[-4:],
            expires_at=expires_at,
            max_usage_count=max_usage_count,
        )
        await self.runtime.record([event], expected_version=0)
        lic = self.runtime.tenants.license(license_id)
        assert lic is not None
        return lic, key

    def get_license(self, license_id: str) -> License:
        lic = self.runtime.tenants.license(license_id)
        if lic is None:
            raise NotFound(f"License not found: {license_id}")
        return lic

    async def update_license(
        self,
        license_id: str,
        expires_at: float | msgspec.UnsetType = msgspec.UNSET,
        max_usage_count: int | None | msgspec.UnsetType = msgspec.UNSET,
    ) -> License:
        """Change a license's expiry and/or its maximum use count (None: unlimited)."""
        lic = self.get_license(license_id)
        if expires_at is msgspec.UNSET and max_usage_count is msgspec.UNSET:
            return lic
        event = LicenseUpdated(
            license_id=license_id,
            tenant_id=lic.tenant_id,
            expires_at=expires_at,
            max_usage_count=max_usage_count,
        )
        await self.runtime.record([event])
        return lic

    async def revoke_license(self, license_id: str, reason: str | None = None) -> License:
        """Revoke a license for good; revoking a revoked license changes nothing."""
        lic = self.get_license(license_id)
        if not lic.revoked:
            event = LicenseRevokedEvent(
                license_id=license_id, tenant_id=lic.tenant_id, reason=reason
            )
            await self.runtime.record([event])
        return lic


# --- validation: counted uses ---


@dataclass(frozen=True, slots=True)
class LicenseUse:
    """What a successful validation tells the node."""

    license_id: str
    tenant_id: str
    tenant_name: str
    expires_at: float
    usage_count: int  # including this use
    max_usage_count: int | None


def refusal(lic: License, tenant: Tenant | None, now: float) -> BrokerError | None:
    """Why `lic` may not be used now (limit aside), or None."""
    if tenant is None:
        return NotFound(MSG_INVALID_KEY)
    if lic.revoked:
        return LicenseRevoked(MSG_REVOKED)
    if now >= lic.expires_at:
        return LicenseExpired(MSG_EXPIRED)
    if not tenant.active:
        return TenantInactive(MSG_TENANT_INACTIVE)
    return None


class LicenseUses:
    """Counts validations as license uses, never past a license's `max_usage_count`.

    Concurrent validations of one license are combined: while one batch of uses is being
    recorded, the next ones queue, then are decided and appended together, with the license
    stream's expected version (a conflict means another writer got there first: decide again).
    A burst of N nodes validating one key costs a few appends, not N serialized ones.
    """

    def __init__(self, clock: Callable[[], float] = time.time, max_attempts: int = 20) -> None:
        self.clock = clock
        self.max_attempts = max_attempts
        self._pending: dict[str, list[asyncio.Future[LicenseUse]]] = {}
        self._draining: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def use(self, runtime: Runtime, key: str) -> LicenseUse:
        """Validate `key` and count one use; raise the seed's error otherwise."""
        key = key.strip()
        lic = None
        if 0 < len(key) <= MAX_KEY_LENGTH:
            lic = runtime.tenants.license_by_key_hash(hash_key(key))
        if lic is None:
            raise NotFound(MSG_INVALID_KEY)
        # Refuse at once what would be refused anyway: refusals record nothing.
        tenant = runtime.tenants.tenant(lic.tenant_id)
        if (err := refusal(lic, tenant, self.clock())) is not None:
            raise err
        if lic.max_usage_count is not None and lic.usage_count >= lic.max_usage_count:
            raise LicenseLimitReached(MSG_LIMIT)
        fut: asyncio.Future[LicenseUse] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(lic.id, []).append(fut)
        if lic.id not in self._draining:
            self._draining.add(lic.id)
            task = asyncio.create_task(self._drain(runtime, lic.id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def close(self) -> None:
        """Let the batches in flight finish (at shutdown, before the log closes)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self, runtime: Runtime, license_id: str) -> None:
        try:
            while batch := self._pending.pop(license_id, None):
                try:
                    await self._commit(runtime, license_id, batch)
                except Exception as exc:  # the log failed: every waiter of the batch learns it
                    log.warning("license_use_failed", license_id=license_id, error=repr(exc))
                    for fut in batch:
                        if not fut.done():
                            fut.set_exception(_copy(exc))
        finally:
            self._draining.discard(license_id)

    async def _commit(
        self, runtime: Runtime, license_id: str, batch: list[asyncio.Future[LicenseUse]]
    ) -> None:
        for attempt in range(self.max_attempts):
            waiters = [f for f in batch if not f.done()]  # a cancelled validation uses nothing
            if not waiters:
                return
            lic = runtime.tenants.license(license_id)
            if lic is None:
                raise NotFound(MSG_INVALID_KEY)
            tenant = runtime.tenants.tenant(lic.tenant_id)
            if (err := refusal(lic, tenant, self.clock())) is not None:
                for fut in waiters:
                    fut.set_exception(_copy(err))
                return
            assert tenant is not None
            room = len(waiters)
            if lic.max_usage_count is not None:
                room = max(0, min(room, lic.max_usage_count - lic.usage_count))
            base = lic.usage_count
            if room:
                events = [
                    LicenseUsed(license_id=license_id, tenant_id=lic.tenant_id, usage_count=n)
                    for n in range(base + 1, base + room + 1)
                ]
                try:
                    await runtime.record(events, expected_version=lic.version)
                except ConcurrencyError:
                    # Someone else wrote to this license (an operator, another instance): wait
                    # for our projection to see it, then decide again.
                    await asyncio.sleep(0 if attempt == 0 else min(0.05, 0.001 * 2**attempt))
                    continue
            for i, fut in enumerate(waiters):
                if fut.done():
                    continue
                if i < room:
                    fut.set_result(
                        LicenseUse(
                            license_id,
                            lic.tenant_id,
                            tenant.name,
                            lic.expires_at,
                            base + i + 1,
                            lic.max_usage_count,
                        )
                    )
                else:
                    fut.set_exception(LicenseLimitReached(MSG_LIMIT))
            return
        raise Conflict("the license is being changed concurrently; retry")


def _copy(err: BaseException) -> BaseException:
    """A fresh instance per waiter: one exception object must not be raised in many tasks."""
    if isinstance(err, BrokerError):
        return type(err)(err.message, details=list(err.details), headers=dict(err.headers))
    try:
        return type(err)(*err.args)
    except Exception:
        return err
