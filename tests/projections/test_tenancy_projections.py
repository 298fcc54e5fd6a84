"""Tenants/licenses, updates and telemetry projections: pure folds of envelopes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore.base import Envelope
from eventstore.events import (
    BaseEvent,
    LicenseIssued,
    LicenseRevoked,
    LicenseUpdated,
    LicenseUsed,
    TelemetryRecorded,
    TenantCreated,
    TenantUpdated,
    UpdatePublished,
    UpdateWithdrawn,
)
from projections.base import Projections
from projections.telemetry import DAY, HOUR, TelemetryProjection
from projections.tenants import TenantsProjection
from projections.updates import UpdatesProjection, semver_key


def envelopes(events: Sequence[tuple[float, BaseEvent]]) -> list[Envelope]:
    versions: dict[str, int] = {}
    out = []
    for seq, (ts, e) in enumerate(events, 1):
        versions[e.stream] = versions.get(e.stream, 0) + 1
        out.append(Envelope(seq, e.stream, versions[e.stream], ts, f"id{seq}", e))
    return out


def fold(projection_cls: type, events: Sequence[tuple[float, BaseEvent]]) -> object:
    p = projection_cls()
    Projections([p]).apply_many(envelopes(events))
    return p


# --- tenants and licenses ---


def test_license_lifecycle_and_key_index() -> None:
    p: TenantsProjection = fold(  # type: ignore[assignment]
        TenantsProjection,
        [
            (10.0, TenantCreated(tenant_id="t1", name="Acme")),
            (11.0, LicenseIssued(license_id="l1", tenant_id="t1", key_hash="h1", key_last4="ABCD",
                                 expires_at=1000.0, max_usage_count=2)),
            (12.0, LicenseUsed(license_id="l1", tenant_id="t1", usage_count=1)),
            (13.0, LicenseUsed(license_id="l1", tenant_id="t1", usage_count=2)),
            (14.0, TenantUpdated(tenant_id="t1", active=False)),
        ],
    )  # fmt: skip
    lic = p.license_by_key_hash("h1")
    assert lic is not None and lic.id == "l1"
    assert lic.usage_count == 2 and lic.version == 3 and lic.last_used_at == 13.0
    assert lic.status(now=500.0) == "exhausted"
    assert lic.status(now=1000.0) == "expired"
    tenant = p.tenant("t1")
    assert tenant is not None and tenant.active is False and tenant.license_ids == ["l1"]
    assert p.find_licenses(500.0, tenant_id="t1", status="exhausted") == [lic]
    assert p.find_tenants(search="acm") == [tenant]
    assert p.find_tenants(active=True) == []


def test_license_patch_distinguishes_unset_from_unlimited() -> None:
    issued = LicenseIssued(
        license_id="l1", tenant_id="t1", key_hash="h", key_last4="WXYZ", expires_at=5.0,
        max_usage_count=3,
    )  # fmt: skip
    p: TenantsProjection = fold(  # type: ignore[assignment]
        TenantsProjection,
        [
            (1.0, TenantCreated(tenant_id="t1", name="A")),
            (2.0, issued),
            (3.0, LicenseUpdated(license_id="l1", tenant_id="t1", expires_at=99.0)),
        ],
    )
    lic = p.license("l1")
    assert lic is not None and lic.expires_at == 99.0 and lic.max_usage_count == 3
    p2: TenantsProjection = fold(  # type: ignore[assignment]
        TenantsProjection,
        [
            (1.0, TenantCreated(tenant_id="t1", name="A")),
            (2.0, issued),
            (3.0, LicenseUpdated(license_id="l1", tenant_id="t1", max_usage_count=None)),
            (4.0, LicenseRevoked(license_id="l1", tenant_id="t1", reason="leaked")),
        ],
    )
    lic2 = p2.license("l1")
    assert lic2 is not None and lic2.max_usage_count is None and lic2.expires_at == 5.0
    assert lic2.revoked and lic2.revoked_at == 4.0 and lic2.status(0.0) == "revoked"


# --- updates ---


def test_semver_precedence() -> None:
    order = [
        "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
        "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "1.10.0", "2.0.0",
    ]  # fmt: skip
    keys = [semver_key(v) for v in order]
    assert all(k is not None for k in keys)
    assert keys == sorted(keys)  # type: ignore[type-var]
    assert semver_key("1.0.0+build.5") == semver_key("1.0.0")
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0-01", "", "1.0.0 ", "a.b.c"):
        assert semver_key(bad) is None, bad


def _published(uid: str, version: str, tenants: list[str] | None = None) -> UpdatePublished:
    return UpdatePublished(
        update_id=uid, version=version, changelog="", sha256="0" * 64, file_size=1,
        tenant_ids=tenants,
    )  # fmt: skip


def test_latest_update_by_semver_and_audience() -> None:
    p: UpdatesProjection = fold(  # type: ignore[assignment]
        UpdatesProjection,
        [
            (1.0, _published("u1", "1.10.0")),
            (2.0, _published("u2", "1.9.0")),
            (3.0, _published("u3", "2.0.0", ["t2"])),
            (4.0, _published("u4", "1.11.0-rc.1")),
        ],
    )
    # a pre-release of a higher version ranks above the lower release
    latest = p.latest_for("t1")
    assert latest is not None and latest.id == "u4"
    t2 = p.latest_for("t2")
    assert t2 is not None and t2.id == "u3"
    p.handlers()[UpdateWithdrawn](Envelope(5, "u4", 2, 5.0, "x", UpdateWithdrawn(update_id="u4")))
    assert p.latest_for("t1").id == "u1"  # type: ignore[union-attr]
    assert p.conflicting("2.0.0", ["t2", "t3"]) is not None
    assert p.conflicting("2.0.0", ["t1"]) is None
    assert p.conflicting("1.9.0", ["t1"]) is not None


# --- telemetry ---


def _sample(latency: float | None, users: int, version: str | None = "1.0.0") -> TelemetryRecorded:
    return TelemetryRecorded(
        tenant_id="t1", uptime=1.0, active_users=users, exercises_completed_today=0,
        ai_latency=latency, version=version,
    )  # fmt: skip


def test_telemetry_windows_and_latest() -> None:
    base = 1_700_000_000.0 - (1_700_000_000.0 % 60)
    p: TelemetryProjection = fold(  # type: ignore[assignment]
        TelemetryProjection,
        [
            (base, _sample(100.0, 5, "1.0.0")),
            (base + 2 * HOUR, _sample(300.0, 9, "1.1.0")),
            (base + 2 * HOUR + 30, _sample(None, 3, "1.1.0")),
            (base + 2 * HOUR + 90, _sample(200.0, 4, None)),
        ],
    )
    now = base + 2 * HOUR + 100
    s = p.summary("t1", now)
    assert s["last_hour"].samples == 3
    assert s["last_hour"].ai_latency_mean == 250.0 and s["last_hour"].ai_latency_max == 300.0
    assert s["last_hour"].active_users_max == 9
    assert s["last_hour"].versions == {"1.1.0": 2}
    assert s["last_day"].samples == 4 and s["last_day"].ai_latency_mean == 200.0
    assert s["last_day"].versions == {"1.0.0": 1, "1.1.0": 2}
    tt = p.of("t1")
    assert tt is not None and tt.total_samples == 4 and tt.latest is not None
    assert tt.latest.ts == base + 2 * HOUR + 90 and tt.latest.ai_latency == 200.0
    # a day later, nothing is in either window
    assert p.summary("t1", now + DAY + 120)["last_day"].samples == 0
    assert p.summary("t2", now)["last_hour"].samples == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 3 * DAY, allow_nan=False),  # gap since the previous sample
            st.one_of(st.none(), st.floats(0, 10_000, allow_nan=False)),
            st.integers(0, 1000),
            st.sampled_from(["1.0.0", "1.1.0", "2.0.0"]),
        ),
        min_size=1,
        max_size=60,
    ),
    st.floats(0, 2 * DAY, allow_nan=False),
)
def test_telemetry_windows_match_a_naive_model(
    raw: list[tuple[float, float | None, int, str]], lookahead: float
) -> None:
    """Bucketed windows equal a scan of every sample whose minute overlaps the window, and the
    per-tenant state stays bounded."""
    ts = 1_000_000.0
    events: list[tuple[float, BaseEvent]] = []
    for gap, latency, users, version in raw:
        ts += gap / 50  # mostly dense, sometimes spread over days
        events.append((ts, _sample(latency, users, version)))
    p: TelemetryProjection = fold(TelemetryProjection, events)  # type: ignore[assignment]
    now = ts + lookahead / 50
    for window in (HOUR, DAY):
        first, last = math.floor((now - window) / 60), math.floor(now / 60)
        inside = [e for t, e in events if first <= math.floor(t / 60) <= last]
        got = p.window("t1", now, window)
        assert got.samples == len(inside)
        lat = [e.ai_latency for e in inside if e.ai_latency is not None]  # type: ignore[attr-defined]
        assert got.ai_latency_max == (max(lat) if lat else None)
        if lat:
            assert got.ai_latency_mean is not None
            assert math.isclose(got.ai_latency_mean, sum(lat) / len(lat), rel_tol=1e-9)
        users = [e.active_users for e in inside]  # type: ignore[attr-defined]
        assert got.active_users_max == (max(users) if users else None)
    tt = p.of("t1")
    assert tt is not None and len(tt.buckets) <= 1442


def test_replay_equals_live() -> None:
    """Fold all at once == apply one by one (the same events give the same state)."""
    events: list[tuple[float, BaseEvent]] = [
        (1.0, TenantCreated(tenant_id="t1", name="A")),
        (2.0, LicenseIssued(license_id="l1", tenant_id="t1", key_hash="h", key_last4="AAAA",
                            expires_at=9.0)),
        (3.0, LicenseUsed(license_id="l1", tenant_id="t1", usage_count=1)),
        (4.0, _published("u1", "1.0.0")),
        (5.0, _sample(1.0, 1)),
    ]  # fmt: skip
    envs = envelopes(events)
    a = [TenantsProjection(), UpdatesProjection(), TelemetryProjection()]
    Projections(a).apply_many(envs)
    b = [TenantsProjection(), UpdatesProjection(), TelemetryProjection()]
    pb = Projections(b)
    for env in envs:
        pb.apply(env)
    for x, y in zip(a, b, strict=True):
        assert vars(x) == vars(y)
