"""Nodes: the registry, presence derived from heartbeat times, and discovery indices.

Presence is never stored: the projection keeps the server time of each node's last heartbeat
(`env.ts`) and queries take `now` and the thresholds, so live and replayed states are identical.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
from projections.index_snapshot import unpack
from projections.node_index import NodeIndex
from projections.node_record import (
    Node,
    Packed,
    Presence,
    Records,
    decode,
    intern,
    share_keys,
    with_region_interned,
)
from projections.sorted_slots import SortedSlots

__all__ = ["Node", "NodesProjection", "Presence"]


@dataclass
class NodesProjection(Projection):
    name = "nodes"
    # A node restored from a snapshot is a `Packed` until first touched (`projections.node_record`):
    # read `nodes` through `get`, which decodes it; `in` and `len` need no decoding.
    nodes: dict[str, Node | Packed] = field(default_factory=dict)
    retired: dict[str, float] = field(default_factory=dict)  # deregistered node id -> when
    index: NodeIndex = field(default_factory=NodeIndex, compare=False, repr=False)

    # Snapshots save the registry in slices (`records`, each node as `[slot, last heartbeat,
    # node]`), the rest whole with the discovery indices' bitmaps (`projections.index_snapshot`),
    # restored at load instead of rebuilt; a snapshot without them (before they were saved) is
    # rebuilt. Version 4: the slot and last heartbeat ahead of each node, which is decoded on
    # first touch. Version 3 (each node whole, decoded at load; its fingerprint below) still
    # loads; an earlier one is not loaded (the registry is replayed from the log once).
    snapshot_version: ClassVar[int] = 4
    record_type: ClassVar[type] = Packed
    legacy_records: ClassVar[dict[str, type]] = {"76a9c24f3caa14ec": Node}  # version 3

    def state(self) -> object:
        return {"nodes": self.nodes, "retired": self.retired}

    def records(self) -> Records:
        return Records(self.nodes)

    def snapshot(self) -> Any:
        return {"retired": self.retired, "index": index_snapshot.save(self.index)}

    def restore_sliced(self, records: dict[str, Any], raw: bytes) -> None:
        saved = _snapshot_decoder.decode(raw)
        self.nodes, self.retired = records, saved.retired
        # Records of a snapshot of version 3 come decoded (all of them: one shape a snapshot).
        if type(next(iter(records.values()), None)) is Node:
            deque(map(share_keys, records.values()), maxlen=0)
        # Indices saved in another shape, or that do not fit the records: rebuilt from them.
        index = index_snapshot.decode(saved.index) if saved.index else None
        if index is None or not index_snapshot.restore(self.index, records, index):
            self.nodes = {
                key: node if type(node) is Node else decode(node) for key, node in records.items()
            }
            self.index.rebuild(self.nodes.values())  # type: ignore[arg-type]

    def replaying(self) -> None:
        if not self.nodes:
            self.index.defer()

    def replayed(self) -> None:
        self.index.settle(self.nodes.values())  # type: ignore[arg-type]  # all decoded

    def _remove(self, node: Node) -> None:
        if self.index.remove(node) and self.dirty is not None:
            # The slots were compacted: every record saved so far holds an old slot.
            self.dirty.update(dict.fromkeys(self.nodes))

    def _changing(self, node_id: str) -> Node | None:
        """The node an event changes (marked dirty); None if it is not registered."""
        node = self.nodes.get(node_id)
        if node is None:
            return None
        self.mark_dirty(node_id)
        if type(node) is Packed:
            return unpack(self.index, node)
        return node  # type: ignore[return-value]

    # --- apply ---

    @handles(NodeRegistered)
    def _registered(self, env: Envelope) -> None:
        e: NodeRegistered = env.event  # type: ignore[assignment]
        old = self.get(e.node_id)
        if old is not None:  # refused by the log in practice (expected version 0)
            del self.nodes[e.node_id]
            self._remove(old)
        node = Node(
            node_id=e.node_id,
            name=e.name,
            type=intern(e.node_type),
            capabilities=[intern(c) for c in dict.fromkeys(e.capabilities)],
            public_key=e.public_key,
            endpoint=e.endpoint,
            metadata=with_region_interned(e.metadata),
            status=intern(e.status),
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
            self.index.set_status(node, intern(e.status))
        if e.load is not None and e.load != node.load:
            self.index.set_load(node, e.load)
        if e.available_resources is not None:
            node.available_resources = dict(e.available_resources)
        if e.metadata:
            self.index.set_metadata(node, with_region_interned(e.metadata))
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
        node = self.get(e.node_id)
        if node is not None:
            del self.nodes[e.node_id]
            self._remove(node)
            self.retired[e.node_id] = env.ts
            self.mark_dirty(e.node_id)

    # --- queries ---

    def get(self, node_id: str) -> Node | None:
        node = self.nodes.get(node_id)
        if type(node) is Packed:
            return unpack(self.index, node)
        return node  # type: ignore[return-value]

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
                if type(node) is Packed:
                    node = unpack(index, node)
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
