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
from broker.runtime import Runtime
from broker.services.licensing import MSG_TENANT_INACTIVE
from eventstore.base import Envelope
from eventstore.events import TelemetryRecorded
from projections.telemetry import TelemetryProjection

MSG_RECORDED = "Télémétrie enregistrée avec succès"
_json = msgspec.json.Encoder()


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


def check_additional_data(data: dict[str, Any] | None, max_bytes: int) -> None:
    """Refuse an `additionalData` object whose JSON is larger than `max_bytes` (422)."""
    if data and len(_json.encode(data)) > max_bytes:
        raise ValidationFailed(
            f"additionalData larger than {max_bytes} bytes",
            details=[{"field": "additionalData", "max_bytes": max_bytes}],
        )


class Telemetry:
    """Tenants' telemetry samples: recorded at a rate per tenant, read from the projection."""

    def __init__(
        self, runtime: Runtime, limiter: TenantRateLimiter, config: TelemetryConfig
    ) -> None:
        self.runtime = runtime
        self.limiter = limiter
        self.config = config

    @property
    def telemetry(self) -> TelemetryProjection:
        return self.runtime.telemetry

    async def record(
        self,
        *,
        tenant_id: str,
        uptime: float,
        active_users: int,
        exercises_completed_today: int,
        ai_latency: float | None = None,
        version: str | None = None,
        additional_data: dict[str, Any] | None = None,
    ) -> Envelope:
        """Check the tenant, the size of the extras and the rate, then record one sample."""
        tenant = self.runtime.tenants.tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"Tenant not found: {tenant_id}")
        if not tenant.active:
            raise TenantInactive(MSG_TENANT_INACTIVE)
        check_additional_data(additional_data, self.config.max_additional_data_bytes)
        for field, value in (("uptime", uptime), ("aiLatency", ai_latency)):
            if value is not None and not math.isfinite(value):
                raise ValidationFailed(
                    f"{field} must be a finite number", details=[{"field": field}]
                )
        self.limiter.take(tenant_id)
        event = TelemetryRecorded(
            tenant_id=tenant_id,
            uptime=uptime,
            active_users=active_users,
            exercises_completed_today=exercises_completed_today,
            ai_latency=ai_latency,
            version=version,
            additional_data=additional_data,
        )
        envs = await self.runtime.record([event])
        return envs[0]
