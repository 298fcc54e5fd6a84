"""Telemetry samples from nodes (seed 002 `POST /telemetry`), rate-limited per tenant.

The limiter is a token bucket per tenant, in process (each broker instance limits what it
receives). Only known, active tenants reach it, so its size is bounded by the tenant count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import msgspec

from broker.config import TelemetryConfig
from broker.errors import NotFound, RateLimited, TenantInactive, ValidationFailed
from broker.licensing import MSG_TENANT_INACTIVE
from broker.runtime import Runtime
from eventstore.base import Envelope
from eventstore.events import TelemetryRecorded

MSG_RECORDED = "Télémétrie enregistrée avec succès"
_object = msgspec.json.Decoder(dict[str, Any])


class TenantRateLimiter:
    """A token bucket per key: `rate_per_minute` tokens a minute, at most `burst` at once."""

    def __init__(
        self, rate_per_minute: int, burst: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate_per_minute = rate_per_minute
        self.capacity = float(burst or rate_per_minute)
        self.per_second = rate_per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, updated_at]

    def take(self, key: str) -> None:
        """Spend one token of `key`'s bucket or raise RateLimited (429 with Retry-After)."""
        if self.rate_per_minute <= 0:
            return
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.capacity, now]
        else:
            bucket[0] = min(self.capacity, bucket[0] + (now - bucket[1]) * self.per_second)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return
        wait = (1.0 - bucket[0]) / self.per_second
        raise RateLimited(
            f"telemetry rate limit reached for this tenant ({self.rate_per_minute}/min)",
            headers={
                "Retry-After": str(max(1, math.ceil(wait))),
                "X-RateLimit-Limit": str(self.rate_per_minute),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(math.ceil(time.time() + wait)),
            },
        )


def additional_data(raw: msgspec.Raw, max_bytes: int) -> dict[str, Any] | None:
    """Decode the raw `additionalData` (a JSON object or null), bounded in size."""
    data = bytes(raw)
    if data in (b"", b"null"):
        return None
    if len(data) > max_bytes:
        raise ValidationFailed(
            f"additionalData larger than {max_bytes} bytes",
            details=[{"field": "additionalData", "max_bytes": max_bytes}],
        )
    try:
        return _object.decode(data)
    except msgspec.DecodeError:
        raise ValidationFailed(
            "additionalData must be a JSON object", details=[{"field": "additionalData"}]
        ) from None


async def record_telemetry(
    runtime: Runtime,
    limiter: TenantRateLimiter,
    config: TelemetryConfig,
    *,
    tenant_id: str,
    uptime: float,
    active_users: int,
    exercises_completed_today: int,
    ai_latency: float | None = None,
    version: str | None = None,
    raw_additional_data: msgspec.Raw | None = None,
) -> Envelope:
    """Check the tenant, the size of the extras and the rate, then record one sample."""
    tenant = runtime.tenants.tenant(tenant_id)
    if tenant is None:
        raise NotFound(f"Tenant not found: {tenant_id}")
    if not tenant.active:
        raise TenantInactive(MSG_TENANT_INACTIVE)
    extra = (
        additional_data(raw_additional_data, config.max_additional_data_bytes)
        if raw_additional_data is not None
        else None
    )
    for field, value in (("uptime", uptime), ("aiLatency", ai_latency)):
        if value is not None and not math.isfinite(value):
            raise ValidationFailed(f"{field} must be a finite number", details=[{"field": field}])
    limiter.take(tenant_id)
    event = TelemetryRecorded(
        tenant_id=tenant_id,
        uptime=uptime,
        active_users=active_users,
        exercises_completed_today=exercises_completed_today,
        ai_latency=ai_latency,
        version=version,
        additional_data=extra,
    )
    envs = await runtime.record([event])
    return envs[0]
