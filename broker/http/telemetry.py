"""HTTP routes for telemetry: the nodes' `POST /telemetry` (seed 002, public: the client sends no
token, the tenant id is what it knows) and the operators' view of it per tenant."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from aiohttp import web

from broker.http.auth import Permission, Public
from broker.http.bodies import decode_body, json_response
from broker.http.routing import Routes
from broker.keys import LICENSING, TELEMETRY
from broker.services.telemetry import MSG_RECORDED
from eventstore.timestamps import iso
from projections.telemetry import Sample, WindowStats

routes = Routes("telemetry")
ADMIN = Permission("licenses:admin")

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # declared, so no client sends more


class TelemetryIn(msgspec.Struct, kw_only=True):
    """The seed's sample, field for field; unknown fields are ignored."""

    tenantId: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    uptime: NonNegative
    activeUsers: Count
    exercisesCompletedToday: Count
    aiLatency: NonNegative | None = None
    version: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    additionalData: dict[str, Any] | None = None  # size-bounded: [telemetry] config


class TelemetryAck(msgspec.Struct, kw_only=True):
    success: bool
    message: str
    timestamp: str


class SampleOut(msgspec.Struct, kw_only=True):
    received_at: str
    uptime: float
    active_users: int
    exercises_completed_today: int
    ai_latency: float | None
    version: str | None
    additional_data: dict[str, Any] | None


class TenantTelemetryOut(msgspec.Struct, kw_only=True):
    tenant_id: str
    total_samples: int
    latest: SampleOut | None


class WindowOut(msgspec.Struct, kw_only=True):
    window_seconds: float
    samples: int
    ai_latency_mean: float | None
    ai_latency_max: float | None
    active_users_max: int | None
    versions: dict[str, int]  # version -> samples reporting it


class TelemetrySummaryOut(msgspec.Struct, kw_only=True):
    tenant_id: str
    as_of: str
    last_sample_at: str | None
    last_hour: WindowOut
    last_day: WindowOut


@routes.post(
    "/telemetry",
    policy=Public(),
    body=TelemetryIn,
    response=TelemetryAck,
    status=201,
    errors=(400,),  # TENANT_INACTIVE: a sample for a deactivated tenant
    summary="Record a telemetry sample from a node",
    tags=("nodes: telemetry",),
)
async def post_telemetry(request: web.Request) -> web.Response:
    body = await decode_body(request, TelemetryIn)
    env = await request.app[TELEMETRY].record(
        tenant_id=body.tenantId,
        uptime=body.uptime,
        active_users=body.activeUsers,
        exercises_completed_today=body.exercisesCompletedToday,
        ai_latency=body.aiLatency,
        version=body.version,
        additional_data=body.additionalData,
    )
    ack = TelemetryAck(success=True, message=MSG_RECORDED, timestamp=iso(env.ts) or "")
    return json_response(ack, status=201)


def _sample_out(s: Sample) -> SampleOut:
    return SampleOut(
        received_at=iso(s.ts) or "",
        uptime=s.uptime,
        active_users=s.active_users,
        exercises_completed_today=s.exercises_completed_today,
        ai_latency=s.ai_latency,
        version=s.version,
        additional_data=s.additional_data,
    )


def _window_out(w: WindowStats) -> WindowOut:
    return WindowOut(
        window_seconds=w.window_seconds,
        samples=w.samples,
        ai_latency_mean=w.ai_latency_mean,
        ai_latency_max=w.ai_latency_max,
        active_users_max=w.active_users_max,
        versions=w.versions,
    )


@routes.get(
    "/api/v1/admin/tenants/{tenant_id}/telemetry",
    policy=ADMIN,
    response=TenantTelemetryOut,
    summary="A tenant's latest telemetry sample",
)
async def tenant_telemetry(request: web.Request) -> web.Response:
    tenant = request.app[LICENSING].get_tenant(request.match_info["tenant_id"])
    telemetry = request.app[TELEMETRY].telemetry
    tt = telemetry.of(tenant.id)
    return json_response(
        TenantTelemetryOut(
            tenant_id=tenant.id,
            total_samples=tt.total_samples if tt is not None else 0,
            latest=_sample_out(tt.latest) if tt is not None and tt.latest is not None else None,
        )
    )


@routes.get(
    "/api/v1/admin/tenants/{tenant_id}/telemetry/summary",
    policy=ADMIN,
    response=TelemetrySummaryOut,
    summary="A tenant's telemetry over the last hour and the last day",
)
async def tenant_telemetry_summary(request: web.Request) -> web.Response:
    tenant = request.app[LICENSING].get_tenant(request.match_info["tenant_id"])
    telemetry = request.app[TELEMETRY].telemetry
    now = time.time()
    windows = telemetry.summary(tenant.id, now)
    tt = telemetry.of(tenant.id)
    last = tt.latest.ts if tt is not None and tt.latest is not None else None
    return json_response(
        TelemetrySummaryOut(
            tenant_id=tenant.id,
            as_of=iso(now) or "",
            last_sample_at=iso(last),
            last_hour=_window_out(windows["last_hour"]),
            last_day=_window_out(windows["last_day"]),
        )
    )
