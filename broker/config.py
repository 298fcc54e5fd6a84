"""Typed configuration: `config.toml` decoded by msgspec, then `BROKER_<SECTION>__<KEY>` overrides.

Unknown keys are an error, so a typo fails at start instead of being ignored.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from eventstore.base import StoreConfig

DEFAULT_PATH = "config.toml"


class ConfigError(Exception):
    """The configuration is unreadable or invalid; the message says where and why."""


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = msgspec.field(default=8000)
    data_dir: str = "./data"  # keys and other files beside the log
    max_body_bytes: int = 1024 * 1024  # request bodies larger than this get 413
    shutdown_timeout: float = 10.0
    lean_front: bool = True  # the hot routes answered below aiohttp's objects (broker.http.lean)
    # TLS (docs/deployment.md): PEM files, read again on SIGHUP. Empty tls_cert: plain HTTP.
    tls_cert: str = ""  # the certificate chain (may hold the key too)
    tls_key: str = ""  # the private key, unless in tls_cert
    tls_client_ca: str = ""  # mutual TLS: clients must present a certificate signed by this CA


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class LogConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: str = "info"  # one of LOG_LEVELS, any case
    format: str = "json"  # json | console


class UpdatesConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[updates]`: software updates uploaded by operators (stored under data_dir/updates)."""

    max_file_bytes: int = 200 * 1024 * 1024  # larger uploads get 413


class TelemetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[telemetry]`: samples posted by nodes to POST /telemetry."""

    rate_limit_per_minute: int = 600  # per tenant; 0 disables the limit
    rate_limit_burst: int = 0  # samples allowed at once; 0 means rate_limit_per_minute
    max_additional_data_bytes: int = 8192  # JSON size of `additionalData`


class AuthConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[auth]`: tokens, node login challenges, presence."""

    issuer: str = "fleet-broker"  # the JWT `iss`
    audience: str = "fleet-broker"  # the JWT `aud`
    access_ttl: float = 900.0  # seconds an access token lives (15 min)
    refresh_ttl: float = 30 * 86400.0  # seconds a refresh token lives (30 days); renewed on refresh
    key_file: str = ""  # Ed25519 signing key (PEM); default <data_dir>/jwt_ed25519.pem
    leeway: float = 5.0  # clock skew tolerated on exp/iat between instances
    challenge_ttl: float = 60.0  # seconds a login challenge lives
    max_outstanding_challenges: int = 5  # per node and instance: issued, not yet used or expired
    max_sessions: int = 10  # live refresh-token families per node or user; the oldest is revoked
    token_cache_size: int = 100_000  # verified access tokens remembered until they expire
    min_rsa_bits: int = 2048  # smallest node public key accepted
    heartbeat_interval: float = 30.0  # seconds between a node's heartbeats
    online_after_missed: float = 2.0  # online while the last heartbeat is < this many intervals old
    stale_after_missed: float = 10.0  # then stale until this many intervals; offline after
    metrics_token_file: str = ""  # a file holding a token that may read /metrics (and only that)
    # POST /auth/register (seed 004): off unless enabled. A new account is inactive until an
    # admin activates it, or active with `registration_role` when that names a role.
    self_registration: bool = False
    registration_role: str = ""


class LimitsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[limits]`: request rate limits (token buckets refilled over `window` seconds)."""

    enabled: bool = True
    window: float = 60.0
    per_principal: int = 1000  # requests per window per node or operator (any route)
    per_ip: int = 300  # requests per window per IP on routes without a valid token
    login_per_ip: int = 60  # login, challenge and verify requests per window per IP
    login_per_subject: int = 10  # the same, per node id or username
    trust_forwarded_for: bool = False  # key on X-Forwarded-For's last entry (behind a proxy only)
    max_tracked: int = 100_000  # buckets kept in memory before idle ones are dropped


class DeliveryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[delivery]`: messages, the delivery queue and the node WebSocket (DESIGN.md §5, §7)."""

    window: int = 100  # unacknowledged pushes in flight per connection
    ack_timeout: float = 30.0  # seconds before an unacknowledged push is redelivered
    max_attempts: int = 10  # pushes without ack before a message becomes a dead letter
    max_ttl: float = 3600.0  # largest `ttl` a sender may ask for, in seconds
    default_ttl: float = 3600.0
    max_recipients: int = 1000
    max_content_bytes: int = 64 * 1024  # JSON size of a message's `content`
    ws_max_message_bytes: int = 1024 * 1024  # larger WebSocket frames close the connection
    ws_heartbeat: float = 30.0  # a node socket silent this long is pinged; no pong: dropped
    ws_auth_timeout: float = 5.0  # seconds to send the auth frame when not authed at upgrade
    ws_send_timeout: float = 10.0  # a consumer that does not read for this long is dropped
    ws_max_pending_ops: int = 256  # ops of one connection being processed at once
    # Node WebSockets open at once; past it a new one is closed with 1013 (try again later).
    # 0: the process's descriptor limit less `fd_reserve` (kept for the log, files, HTTP).
    ws_max_connections: int = 0
    fd_reserve: int = 1024
    allowed_origins: list[str] = []  # browser Origins allowed on the node WebSocket
    expiry_batch: int = 1000  # expired messages recorded per sweep


class EventsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[events]`: the operators' window on the log (event API, live feed, time travel)."""

    page_scan_limit: int = 100_000  # events one GET /api/v1/events scans at most (then a cursor)
    feed_max_buffer: int = 10_000  # live events a feed may fall behind before it is dropped
    feed_write_buffer: int = 256 * 1024  # bytes buffered for a feed's socket before it waits
    feed_send_timeout: float = 10.0  # a feed whose socket takes longer than this is dropped
    ws_auth_timeout: float = 5.0  # seconds to send the auth frame on GET /ws
    ws_heartbeat: float = 30.0  # WebSocket ping interval; also how often the token is rechecked
    sse_ping: float = 15.0  # seconds between SSE keep-alive comments (and token rechecks)
    rebuild_window: int = 16_384  # time travel: events read between two yields to the loop


class SnapshotsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[snapshots]`: projection snapshots that make start-up replay only the log's tail."""

    enabled: bool = True
    every: int = 100_000  # events between two snapshots (one is also written at shutdown)...
    interval: float = 600.0  # ... or seconds, when anything was appended meanwhile...
    min_interval: float = 60.0  # ... but never two within this many seconds
    keep: int = 2  # newest snapshots kept on disk
    directory: str = ""  # default <data_dir>/snapshots


# Event types a compaction may remove, and how (broker/upkeep/compaction.py,
# docs/operations.md). Any other type is an audit event, kept for ever. "message.*" counts from a
# message's close.
KEEP_NEWEST = ("node.heartbeat", "node.telemetry", "telemetry.recorded", "token.rotated")
RETAINABLE = (*KEEP_NEWEST, "node.connected", "auth.challenge_used", "message.*")
DEFAULT_DAYS: dict[str, float] = {
    "node.heartbeat": 7.0,
    "node.telemetry": 7.0,
    "telemetry.recorded": 7.0,
    "message.*": 7.0,
    "node.connected": 7.0,
    "auth.challenge_used": 1.0,  # a challenge lives [auth] challenge_ttl (a minute)
    "token.rotated": 31.0,  # a refresh token lives [auth] refresh_ttl (30 days)
}


class RetentionConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[retention]`: what compaction may remove (days kept per event type, 0 = for ever) and
    when `broker serve` compacts by itself."""

    days: dict[str, float] = msgspec.field(default_factory=lambda: dict(DEFAULT_DAYS))
    every: float = 86400.0  # seconds between background compactions in broker serve; 0 = never
    batch_chunks: int = 2  # chunks rewritten per transaction (appends wait at most that long)
    # Seconds between background verifications of the sqlite log in broker serve, each from the
    # verified checkpoint to the head (broker/upkeep/verification.py); 0 = never.
    verify_every: float = 3600.0
    # Where a compaction writes the events it removes before removing them ("": nowhere);
    # `broker replay|export|verify --archive DIR` read it (eventstore.sqlite_archive).
    archive_dir: str = ""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    updates: UpdatesConfig = msgspec.field(default_factory=UpdatesConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    snapshots: SnapshotsConfig = msgspec.field(default_factory=SnapshotsConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read `path` (or ./config.toml when it exists), apply env overrides, validate."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = Path(path) if path is not None else Path(DEFAULT_PATH)
    if path is not None and not source.exists():
        raise ConfigError(f"config file {source} does not exist")
    if source.exists():
        try:
            data = tomllib.loads(source.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {source}: {exc}") from None
    for key, value in env.items():
        if not key.startswith("BROKER_") or "__" not in key:
            continue
        section, _, name = key[len("BROKER_") :].lower().partition("__")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{key}: [{section}] is not a section")
        target[name] = value
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        where = f"{source}" if source.exists() else "the configuration"
        raise ConfigError(f"invalid {where} (or BROKER_* environment): {exc}") from None
    _check(config)
    return config


def _check(config: Config) -> None:
    _check_retention(config.retention)
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(f"[server] port must be 0..65535, not {config.server.port}")
    if (config.server.tls_key or config.server.tls_client_ca) and not config.server.tls_cert:
        raise ConfigError("[server] tls_key and tls_client_ca need tls_cert")
    if config.store.backend not in ("sqlite", "memory", "nats"):
        raise ConfigError(
            f"[store] backend must be sqlite, memory or nats, not {config.store.backend!r}"
        )
    if config.store.synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(
            f"[store] synchronous must be OFF, NORMAL, FULL or EXTRA, not "
            f"{config.store.synchronous!r}"
        )
    if config.log.level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"[log] level must be one of {', '.join(LOG_LEVELS)}, not {config.log.level!r}"
        )
    if config.log.format not in ("json", "console"):
        raise ConfigError(f"[log] format must be json or console, not {config.log.format!r}")
    auth = config.auth
    for name in ("access_ttl", "refresh_ttl", "challenge_ttl", "heartbeat_interval"):
        if getattr(auth, name) <= 0:
            raise ConfigError(f"[auth] {name} must be positive")
    if not 0 < auth.online_after_missed <= auth.stale_after_missed:
        raise ConfigError("[auth] needs 0 < online_after_missed <= stale_after_missed")
    if auth.min_rsa_bits < 2048:
        raise ConfigError("[auth] min_rsa_bits must be at least 2048")
    limits = config.limits
    for name in ("window", "per_principal", "per_ip", "login_per_ip", "login_per_subject"):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"[limits] {name} must be positive")
    for section in ("events", "snapshots"):
        for name, value in msgspec.structs.asdict(getattr(config, section)).items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if name == "min_interval" and value < 0:
                raise ConfigError(f"[{section}] {name} must be 0 or more")
            if name != "min_interval" and value <= 0:
                raise ConfigError(f"[{section}] {name} must be positive")


def _check_retention(retention: RetentionConfig) -> None:
    days = {**DEFAULT_DAYS, **retention.days}  # a type left out keeps its default
    for name, value in days.items():
        if name not in RETAINABLE:
            raise ConfigError(
                f"[retention] days: {name!r} cannot be removed (an audit event, kept for ever); "
                f"configurable: {', '.join(RETAINABLE)}"
            )
        if value < 0:
            raise ConfigError(f"[retention] days.{name!r} must be >= 0 (0 = for ever), not {value}")
    retention.days = days
    if retention.every < 0 or retention.batch_chunks < 1 or retention.verify_every < 0:
        raise ConfigError("[retention] every and verify_every must be >= 0, and batch_chunks >= 1")
