"""The discovery indices saved with a snapshot and restored from it, instead of rebuilt.

What a snapshot saves of a `NodeIndex` (`save`, in the snapshot's cut, a few ms at 1M nodes):
the number of slots and, per type, capability, region and status, its bitmap (block numbers and
their bits as bytes). Each node's slot is saved in its record (`Node.slot`). What a load
restores from them (`restore`): the slots list (holes included), the bitmaps, the bitmap of the
live nodes (from the slots), and the heartbeat order (from the nodes' `last_heartbeat_at`, its
zero group counted from the bitmaps). The sorted orders and the presence windows are caches,
built in the background once the server is up, as after a replay.

The restored nodes are `Packed` (`projections.node_record`): each is decoded, its key strings
shared, the first time it is touched (`unpack`, which puts the `Node` in its slot and in the
registry) or by `unpack_step`, run by the same background task a slice at a time before the
token counts and the sorted orders, which read every node.

Loading a snapshot must give the state a replay gives: `restore` refuses (returns False, and the
caller rebuilds) a saved index that does not fit the records (a slot out of range or taken
twice, bitmaps whose counts are not the registry's).
"""

from __future__ import annotations

import sys
from array import array
from collections import deque
from collections.abc import Iterable, Mapping
from itertools import compress, repeat
from operator import attrgetter, is_not, lt
from typing import TYPE_CHECKING

import msgspec

from projections import bitmaps
from projections.bitmaps import Bitmap, from_flags
from projections.node_record import Node, Packed
from projections.node_record import decode as decode_node

if TYPE_CHECKING:
    from projections.node_index import NodeIndex

_slot = attrgetter("slot")
MAX_BLOCKS = 40_000  # saved with a snapshot at most (~80 ms of its cut)
UNPACK_STEP = 2_048  # slots a slice of `unpack_step` visits (~5 ms of decoding)


class SavedBitmap(msgspec.Struct, array_like=True):
    blocks: bytes  # the block numbers, int64 (native order)
    bits: bytes  # `SavedIndex.block` // 8 bytes a block, little-endian, in `blocks` order


class SavedIndex(msgspec.Struct, array_like=True):
    block: int  # slots a block (bitmaps.BLOCK): another block size is not restored
    slots: int  # len(NodeIndex.slots), holes included
    groups: list[dict[str, SavedBitmap]]  # by type, capability, region, status


_decoder = msgspec.msgpack.Decoder(SavedIndex)


def decode(raw: msgspec.Raw) -> SavedIndex | None:
    """The saved index in `raw`; None when it is of another shape (it is rebuilt instead)."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return None


def _size() -> int:
    return (bitmaps.BLOCK + 7) // 8  # bytes of one block's bits


def _save_bitmap(bm: Bitmap) -> SavedBitmap:
    blocks = sorted(bm)
    size = _size()
    bits = b"".join([bm[b].to_bytes(size, "little") for b in blocks])
    return SavedBitmap(array("q", blocks).tobytes(), bits)


def _load_bitmap(saved: SavedBitmap) -> Bitmap:
    blocks = array("q")
    blocks.frombytes(saved.blocks)
    bits, size = saved.bits, _size()
    if len(bits) != len(blocks) * size:
        raise ValueError("a saved bitmap's bits do not match its blocks")
    return {
        b: int.from_bytes(bits[i * size : (i + 1) * size], "little") for i, b in enumerate(blocks)
    }


def save(index: NodeIndex) -> SavedIndex | None:
    """What a snapshot keeps of `index` (call it in the cut: it must match the records); None
    when its bitmaps have more than MAX_BLOCKS blocks (the cut would stall the loop: ~2 µs a
    block; the load then rebuilds the indices)."""
    if sum(len(bm) for group in index.groups() for bm in group.values()) > MAX_BLOCKS:
        return None
    return SavedIndex(
        bitmaps.BLOCK,
        len(index.slots),
        [{key: _save_bitmap(bm) for key, bm in group.items()} for group in index.groups()],
    )


def restore(index: NodeIndex, nodes: Mapping[str, Packed], saved: SavedIndex) -> bool:
    """Set `index` to `nodes` (the registry, each node with the slot saved in its record) from
    `saved`; False, with `index` emptied, when the two do not fit together (the caller then
    rebuilds it)."""
    index.__init__()  # type: ignore[misc]
    try:
        if not _restore(index, nodes.values(), saved):
            index.__init__()  # type: ignore[misc]
            return False
    except (ValueError, TypeError, IndexError):
        index.__init__()  # type: ignore[misc]
        return False
    index.registry = nodes  # type: ignore[assignment]
    return True


def _restore(index: NodeIndex, nodes: Iterable[Packed], saved: SavedIndex) -> bool:
    n = saved.slots
    if saved.block != bitmaps.BLOCK or len(saved.groups) != 4 or n < 0:
        return False
    # The nodes by slot, in C loops: the records come in registration order, which is slot
    # order (else sorted), checked to be in range and distinct, then placed around the holes.
    ordered = list(nodes)
    taken = list(map(_slot, ordered))
    if not all(map(lt, taken, taken[1:])):
        ordered.sort(key=_slot)
        taken = list(map(_slot, ordered))
        if not all(map(lt, taken, taken[1:])):
            return False  # a slot taken twice
    live = len(taken)
    if taken and (taken[0] < 0 or taken[-1] >= n):
        return False
    slots: list[Packed | None] = ordered  # type: ignore[assignment]
    if live < n:
        slots = [None] * n
        deque(map(slots.__setitem__, taken, ordered), maxlen=0)
    for group, kept in zip(index.groups(), saved.groups, strict=True):
        for key, bm in kept.items():
            group[sys.intern(key)] = _load_bitmap(bm)
    for group in (index.by_type, index.by_status):  # one each per node
        if sum(x.bit_count() for bm in group.values() for x in bm.values()) != live:
            return False
    index.slots.extend(slots)  # type: ignore[arg-type]
    index.holes = n - live
    present = b"\x01" * n if live == n else bytes(map(is_not, slots, repeat(None)))
    index.live = from_flags(present)
    index.heartbeats.load(compress(range(n), present) if live < n else range(n), index.counts_of)
    index.packed = live if ordered and type(ordered[0]) is Packed else 0  # else decoded
    return True


def unpack(index: NodeIndex, packed: Packed) -> Node:
    """Decode a restored node (see the module): in its slot and in the registry from now on."""
    node = decode_node(packed)
    node.slot = packed.slot
    index.slots[node.slot] = node
    index.registry[node.node_id] = node
    index.packed -= 1
    return node


def unpack_step(index: NodeIndex) -> bool:
    """Decode the restored nodes of the next UNPACK_STEP slots; False once none is left."""
    start = index.unpacked
    end = min(len(index.slots), start + UNPACK_STEP)
    for node in index.slots[start:end]:
        if type(node) is Packed:
            unpack(index, node)
    index.unpacked = end
    return index.packed > 0 and end < len(index.slots)


def unpack_all(index: NodeIndex) -> None:
    while unpack_step(index):
        pass


def rebuild(index: NodeIndex, nodes: Iterable[Node]) -> None:
    """Index `nodes` from scratch (when no saved index fits them), in generation order, with
    dense slots; the key strings they hold are interned on the way (decoded anew from a
    snapshot, each node has its own copies: one shared string each saves ~300 bytes a node).

    One pass a block: the slots of each key collected as offsets, each key's bits made once
    per block (`_bits`) rather than a big int or'ed per node."""
    index.__init__()  # type: ignore[misc]
    ordered = sorted(nodes, key=attrgetter("generation"))
    indices = index.groups()
    intern = sys.intern
    for first in range(0, len(ordered), bitmaps.BLOCK):
        found: tuple[dict[str, list[int]], ...] = ({}, {}, {}, {})
        types, capabilities, regions, statuses = found
        offset = 0
        for node in ordered[first : first + bitmaps.BLOCK]:
            node.slot = first + offset
            key = node.type = intern(node.type)
            types.setdefault(key, []).append(offset)
            caps = node.capabilities
            for i, cap in enumerate(caps):
                caps[i] = key = intern(cap)
                capabilities.setdefault(key, []).append(offset)
            region = node.metadata.get("region")
            if type(region) is str:
                node.metadata["region"] = key = intern(region)
                regions.setdefault(key, []).append(offset)
            key = node.status = intern(node.status)
            statuses.setdefault(key, []).append(offset)
            offset += 1
        block = first >> bitmaps.SHIFT
        index.live[block] = (1 << offset) - 1
        for group, keys in zip(indices, found, strict=True):
            for key, offsets in keys.items():
                group.setdefault(key, {})[block] = _bits(offsets)
    index.slots.extend(ordered)
    index.heartbeats.load(range(len(ordered)), index.counts_of)


_ZEROS = b"0" * bitmaps.BLOCK


def _bits(offsets: list[int]) -> int:
    """The int whose bits `offsets` are set (offsets < BLOCK): as binary digits, parsed once."""
    digits = bytearray(_ZEROS)
    for offset in offsets:
        digits[offset] = 49  # "1"
    return int(digits[::-1], 2)
