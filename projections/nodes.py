"""Nodes: the registry, presence derived from heartbeat times, and discovery indices.

Presence is never stored: the projection keeps the server time of each node's last heartbeat
(`env.ts`) and queries take `now` and the thresholds, so live and replayed states are identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from eventstore.base import Envelope
from eventstore.events import (
    NodeDeregistered,
    NodeHeartbeat,
    NodeLoggedIn,
    NodeRegistered,
    NodeStatusUpdated,
)
from projections.base import Projection, handles

Presence = Literal["online", "stale", "offline"]


@dataclass(slots=True)
class Node:
    node_id: str
    name: str
    type: str
    capabilities: list[str]
    public_key: str
    endpoint: str
    metadata: dict[str, Any]
    status: str
    registered_at: float
    generation: int  # seq of the registration: tokens of an earlier registration are void
    updated_at: float
    load: float | None = None
    available_resources: dict[str, Any] = field(default_factory=dict)
    last_seen: str | float | None = None  # as reported by the node
    last_heartbeat_at: float | None = None  # server time of the last heartbeat
    heartbeat_timestamp: str | float | None = None  # the node's own clock, as given
    health: str | None = None  # the status field of the last heartbeat
    metrics: dict[str, Any] = field(default_factory=dict)
    last_login_at: float | None = None
    heartbeats: int = 0

    @property
    def region(self) -> str | None:
        region = self.metadata.get("region")
        return region if isinstance(region, str) else None

    def presence(self, now: float, online_within: float, stale_within: float) -> Presence:
        """online: a heartbeat within `online_within` seconds; stale: within `stale_within`."""
        if self.last_heartbeat_at is None:
            return "offline"
        age = now - self.last_heartbeat_at
        if age <= online_within:
            return "online"
        if age <= stale_within:
            return "stale"
        return "offline"


def _index_add(index: dict[str, set[str]], key: str | None, node_id: str) -> None:
    if key is not None:
        index.setdefault(key, set()).add(node_id)


def _index_remove(index: dict[str, set[str]], key: str | None, node_id: str) -> None:
    if key is None:
        return
    members = index.get(key)
    if members is not None:
        members.discard(node_id)
        if not members:
            del index[key]


@dataclass
class NodesProjection(Projection):
    name = "nodes"
    nodes: dict[str, Node] = field(default_factory=dict)
    retired: dict[str, float] = field(default_factory=dict)  # deregistered node id -> when
    by_type: dict[str, set[str]] = field(default_factory=dict)
    by_capability: dict[str, set[str]] = field(default_factory=dict)
    by_region: dict[str, set[str]] = field(default_factory=dict)
    by_status: dict[str, set[str]] = field(default_factory=dict)

    # --- apply ---

    @handles(NodeRegistered)
    def _registered(self, env: Envelope) -> None:
        e: NodeRegistered = env.event  # type: ignore[assignment]
        if e.node_id in self.nodes:  # refused by the log in practice (expected version 0)
            self._unindex(self.nodes[e.node_id])
        node = Node(
            node_id=e.node_id,
            name=e.name,
            type=e.node_type,
            capabilities=list(dict.fromkeys(e.capabilities)),
            public_key=e.public_key,
            endpoint=e.endpoint,
            metadata=dict(e.metadata),
            status=e.status,
            registered_at=env.ts,
            generation=env.seq,
            updated_at=env.ts,
        )
        self.nodes[e.node_id] = node
        self.retired.pop(e.node_id, None)
        self._index(node)

    @handles(NodeStatusUpdated)
    def _status(self, env: Envelope) -> None:
        e: NodeStatusUpdated = env.event  # type: ignore[assignment]
        node = self.nodes.get(e.node_id)
        if node is None:
            return
        if e.status is not None and e.status != node.status:
            _index_remove(self.by_status, node.status, node.node_id)
            node.status = e.status
            _index_add(self.by_status, node.status, node.node_id)
        if e.load is not None:
            node.load = e.load
        if e.available_resources is not None:
            node.available_resources = dict(e.available_resources)
        if e.metadata:
            old_region = node.region
            node.metadata.update(e.metadata)
            if node.region != old_region:
                _index_remove(self.by_region, old_region, node.node_id)
                _index_add(self.by_region, node.region, node.node_id)
        if e.last_seen is not None:
            node.last_seen = e.last_seen
        node.updated_at = env.ts

    @handles(NodeHeartbeat)
    def _heartbeat(self, env: Envelope) -> None:
        e: NodeHeartbeat = env.event  # type: ignore[assignment]
        node = self.nodes.get(e.node_id)
        if node is None:
            return
        node.last_heartbeat_at = env.ts
        node.heartbeat_timestamp = e.timestamp
        node.health = e.status
        if e.metrics:
            node.metrics = dict(e.metrics)
        node.heartbeats += 1

    @handles(NodeLoggedIn)
    def _login(self, env: Envelope) -> None:
        e: NodeLoggedIn = env.event  # type: ignore[assignment]
        if (node := self.nodes.get(e.node_id)) is not None:
            node.last_login_at = env.ts

    @handles(NodeDeregistered)
    def _deregistered(self, env: Envelope) -> None:
        e: NodeDeregistered = env.event  # type: ignore[assignment]
        node = self.nodes.pop(e.node_id, None)
        if node is not None:
            self._unindex(node)
            self.retired[e.node_id] = env.ts

    def _index(self, node: Node) -> None:
        _index_add(self.by_type, node.type, node.node_id)
        for cap in node.capabilities:
            _index_add(self.by_capability, cap, node.node_id)
        _index_add(self.by_region, node.region, node.node_id)
        _index_add(self.by_status, node.status, node.node_id)

    def _unindex(self, node: Node) -> None:
        _index_remove(self.by_type, node.type, node.node_id)
        for cap in node.capabilities:
            _index_remove(self.by_capability, cap, node.node_id)
        _index_remove(self.by_region, node.region, node.node_id)
        _index_remove(self.by_status, node.status, node.node_id)

    # --- queries ---

    def get(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id)

    def discover(
        self,
        *,
        type: str | None = None,
        capabilities: Iterable[str] = (),
        region: str | None = None,
        status: str | None = None,
        presence: Presence | None = None,
        now: float = 0.0,
        online_within: float = 60.0,
        stale_within: float = 300.0,
    ) -> list[Node]:
        """Nodes matching every given filter (capabilities: all of them), in registration order.

        `presence` filters on the presence at `now` (the caller's clock)."""
        sets: list[set[str]] = []
        if type is not None:
            sets.append(self.by_type.get(type, set()))
        for cap in capabilities:
            sets.append(self.by_capability.get(cap, set()))
        if region is not None:
            sets.append(self.by_region.get(region, set()))
        if status is not None:
            sets.append(self.by_status.get(status, set()))
        if sets:
            sets.sort(key=len)
            ids = set(sets[0])
            for other in sets[1:]:
                ids &= other
                if not ids:
                    return []
            found = [self.nodes[i] for i in ids]
            found.sort(key=lambda n: n.generation)
        else:
            found = list(self.nodes.values())
        if presence is not None:
            found = [n for n in found if n.presence(now, online_within, stale_within) == presence]
        return found
