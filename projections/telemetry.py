"""Telemetry from the tenants' nodes: the latest sample per tenant and rolling aggregates.

Per tenant the state is bounded: the latest sample plus one bucket per minute that saw samples,
over the last day (at most `DAY_MINUTES + 2` buckets). Window queries take `now` and are exact to
the minute: a window covers every bucket that overlaps `(now - window, now]`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from eventstore.base import Envelope
from eventstore.events import TelemetryRecorded
from projections.base import Projection, handles

HOUR = 3600.0
DAY = 86400.0
DAY_MINUTES = 1440
MAX_VERSIONS_PER_BUCKET = 32  # distinct version strings counted per minute; more go to "other"
OTHER_VERSION = "other"


@dataclass(slots=True)
class Sample:
    ts: float
    uptime: float
    active_users: int
    exercises_completed_today: int
    ai_latency: float | None
    version: str | None
    additional_data: dict[str, Any] | None


@dataclass(slots=True)
class Bucket:
    minute: int  # floor(ts / 60)
    samples: int = 0
    latency_sum: float = 0.0
    latency_samples: int = 0
    latency_max: float | None = None
    active_users_max: int = 0
    versions: dict[str, int] = field(default_factory=dict)

    def add(self, e: TelemetryRecorded) -> None:
        self.samples += 1
        if e.ai_latency is not None:
            self.latency_sum += e.ai_latency
            self.latency_samples += 1
            if self.latency_max is None or e.ai_latency > self.latency_max:
                self.latency_max = e.ai_latency
        if e.active_users > self.active_users_max:
            self.active_users_max = e.active_users
        if e.version is not None:
            v = e.version
            if v not in self.versions and len(self.versions) >= MAX_VERSIONS_PER_BUCKET:
                v = OTHER_VERSION
            self.versions[v] = self.versions.get(v, 0) + 1


@dataclass(slots=True)
class WindowStats:
    window_seconds: float
    samples: int = 0
    ai_latency_mean: float | None = None
    ai_latency_max: float | None = None
    active_users_max: int | None = None
    versions: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class TenantTelemetry:
    latest: Sample | None = None
    total_samples: int = 0
    buckets: deque[Bucket] = field(default_factory=deque)


@dataclass
class TelemetryProjection(Projection):
    name = "telemetry"
    tenants: dict[str, TenantTelemetry] = field(default_factory=dict)

    @handles(TelemetryRecorded)
    def _recorded(self, env: Envelope) -> None:
        e: TelemetryRecorded = env.event  # type: ignore[assignment]
        tt = self.tenants.get(e.tenant_id)
        if tt is None:
            tt = self.tenants[e.tenant_id] = TenantTelemetry()
        tt.latest = Sample(
            env.ts,
            e.uptime,
            e.active_users,
            e.exercises_completed_today,
            e.ai_latency,
            e.version,
            e.additional_data,
        )
        tt.total_samples += 1
        minute = int(env.ts // 60)
        buckets = tt.buckets
        if not buckets or buckets[-1].minute != minute:
            # The log's ts never decreases, so buckets stay in minute order.
            buckets.append(Bucket(minute))
            oldest = minute - DAY_MINUTES - 1
            while buckets[0].minute < oldest:
                buckets.popleft()
        buckets[-1].add(e)

    # --- queries ---

    def of(self, tenant_id: str) -> TenantTelemetry | None:
        return self.tenants.get(tenant_id)

    def window(self, tenant_id: str, now: float, seconds: float) -> WindowStats:
        """Aggregates over the buckets overlapping `(now - seconds, now]` (seconds <= a day)."""
        stats = WindowStats(seconds)
        tt = self.tenants.get(tenant_id)
        if tt is None:
            return stats
        first = int((now - seconds) // 60)
        last = int(now // 60)
        latency_sum, latency_n = 0.0, 0
        for b in reversed(tt.buckets):
            if b.minute < first:
                break
            if b.minute > last:
                continue
            stats.samples += b.samples
            latency_sum += b.latency_sum
            latency_n += b.latency_samples
            if b.latency_max is not None and (
                stats.ai_latency_max is None or b.latency_max > stats.ai_latency_max
            ):
                stats.ai_latency_max = b.latency_max
            if stats.active_users_max is None or b.active_users_max > stats.active_users_max:
                stats.active_users_max = b.active_users_max
            for v, n in b.versions.items():
                stats.versions[v] = stats.versions.get(v, 0) + n
        if latency_n:
            stats.ai_latency_mean = latency_sum / latency_n
        return stats

    def summary(self, tenant_id: str, now: float) -> dict[str, WindowStats]:
        """The last hour and the last day, as of `now`."""
        return {
            "last_hour": self.window(tenant_id, now, HOUR),
            "last_day": self.window(tenant_id, now, DAY),
        }
