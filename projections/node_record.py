"""A registered node (`Node`), and a node restored from a snapshot but not decoded yet (`Packed`).

A snapshot saves each node as `[slot, last_heartbeat_at, <the Node as an array>]`. A load decodes
only the two first fields and keeps the node's encoded bytes (`Packed.record`, a `msgspec.Raw`
viewing the slice read from the file: no copy); the node is decoded the first time it is touched
(`unpack`: a read by a service, an event about it, a discovery page holding it) or by the
background task's slices (`projections.index_snapshot.unpack_step`). The restore needs nothing
else: the slot places the node in the discovery indices, whose bitmaps the snapshot saves, and the
last heartbeat places it in the heartbeat order. A snapshot taken while a node is still packed
writes its bytes as they are (msgspec writes a `Raw` verbatim): the same bytes the node would
encode to.

Any other attribute read on a `Packed` (a sorted order's key, token counts) is read from a
decoding of its record made for that read, so a structure that reads nodes by slot sees the same
values either way; only the nodes projection and its index replace a `Packed` by its `Node`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

Presence = Literal["online", "stale", "offline"]

# A fleet's types, capabilities, regions and statuses are few values shared by many nodes, but
# every event decodes its own copy: one string each, shared (~300 bytes a node at 1M nodes).
intern = sys.intern


def with_region_interned(metadata: Mapping[str, Any]) -> dict[str, Any]:
    copy = dict(metadata)
    region = copy.get("region")
    if isinstance(region, str):
        copy["region"] = intern(region)
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
        if type(other) is Packed:
            other = decode(other)
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


class Packed(msgspec.Struct, gc=False, array_like=True):
    """A node as a snapshot saved it, not decoded yet (see the module): 40 bytes and a 48-byte
    `Raw` a node, plus its share of the slice read from the file (~600 bytes)."""

    slot: int
    last_heartbeat_at: float | None
    record: msgspec.Raw  # the `Node`, encoded

    def __getattr__(self, name: str) -> Any:  # only for the attributes it lacks
        return getattr(decode(self), name)

    def __eq__(self, other: object) -> bool:
        return decode(self) == other


_decoder = msgspec.msgpack.Decoder(Node)


def decode(packed: Packed) -> Node:
    """The node `packed` holds, its key strings shared (as a replay shares them)."""
    return share_keys(_decoder.decode(packed.record))


def share_keys(node: Node) -> Node:
    """`node` holding the shared copy of its type, capabilities, region and status."""
    node.type = intern(node.type)
    caps = node.capabilities
    for i, cap in enumerate(caps):
        caps[i] = intern(cap)
    region = node.metadata.get("region")
    if type(region) is str:
        node.metadata["region"] = intern(region)
    node.status = intern(node.status)
    return node


class Records(Mapping[str, "Node | Packed"]):
    """The registry as a snapshot saves it: a `Node` as `(slot, last heartbeat, node)`, which
    encodes as a `Packed` of it does; a `Packed` as it is."""

    __slots__ = ("nodes",)

    def __init__(self, nodes: dict[str, Node | Packed]) -> None:
        self.nodes = nodes

    def __getitem__(self, key: str) -> Any:
        node = self.nodes[key]
        if type(node) is Packed:
            return node
        return (node.slot, node.last_heartbeat_at, node)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.nodes else default

    def __iter__(self) -> Any:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)
