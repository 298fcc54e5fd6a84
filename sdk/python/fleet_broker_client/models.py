"""Typed results: what the server answers, decoded with msgspec (unknown fields ignored)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

Priority = Literal["critical", "high", "normal", "low"]


class Tokens(msgspec.Struct, kw_only=True):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: float = 900


class Challenge(msgspec.Struct, kw_only=True):
    challenge: str
    expires_in: float = 60


class NodeInfo(msgspec.Struct, kw_only=True):
    node_id: str
    name: str = ""
    type: str = ""
    capabilities: list[str] = []
    endpoint: str = ""
    metadata: dict[str, Any] = {}
    status: str | None = None
    load: float | None = None
    available_resources: dict[str, Any] = {}
    last_seen: Any = None
    registered_at: str | None = None
    updated_at: str | None = None
    presence: str | None = None
    online: bool = False
    last_heartbeat_at: str | None = None
    heartbeat: dict[str, Any] | None = None
    last_login_at: str | None = None
    public_key: str | None = None


class NodePage(msgspec.Struct, kw_only=True):
    nodes: list[NodeInfo]
    total: int
    skip: int = 0
    limit: int = 100
    has_more: bool = False


class HeartbeatResult(msgspec.Struct, kw_only=True):
    status: str
    node_id: str
    received_at: str | None = None
    presence: str | None = None
    next_heartbeat_in: float = 30.0


class SendResult(msgspec.Struct, kw_only=True):
    message_id: str
    status: str = "queued"
    recipients: int = 0
    expires_at: str | None = None


class Message(msgspec.Struct, kw_only=True, dict=True):
    """A message for this node (a WebSocket push or a pending message polled over HTTP).

    Received through `Node.messages()`, it is acknowledged when the loop body that got it
    returns, unless `await msg.ack()` was called before."""

    id: str
    from_node: str
    message_type: str
    content: Any = None
    priority: Priority = "normal"
    metadata: dict[str, Any] | None = None
    sent_at: str | None = None
    expires_at: str | None = None
    seq: int | None = None

    async def ack(self) -> None:
        """Acknowledge (mark read) now rather than when the loop body returns."""
        acker: Callable[[Message], Awaitable[None]] | None = self.__dict__.get("_acker")
        if acker is None:
            raise RuntimeError("this message did not come from Node.messages()")
        await acker(self)

    @property
    def acked(self) -> bool:
        return bool(self.__dict__.get("_acked"))


class PendingList(msgspec.Struct, kw_only=True):
    messages: list[Message]
    total: int = 0


class LicenseInfo(msgspec.Struct, kw_only=True, rename="camel"):
    valid: bool
    tenant_id: str
    tenant_name: str = ""
    expires_at: str | None = None
    usage_count: int = 0
    max_usage_count: int | None = None


class UpdateInfo(msgspec.Struct, kw_only=True, rename="camel"):
    update_available: bool
    current_version: str
    latest_version: str
    update_id: str | None = None
    changelog: str | None = None
    file_size: int | None = None


class TelemetryResult(msgspec.Struct, kw_only=True):
    success: bool
    message: str = ""
    timestamp: str | None = None
