"""Every event type the broker records, in one module.

Rules (STYLE.md 1-2): each event is a frozen msgspec Struct with an explicit, stable tag; schemas
only grow (new fields get defaults, nothing is renamed or retyped); upgrades of old shapes happen in
`eventstore.codec`. `STREAM_FIELD` names, per class, the field whose value is the event's stream.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import msgspec


class BaseEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Common base: subclasses set `tag=` and `stream_field`.

    ``gc=False`` (inherited): events are immutable data that can't form reference cycles, and
    the projections keep many of them, so the cyclic garbage collector need not track them
    (its pauses grow with the number of tracked objects)."""

    stream_field: ClassVar[str]
    event_type: ClassVar[str]  # the tag, set for every class of `Event` below

    @property
    def stream(self) -> str:
        value: str = getattr(self, self.stream_field)
        return value

    @classmethod
    def type_name(cls) -> str:
        return str(cls.__struct_config__.tag)


# --- operators: users, roles, permissions ---
# Streams: the user id; "role:<name>"; "permission:<name>".


class UserCreated(BaseEvent, frozen=True, tag="user.created"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    username: str
    password_hash: str
    email: str | None = None
    full_name: str | None = None
    roles: list[str] = []
    is_active: bool = True


class UserUpdated(BaseEvent, frozen=True, tag="user.updated"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    email: str | None = None
    full_name: str | None = None


class UserPasswordChanged(BaseEvent, frozen=True, tag="user.password_changed"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    password_hash: str
    reason: str = ""  # change (by the user) | reset (by an admin or offline) | rehash (at login)
    must_change: bool = False  # the user must choose a new password before doing anything else


class UserActivated(BaseEvent, frozen=True, tag="user.activated"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str


class UserDeactivated(BaseEvent, frozen=True, tag="user.deactivated"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str


class UserRoleGranted(BaseEvent, frozen=True, tag="user.role_granted"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    role: str


class UserRoleRevoked(BaseEvent, frozen=True, tag="user.role_revoked"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    role: str


class RoleCreated(BaseEvent, frozen=True, tag="role.created"):
    stream_field: ClassVar[str] = "role_id"
    role_id: str
    name: str
    description: str | None = None
    permissions: list[str] = []


class RoleUpdated(BaseEvent, frozen=True, tag="role.updated"):
    stream_field: ClassVar[str] = "role_id"
    role_id: str
    description: str | None = None
    permissions: list[str] | None = None


class RoleDeleted(BaseEvent, frozen=True, tag="role.deleted"):
    stream_field: ClassVar[str] = "role_id"
    role_id: str


class PermissionCreated(BaseEvent, frozen=True, tag="permission.created"):
    stream_field: ClassVar[str] = "permission_id"
    permission_id: str
    name: str
    description: str | None = None


# --- identity: nodes, logins, challenges, token families ---
# Streams: the node id for node.*; the user id for user.login; "chl:<hash of the nonce>" for
# auth.challenge_used (one stream per challenge, appended with expected version 0, so the log itself
# refuses a second use, on every instance); "rtf:<id>" for token.* (one refresh-token family).


class NodeRegistered(BaseEvent, frozen=True, tag="node.registered"):
    stream_field: ClassVar[str] = "node_id"
    node_id: str
    name: str
    node_type: str  # the node's "type" ("type" is the tag field of every event)
    public_key: str  # PEM (SubjectPublicKeyInfo), RSA >= 2048 bits
    capabilities: list[str] = []
    endpoint: str = ""
    metadata: dict[str, Any] = {}
    status: str = "active"


class NodeStatusUpdated(BaseEvent, frozen=True, tag="node.status_updated"):
    """A status update; None fields are unchanged, `metadata` is merged key by key."""

    stream_field: ClassVar[str] = "node_id"
    node_id: str
    status: str | None = None
    load: float | None = None
    available_resources: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    last_seen: str | float | None = None  # as the client sent it
    by: str = ""  # "node" or "user:<id>"


class NodeHeartbeat(BaseEvent, frozen=True, tag="node.heartbeat"):
    stream_field: ClassVar[str] = "node_id"
    node_id: str
    timestamp: str | float | None = None  # the client's clock, recorded as given
    status: str | None = None
    metrics: dict[str, Any] = {}


class NodeLoggedIn(BaseEvent, frozen=True, tag="node.login"):
    stream_field: ClassVar[str] = "node_id"
    node_id: str
    family_id: str


class NodeDeregistered(BaseEvent, frozen=True, tag="node.deregistered"):
    stream_field: ClassVar[str] = "node_id"
    node_id: str
    by: str = ""
    reason: str = ""


class ChallengeUsed(BaseEvent, frozen=True, tag="auth.challenge_used"):
    """A login challenge was presented to verify (rightly or not): it can never be used again."""

    stream_field: ClassVar[str] = "challenge_id"
    challenge_id: str  # "chl:" + hash of the nonce
    node_id: str
    accepted: bool = False


class UserLoggedIn(BaseEvent, frozen=True, tag="user.login"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    family_id: str


class TokenFamilyStarted(BaseEvent, frozen=True, tag="token.family_started"):
    """A login: a new refresh-token family and its first token (stored as a hash only)."""

    stream_field: ClassVar[str] = "family_id"
    family_id: str  # "rtf:<hex>"
    subject_kind: str  # node | user
    subject_id: str
    token_hash: str
    expires_at: float


class TokenRotated(BaseEvent, frozen=True, tag="token.rotated"):
    stream_field: ClassVar[str] = "family_id"
    family_id: str
    token_hash: str
    expires_at: float


class TokenFamilyRevoked(BaseEvent, frozen=True, tag="token.family_revoked"):
    stream_field: ClassVar[str] = "family_id"
    family_id: str
    reason: str = ""  # logout | reuse | superseded | ...


class ApiKeyCreated(BaseEvent, frozen=True, tag="apikey.created"):
    """An operator's API key for automation (broker.services.apikeys): only its hash is kept."""

    stream_field: ClassVar[str] = "key_id"
    key_id: str  # "apk_<hex>": the public part of the key
    name: str
    owner_id: str  # the user the key acts as (never with more than the user's permissions)
    scopes: list[str]
    key_hash: str
    expires_at: float | None = None  # None: never


class ApiKeyUsed(BaseEvent, frozen=True, tag="apikey.used"):
    """A key authenticated a request (recorded at most once a minute per key)."""

    stream_field: ClassVar[str] = "key_id"
    key_id: str


class ApiKeyRevoked(BaseEvent, frozen=True, tag="apikey.revoked"):
    stream_field: ClassVar[str] = "key_id"
    key_id: str
    by: str = ""  # the user id of whoever revoked it
    reason: str = ""


# --- tenants, licenses, updates, telemetry ---
# Streams: the tenant id for tenant.* and telemetry.*, the license id for license.* (usage counting
# needs per-license optimistic concurrency), the update id for update.*. Times are epoch seconds.


class TenantCreated(BaseEvent, frozen=True, tag="tenant.created"):
    stream_field: ClassVar[str] = "tenant_id"
    tenant_id: str
    name: str
    active: bool = True


class TenantUpdated(BaseEvent, frozen=True, tag="tenant.updated"):
    """A PATCH: None leaves a field as it is."""

    stream_field: ClassVar[str] = "tenant_id"
    tenant_id: str
    name: str | None = None
    active: bool | None = None


class LicenseIssued(BaseEvent, frozen=True, tag="license.issued"):
    """The key itself is never recorded: only its SHA-256 and its last four characters."""

    stream_field: ClassVar[str] = "license_id"
    license_id: str
    tenant_id: str
    key_hash: str
    key_last4: str
    expires_at: float
    max_usage_count: int | None = None  # None: unlimited


class LicenseUpdated(BaseEvent, frozen=True, tag="license.updated"):
    """A PATCH: UNSET leaves a field as it is (max_usage_count=None means unlimited)."""

    stream_field: ClassVar[str] = "license_id"
    license_id: str
    tenant_id: str
    expires_at: float | msgspec.UnsetType = msgspec.UNSET
    max_usage_count: int | None | msgspec.UnsetType = msgspec.UNSET


class LicenseRevoked(BaseEvent, frozen=True, tag="license.revoked"):
    stream_field: ClassVar[str] = "license_id"
    license_id: str
    tenant_id: str
    reason: str | None = None


class LicenseUsed(BaseEvent, frozen=True, tag="license.used"):
    """One successful validation; `usage_count` is the license's count including this use."""

    stream_field: ClassVar[str] = "license_id"
    license_id: str
    tenant_id: str
    usage_count: int


class UpdatePublished(BaseEvent, frozen=True, tag="update.published"):
    """The ZIP lives content-addressed at `<data_dir>/updates/<sha256>`."""

    stream_field: ClassVar[str] = "update_id"
    update_id: str
    version: str
    changelog: str
    sha256: str
    file_size: int
    filename: str = ""
    tenant_ids: list[str] | None = None  # None: every tenant


class UpdateWithdrawn(BaseEvent, frozen=True, tag="update.withdrawn"):
    stream_field: ClassVar[str] = "update_id"
    update_id: str
    reason: str | None = None


class TelemetryRecorded(BaseEvent, frozen=True, tag="telemetry.recorded"):
    stream_field: ClassVar[str] = "tenant_id"
    tenant_id: str
    uptime: float
    active_users: int
    exercises_completed_today: int
    ai_latency: float | None = None
    version: str | None = None
    additional_data: dict[str, Any] | None = None


# --- messaging (stream: the message id) ---


class NodeTelemetry(BaseEvent, frozen=True, tag="node.telemetry"):
    """A telemetry sample a node sent over its WebSocket (stream: the node id)."""

    stream_field: ClassVar[str] = "node_id"
    node_id: str
    metrics: dict[str, Any] = {}
    timestamp: str | float | None = None  # the client's clock, as given


class MessageSent(BaseEvent, frozen=True, tag="message.sent"):
    """A message to one or more nodes. It expires at `envelope.ts + ttl`."""

    stream_field: ClassVar[str] = "message_id"
    message_id: str
    from_node: str  # the sending node's id, or "broker" when an operator sends
    to_nodes: tuple[
        str, ...
    ]  # an array when stored; a tuple in memory (see broker.services.messaging)
    message_type: str
    content: Any = None
    priority: str = "normal"  # critical | high | normal | low
    ttl: float = 3600.0
    metadata: dict[str, Any] = {}
    idempotency_key: str | None = None
    sent_by: str | None = None  # operator user id when from_node == "broker"


class MessageRead(BaseEvent, frozen=True, tag="message.read"):
    """A recipient read (acknowledged) a message, over HTTP or WebSocket."""

    stream_field: ClassVar[str] = "message_id"
    message_id: str
    node_id: str
    via: str = "http"  # http | ws


class MessagesRead(BaseEvent, frozen=True, tag="message.read_batch"):
    """A recipient read several messages at once (one WebSocket frame of acks): the same as a
    `message.read` for each, in one event. Its stream is the reading node, not a message."""

    stream_field: ClassVar[str] = "node_id"
    node_id: str
    message_ids: list[str]
    via: str = "ws"


class MessageExpired(BaseEvent, frozen=True, tag="message.expired"):
    """The message's TTL passed before these recipients read it (dead letters)."""

    stream_field: ClassVar[str] = "message_id"
    message_id: str
    node_ids: list[str]


class MessageDeadLettered(BaseEvent, frozen=True, tag="message.dead_lettered"):
    """Delivery to `node_id` was given up after `attempts` unacknowledged pushes."""

    stream_field: ClassVar[str] = "message_id"
    message_id: str
    node_id: str
    attempts: int = 0
    reason: str = "max_attempts"


class MessageRedriven(BaseEvent, frozen=True, tag="message.redriven"):
    """An operator put a dead letter back in `node_id`'s queue, with a fresh TTL."""

    stream_field: ClassVar[str] = "message_id"
    message_id: str
    node_id: str
    ttl: float = 3600.0
    by: str | None = None


# --- scale-out (issue 8: several broker instances on one log) ---


class NodeConnected(BaseEvent, frozen=True, tag="node.connected"):
    """A broker instance accepted a node's WebSocket (recorded on the shared NATS log only). Any
    other instance holding an older connection of that node closes it: the newest connection
    wins across instances, as on one."""

    stream_field: ClassVar[str] = "node_id"
    node_id: str
    instance: str  # the accepting instance (random per broker process)
    connection: str  # the connection (random)


# --- system ---


class LogNote(BaseEvent, frozen=True, tag="system.note"):
    """A free-form marker (benchmarks, imports, operator annotations)."""

    stream_field: ClassVar[str] = "stream_id"
    stream_id: str = "system"
    text: str = ""
    data: dict[str, Any] = {}


class LogCompacted(BaseEvent, frozen=True, kw_only=True, tag="log.compacted"):
    """A compaction removed what the retention policy allowed from events before `up_to`
    (docs/operations.md). The removed seqs form `gaps` runs, each recorded in the log with the
    chain hash of its last removed event (its anchor: the kept event after the run chains from
    it); `anchors_digest` is the SHA-256 of those records in order, so `broker verify` proves the
    gaps it finds are exactly the ones this event recorded."""

    stream_field: ClassVar[str] = "stream_id"
    stream_id: str = "log"
    up_to: int  # only events with a seq below this were considered
    up_to_anchor: str  # the chain hash (hex) of event `up_to`: the head that anchors the cut
    policy: dict[str, float] = {}  # event type (or pattern) -> days kept; 0 = for ever
    removed: dict[str, int] = {}  # events removed, by type
    first_removed: int = 0
    last_removed: int = 0
    gaps: int = 0
    anchors_digest: str = ""  # hex
    snapshot_seq: int = 0  # the snapshot taken first, which covers every removed event
    # NATS (eventstore.nats_compact): per removable event type, the stream sequence below which
    # the messages of its subject are purged; its removed events are recorded by their batches
    # in the log index of the snapshot, not as gaps with anchors
    purged: dict[str, int] = {}


Event = (
    UserCreated
    | UserUpdated
    | UserPasswordChanged
    | UserActivated
    | UserDeactivated
    | UserRoleGranted
    | UserRoleRevoked
    | RoleCreated
    | RoleUpdated
    | RoleDeleted
    | PermissionCreated
    | NodeRegistered
    | NodeStatusUpdated
    | NodeHeartbeat
    | NodeLoggedIn
    | NodeDeregistered
    | ChallengeUsed
    | UserLoggedIn
    | TokenFamilyStarted
    | TokenRotated
    | TokenFamilyRevoked
    | ApiKeyCreated
    | ApiKeyUsed
    | ApiKeyRevoked
    | TenantCreated
    | TenantUpdated
    | LicenseIssued
    | LicenseUpdated
    | LicenseRevoked
    | LicenseUsed
    | UpdatePublished
    | UpdateWithdrawn
    | TelemetryRecorded
    | NodeTelemetry
    | MessageSent
    | MessageRead
    | MessagesRead
    | MessageExpired
    | MessageDeadLettered
    | MessageRedriven
    | NodeConnected
    | LogNote
    | LogCompacted
)

EVENT_TYPES: dict[str, type[BaseEvent]] = {
    cls.type_name(): cls
    for cls in Event.__args__  # type: ignore[attr-defined]
}
for _name, _cls in EVENT_TYPES.items():
    _cls.event_type = _name
    # `stream` read through a C getter, not BaseEvent.stream's getattr (once per appended event)
    _cls.stream = property(operator.attrgetter(_cls.stream_field))  # type: ignore[method-assign,assignment]
