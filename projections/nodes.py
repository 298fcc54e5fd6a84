"""Nodes: the registry, presence derived from heartbeat times, and discovery indices.

Presence is never stored: the projection keeps the server time of each node's last heartbeat
(`env.ts`) and queries take `now` and the thresholds, so live and replayed states are identical.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgspec

from eventstore.base import Envelope
from eventstore.events import (
    NodeDeregistered,
    NodeHeartbeat,
    NodeLoggedIn,
    NodeRegistered,
    NodeStatusUpdated,
)
from projections import index_snapshot
from projections.base import Projection, handles
from projections.node_index import NodeIndex
from projections.sorted_slots import SortedSlots

Presence = Literal["online", "stale", "offline"]


# A fleet's types, capabilities, regions and statuses are few values shared by many nodes, but
# every event decodes its own copy: one string each, shared (~300 bytes a node at 1M nodes).
_intern = sys.intern


def _with_region_interned(metadata: Mapping[str, Any]) -> dict[str, Any]:
    copy = dict(metadata)
    region = copy.get("region")
    if isinstance(region, str):
        copy["region"] = _intern(region)
    return copy


class Node(msgspec.Struct, gc=False, array_like=True):
    """A registered node. A msgspec Struct, not a dataclass: a snapshot decodes a million of them
    at start-up, twice as fast (and the collector never tracks them: they hold no cycle); saved
    as an array, not a map: 15 % faster to decode and a quarter smaller."""

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
    available_resources: dict[str, Any] = msgspec.field(default_factory=dict)
    last_seen: str | float | None = None  # as reported by the node
    last_heartbeat_at: float | None = None  # server time of the last heartbeat
    heartbeat_timestamp: str | float | None = None  # the node's own clock, as given
    health: str | None = None  # the status field of the last heartbeat
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    last_login_at: float | None = None
    heartbeats: int = 0
    slot: int = -1  # in the discovery indices (not compared: it depends on how they were built)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _COMPARED)

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


_COMPARED = tuple(f for f in Node.__struct_fields__ if f != "slot")


@dataclass
class NodesProjection(Projection):
    name = "nodes"
    nodes: dict[str, Node] = field(default_factory=dict)
    retired: dict[str, float] = field(default_factory=dict)  # deregistered node id -> when
    index: NodeIndex = field(default_factory=NodeIndex, compare=False, repr=False)

    # Snapshots save the registry in slices (`records`, each node with its slot), the rest whole
    # with the discovery indices' bitmaps (`projections.index_snapshot`), restored at load
    # instead of rebuilt; a snapshot without them (before they were saved) is rebuilt.
    # Version 3: nodes saved as arrays (`Node`); a snapshot of version 2 is not loaded (the
    # registry is replayed from the log once, and the next snapshot is of this version).
    snapshot_version: ClassVar[int] = 3
    record_type: ClassVar[type] = Node

    def state(self) -> object:
        return {"nodes": self.nodes, "retired": self.retired}

    def records(self) -> dict[str, Node]:
        return self.nodes

    def snapshot(self) -> Any:
        return {"retired": self.retired, "index": index_snapshot.save(self.index)}

    def restore_sliced(self, records: dict[str, Any], raw: bytes) -> None:
        saved = _snapshot_decoder.decode(raw)
        self.nodes, self.retired = records, saved.retired
        # Indices saved in another shape, or that do not fit the records: rebuilt from them.
        index = index_snapshot.decode(saved.index) if saved.index else None
        if index is None or not index_snapshot.restore(self.index, records.values(), index):
            self.index.rebuild(self.nodes.values())  # (which shares the key strings again)

    def _remove(self, node: Node) -> None:
        if self.index.remove(node) and self.dirty is not None:
            # The slots were compacted: every record saved so far holds an old slot.
            self.dirty.update(dict.fromkeys(self.nodes))

    def _changing(self, node_id: str) -> Node | None:
        """The node an event changes (marked dirty); None if it is not registered."""
        node = self.nodes.get(node_id)
        if node is not None:
            self.mark_dirty(node_id)
        return node

    # --- apply ---

    @handles(NodeRegistered)
    def _registered(self, env: Envelope) -> None:
        e: NodeRegistered = env.event  # type: ignore[assignment]
        if e.node_id in self.nodes:  # refused by the log in practice (expected version 0)
            self._remove(self.nodes.pop(e.node_id))
        node = Node(
            node_id=e.node_id,
            name=e.name,
            type=_intern(e.node_type),
            capabilities=[_intern(c) for c in dict.fromkeys(e.capabilities)],
            public_key=e.public_key,
            endpoint=e.endpoint,
            metadata=_with_region_interned(e.metadata),
            status=_intern(e.status),
            registered_at=env.ts,
            generation=env.seq,
            updated_at=env.ts,
        )
        self.nodes[e.node_id] = node
        self.retired.pop(e.node_id, None)
        self.index.add(node)
        self.mark_dirty(e.node_id)

    @handles(NodeStatusUpdated)
    def _status(self, env: Envelope) -> None:
        e: NodeStatusUpdated = env.event  # type: ignore[assignment]
        node = self._changing(e.node_id)
        if node is None:
            return
        if e.status is not None and e.status != node.status:
            self.index.set_status(node, _intern(e.status))
        if e.load is not None and e.load != node.load:
            self.index.set_load(node, e.load)
        if e.available_resources is not None:
            node.available_resources = dict(e.available_resources)
        if e.metadata:
            self.index.set_metadata(node, _with_region_interned(e.metadata))
        if e.last_seen is not None:
            node.last_seen = e.last_seen
        node.updated_at = env.ts

    @handles(NodeHeartbeat)
    def _heartbeat(self, env: Envelope) -> None:
        e: NodeHeartbeat = env.event  # type: ignore[assignment]
        node = self._changing(e.node_id)
        if node is None:
            return
        self.index.set_heartbeat(node, env.ts)
        node.heartbeat_timestamp = e.timestamp
        node.health = e.status
        if e.metrics:
            node.metrics = dict(e.metrics)
        node.heartbeats += 1

    @handles(NodeLoggedIn)
    def _login(self, env: Envelope) -> None:
        e: NodeLoggedIn = env.event  # type: ignore[assignment]
        if (node := self._changing(e.node_id)) is not None:
            node.last_login_at = env.ts

    @handles(NodeDeregistered)
    def _deregistered(self, env: Envelope) -> None:
        e: NodeDeregistered = env.event  # type: ignore[assignment]
        node = self.nodes.pop(e.node_id, None)
        if node is not None:
            self._remove(node)
            self.retired[e.node_id] = env.ts
            self.mark_dirty(e.node_id)

    # --- queries ---

    def get(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id)

    def by_prefix(self, prefix: str, limit: int) -> list[Node]:
        """Up to `limit` nodes whose id starts with `prefix` (in id order), then nodes whose
        name does, case-insensitively (in name order): O(log n + limit) on the sorted orders;
        while an order is still being built, one more slice of it and a scan of the nodes."""
        found: dict[str, Node] = {}
        index = self.index
        slots = index.slots
        for name, wanted in (("node_id", prefix), ("name", prefix.lower())):
            left = limit - len(found)
            if left <= 0:
                break
            key = index.keys[name]
            order = index.order(name)
            if not isinstance(order, SortedSlots):  # being built: as NodeIndex.page does, O(n)
                index.build_step()
                matches = (
                    n.slot for n in slots if n is not None and key(n.slot).startswith(wanted)
                )
                picked = heapq.nsmallest(left + len(found), matches, key=lambda s: (key(s), s))
            else:
                picked = []
                for slot in order.ascending(order.position(wanted), order.size):
                    if len(picked) >= left + len(found) or not key(slot).startswith(wanted):
                        break
                    picked.append(slot)
            for slot in picked:
                node = slots[slot]
                if node is not None and len(found) < limit:
                    found.setdefault(node.node_id, node)
        return list(found.values())

    def page(self, **query: Any) -> tuple[list[Node], int]:
        """One page of discovery and the number of matches: see `NodeIndex.page`."""
        return self.index.page(**query)

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
        found, _ = self.index.page(
            type=type,
            capabilities=capabilities,
            region=region,
            status=status,
            presence=presence,
            now=now,
            online_within=online_within,
            stale_within=stale_within,
            limit=len(self.nodes),
        )
        return found


class _Snapshot(msgspec.Struct):
    retired: dict[str, float]
    index: msgspec.Raw = msgspec.Raw()  # empty: a snapshot from before it was saved


_snapshot_decoder = msgspec.msgpack.Decoder(_Snapshot)
