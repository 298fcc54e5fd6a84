"""Discovery indices of the nodes projection: answers in time proportional to the page.

Every registered node gets a dense integer **slot**, in registration order (so slot order is the
order of `generation`, the default sort). Filters are **bitmaps over slots**, cut in blocks of
`BLOCK` slots, each block a Python int (`Bitmap`: block number -> bits, absent when empty): one
per type, capability, region and status, one of every live node, and one per presence window.
A filter is the AND of its bitmaps, block by block; the total is the sum of `int.bit_count()`;
a page skips whole blocks by their counts and takes bits only from the blocks it returns.

Sort orders:
- registration order: the slots themselves (descending: from the last block down);
- `type`, `status`: the groups of that index in key order, slots ascending in each group (what
  a stable sort of registration order gives, ascending or descending);
- `node_id`, `name`, `load`, `last_heartbeat_at`: a `SortedSlots` (a list of blocks of slots
  sorted by (key, slot)), kept up to date by every event that changes the key; a filtered page
  walks it and tests each slot in the filter's bitmap, or sorts the matches when there are so
  few that sorting costs less than the walk.

Presence is never stored (see `projections.nodes`): a `Window` is the bitmap of the nodes whose
last heartbeat is within `within` seconds of a given `now`. It is built on the first query that
asks for it, kept right by every heartbeat, and moved to the `now` of each later query by
visiting only the nodes whose heartbeat crossed the boundary in between (in heartbeat order).
Windows are a cache: they are not part of the state, and queries at any `now` are exact.

Invariant: every structure holds exactly the live nodes, keyed by their current attributes.
`NodesProjection` changes an attribute that a structure is keyed on only through this class.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from operator import attrgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from projections.nodes import Node

SHIFT = 12
BLOCK = 1 << SHIFT
MASK = BLOCK - 1
BLOCK_LEN = 1024  # entries per block of a SortedSlots (split at twice that)
MAX_WINDOWS = 4  # presence windows kept (one per distinct `within` asked)
SORT_COST = 4.0  # sorting one match costs about this many walk steps (measured)

Bitmap = dict[int, int]  # block number -> bits of the slots of that block (never 0)
Token = tuple[str, str]  # ("type" | "capability" | "region" | "status", value)
Blocks = list[tuple[int, int]]  # (block number, bits), ascending, bits != 0


def bm_add(bm: Bitmap, slot: int) -> None:
    b = slot >> SHIFT
    bm[b] = bm.get(b, 0) | (1 << (slot & MASK))


def bm_discard(bm: Bitmap, slot: int) -> None:
    b = slot >> SHIFT
    x = bm.get(b)
    if x is not None:
        x &= ~(1 << (slot & MASK))
        if x:
            bm[b] = x
        else:
            del bm[b]


def bm_has(bm: Bitmap, slot: int) -> bool:
    return bool((bm.get(slot >> SHIFT, 0) >> (slot & MASK)) & 1)


def intersect(pos: list[Bitmap], neg: Iterable[Bitmap] = ()) -> Blocks:
    """The blocks of (AND of `pos`) AND NOT (each of `neg`); `pos` must not be empty."""
    pos = sorted(pos, key=len)
    first, rest = pos[0], pos[1:]
    neg = [n for n in neg if n]
    out: Blocks = []
    for b in sorted(first):
        x = first[b]
        for other in rest:
            x &= other.get(b, 0)
            if not x:
                break
        else:
            for other in neg:
                y = other.get(b)
                if y:
                    x &= ~y
            if x:
                out.append((b, x))
    return out


def count(blocks: Blocks) -> int:
    return sum(x.bit_count() for _, x in blocks)


def _drop_low(x: int, k: int) -> int:
    """`x` without its `k` lowest set bits (0 < k < x.bit_count())."""
    lo, hi = 0, x.bit_length()  # smallest m with popcount(x mod 2^m) >= k
    while lo < hi:
        mid = (lo + hi) // 2
        if (x & ((1 << mid) - 1)).bit_count() >= k:
            hi = mid
        else:
            lo = mid + 1
    return (x >> lo) << lo


def _drop_high(x: int, k: int) -> int:
    """`x` without its `k` highest set bits (0 < k < x.bit_count())."""
    lo, hi = 0, x.bit_length()  # largest m with popcount(x >> m) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (x >> mid).bit_count() >= k:
            lo = mid
        else:
            hi = mid - 1
    return x & ((1 << lo) - 1)


def slots_of(blocks: Blocks, skip: int, limit: int, descending: bool = False) -> list[int]:
    """The slots at ranks [skip, skip + limit) of `blocks`, ascending or descending."""
    out: list[int] = []
    if limit <= 0:
        return out
    for b, x in reversed(blocks) if descending else blocks:
        c = x.bit_count()
        if skip >= c:
            skip -= c
            continue
        base = b << SHIFT
        if descending:
            if skip:
                x = _drop_high(x, skip)
            while x and len(out) < limit:
                i = x.bit_length() - 1
                out.append(base + i)
                x ^= 1 << i
        else:
            if skip:
                x = _drop_low(x, skip)
            while x and len(out) < limit:
                low = x & -x
                out.append(base + low.bit_length() - 1)
                x ^= low
        skip = 0
        if len(out) >= limit:
            break
    return out


class SortedSlots:
    """Slots sorted by (key(slot), slot), in blocks of about BLOCK_LEN: insert and remove in
    O(log n + BLOCK_LEN), position lookups in O(n / BLOCK_LEN). `key` must give the key an
    entry was inserted with until it is removed (remove before changing the attribute)."""

    def __init__(
        self, key: Callable[[int], Any], tokens: Callable[[int], Iterable[Token]] = lambda s: ()
    ) -> None:
        self.key = key
        self.tokens = tokens  # what each block counts of its entries (see `skip_walk`)
        self.blocks: list[list[int]] = []
        self.maxes: list[tuple[Any, int]] = []  # (key, slot) of each block's last entry
        self.counts: list[dict[Token, int]] = []  # per block: token -> entries with it
        self.size = 0
        self._starts: list[int] | None = None  # position of each block's first entry

    def _count(self, block: list[int]) -> dict[Token, int]:
        counts: dict[Token, int] = {}
        for s in block:
            for t in self.tokens(s):
                counts[t] = counts.get(t, 0) + 1
        return counts

    def _add_tokens(self, i: int, tokens: Iterable[Token], delta: int) -> None:
        counts = self.counts[i]
        for t in tokens:
            n = counts.get(t, 0) + delta
            if n:
                counts[t] = n
            else:
                del counts[t]

    def retoken(self, s: int, old: Iterable[Token], new: Iterable[Token]) -> None:
        """Entry `s` now has the tokens `new` instead of `old`."""
        i, _ = self._find(self._full(s))
        self._add_tokens(i, old, -1)
        self._add_tokens(i, new, 1)

    def _full(self, s: int) -> tuple[Any, int]:
        return self.key(s), s

    def load(self, slots: list[int]) -> None:
        """Replace the content with `slots` (any order)."""
        slots = sorted(slots, key=self._full)
        self.blocks = [slots[i : i + BLOCK_LEN] for i in range(0, len(slots), BLOCK_LEN)]
        self.maxes = [self._full(block[-1]) for block in self.blocks]
        self.counts = [self._count(block) for block in self.blocks]
        self.size = len(slots)
        self._starts = None

    def _find(self, k: tuple[Any, int]) -> tuple[int, int]:
        """(block index, index in the block) of the first entry >= k (block may be len)."""
        i = bisect_left(self.maxes, k)
        if i == len(self.blocks):
            return i, 0
        return i, bisect_left(self.blocks[i], k, key=self._full)

    def insert(self, s: int) -> None:
        self._starts = None
        self.size += 1
        k = self._full(s)
        if not self.blocks:
            self.blocks.append([s])
            self.maxes.append(k)
            self.counts.append(self._count([s]))
            return
        i, j = self._find(k)
        if i == len(self.blocks):
            i -= 1
            j = len(self.blocks[i])
            self.maxes[i] = k
        block = self.blocks[i]
        block.insert(j, s)
        self._add_tokens(i, self.tokens(s), 1)
        if len(block) > 2 * BLOCK_LEN:
            halves = [block[:BLOCK_LEN], block[BLOCK_LEN:]]
            self.blocks[i : i + 1] = halves
            self.maxes[i : i + 1] = [self._full(block[BLOCK_LEN - 1]), self.maxes[i]]
            self.counts[i : i + 1] = [self._count(half) for half in halves]

    def remove(self, s: int) -> None:
        i, j = self._find(self._full(s))
        block = self.blocks[i]
        if block[j] != s:
            raise KeyError(s)
        del block[j]
        self._add_tokens(i, self.tokens(s), -1)
        if not block:
            del self.blocks[i]
            del self.maxes[i]
            del self.counts[i]
        elif j == len(block):
            self.maxes[i] = self._full(block[-1])
        self.size -= 1
        self._starts = None

    def starts(self) -> list[int]:
        if self._starts is None:
            starts, at = [], 0
            for block in self.blocks:
                starts.append(at)
                at += len(block)
            self._starts = starts
        return self._starts

    def position(self, key: Any, right: bool = False) -> int:
        """How many entries have a key < `key` (<= `key` when `right`)."""
        k = (key, 1 << 62 if right else -1)
        i, j = self._find(k)
        return self.size if i == len(self.blocks) else self.starts()[i] + j

    def first_true(self, pred: Callable[[Any], bool]) -> int:
        """The first position whose key satisfies `pred`, monotone (False then True) in key."""
        blocks = self.blocks
        i = bisect_left(self.maxes, True, key=lambda m: pred(m[0]))
        if i == len(blocks):
            return self.size
        j = bisect_left(blocks[i], True, key=lambda s: pred(self.key(s)))
        return self.starts()[i] + j

    def at(self, pos: int) -> int:
        starts = self.starts()
        i = bisect_right(starts, pos) - 1
        return self.blocks[i][pos - starts[i]]

    def ascending(self, lo: int, hi: int) -> Iterator[int]:
        """The slots at positions [lo, hi)."""
        if lo >= hi:
            return
        starts = self.starts()
        i = bisect_right(starts, lo) - 1
        off = lo - starts[i]
        left = hi - lo
        while left > 0 and i < len(self.blocks):
            part = self.blocks[i][off : off + left]
            yield from part
            left -= len(part)
            i += 1
            off = 0

    def descending(self, lo: int, hi: int) -> Iterator[int]:
        """The slots at positions [lo, hi) by key descending, slots ascending among equal keys
        (what a stable sort with reverse=True gives). `lo` and `hi` must be group boundaries."""
        while hi > lo:
            k = self.key(self.at(hi - 1))
            start = max(lo, self.position(k))
            yield from self.ascending(start, hi)
            hi = start

    def descending_from(self, skip: int, lo: int, hi: int) -> Iterator[int]:
        """`descending(lo, hi)` without its first `skip` entries, found without visiting them."""
        if skip >= hi - lo:
            return
        k = self.key(self.at(hi - 1 - skip))
        start, end = max(lo, self.position(k)), min(hi, self.position(k, right=True))
        yield from self.ascending(start + skip - (hi - end), end)
        yield from self.descending(lo, start)

    def skip_walk(
        self, token: Token, matches: Bitmap, skip: int, limit: int, descending: bool
    ) -> list[int]:
        """`_walk` over the whole order when the matches are the entries with `token`: whole
        blocks are skipped by their counts (descending: to the end of the tie group the first
        walked block starts in, so the skipped part is a suffix of whole groups)."""
        counts, starts = self.counts, self.starts()
        if not descending:
            for i in range(len(self.blocks)):
                c = counts[i].get(token, 0)
                if skip < c:
                    return _walk(self.ascending(starts[i], self.size), matches, skip, limit)
                skip -= c
            return []
        i, counted = len(self.blocks), 0
        while i > 0 and counted + counts[i - 1].get(token, 0) <= skip:
            counted += counts[i - 1].get(token, 0)
            i -= 1
        hi = starts[i] if i < len(self.blocks) else self.size
        if 0 < hi < self.size:
            k = self.key(self.at(hi))
            if self.position(k) < hi:  # a tie group straddles: move to its end
                end = self.position(k, right=True)
                counted -= len(_walk(self.ascending(hi, end), matches, 0, end - hi))
                hi = end
        return _walk(self.descending(0, hi), matches, skip - counted, limit)


class Window:
    """The slots of the nodes whose last heartbeat is within `within` seconds of `now`."""

    __slots__ = ("within", "now", "bits")

    def __init__(self, within: float, now: float) -> None:
        self.within = within
        self.now = now
        self.bits: Bitmap = {}

    def holds(self, heartbeat: float | None) -> bool:
        return heartbeat is not None and self.now - heartbeat <= self.within


def _hb_key(node: Node) -> float:
    return node.last_heartbeat_at or 0.0


def _load_key(node: Node) -> tuple[bool, float]:
    return (node.load is None, node.load or 0.0)


class NodeIndex:
    """Slots, bitmaps, sorted orders and presence windows of the live nodes (see the module)."""

    def __init__(self) -> None:
        self.slots: list[Node | None] = []
        self.holes = 0
        self.live: Bitmap = {}
        self.by_type: dict[str, Bitmap] = {}
        self.by_capability: dict[str, Bitmap] = {}
        self.by_region: dict[str, Bitmap] = {}
        self.by_status: dict[str, Bitmap] = {}
        nodes = self.slots
        self.keys: dict[str, Callable[[int], Any]] = {
            "node_id": lambda s: nodes[s].node_id,  # type: ignore[union-attr]
            "name": lambda s: nodes[s].name.lower(),  # type: ignore[union-attr]
            "load": lambda s: _load_key(nodes[s]),  # type: ignore[arg-type]
            "last_heartbeat_at": lambda s: _hb_key(nodes[s]),  # type: ignore[arg-type]
        }
        self.orders: dict[str, SortedSlots] = {}  # built by the first query that needs them
        self.windows: dict[float, Window] = {}

    def order(self, name: str) -> SortedSlots:
        """The order of the live slots by `self.keys[name]`, built on first use (one sort; a
        replay does not pay for orders no query asks for), kept up to date from then on."""
        order = self.orders.get(name)
        if order is None:
            order = self.orders[name] = SortedSlots(self.keys[name], self._tokens)
            order.load([n.slot for n in self.slots if n is not None])
        return order

    # --- changes (called by the projection's handlers) ---

    def add(self, node: Node) -> None:
        slot = node.slot = len(self.slots)
        self.slots.append(node)
        self._bitmaps(node, bm_add)
        for order in self.orders.values():
            order.insert(slot)
        for w in self.windows.values():
            if w.holds(node.last_heartbeat_at):
                bm_add(w.bits, slot)

    def remove(self, node: Node) -> None:
        slot = node.slot
        self._bitmaps(node, bm_discard)
        for order in self.orders.values():
            order.remove(slot)
        for w in self.windows.values():
            bm_discard(w.bits, slot)
        self.slots[slot] = None
        self.holes += 1
        if self.holes > BLOCK and self.holes * 2 > len(self.slots):
            self.rebuild([n for n in self.slots if n is not None])

    def _bitmaps(self, node: Node, op: Callable[[Bitmap, int], None]) -> None:
        slot = node.slot
        op(self.live, slot)
        op(self.by_type.setdefault(node.type, {}), slot)
        for cap in node.capabilities:
            op(self.by_capability.setdefault(cap, {}), slot)
        if node.region is not None:
            op(self.by_region.setdefault(node.region, {}), slot)
        op(self.by_status.setdefault(node.status, {}), slot)
        if op is bm_discard:
            for index, key in self._keys(node):
                if not index.get(key, True):
                    del index[key]

    def _tokens(self, slot: int) -> Iterator[Token]:
        node = self.slots[slot]
        assert node is not None
        yield "type", node.type
        for cap in node.capabilities:
            yield "capability", cap
        if node.region is not None:
            yield "region", node.region
        yield "status", node.status

    def _keys(self, node: Node) -> Iterator[tuple[dict[str, Bitmap], str]]:
        yield self.by_type, node.type
        for cap in node.capabilities:
            yield self.by_capability, cap
        if node.region is not None:
            yield self.by_region, node.region
        yield self.by_status, node.status

    def _move(self, index: dict[str, Bitmap], old: str | None, new: str | None, slot: int) -> None:
        if old is not None:
            bm_discard(index[old], slot)
            if not index[old]:
                del index[old]
        if new is not None:
            bm_add(index.setdefault(new, {}), slot)

    def set_status(self, node: Node, status: str) -> None:
        self._move(self.by_status, node.status, status, node.slot)
        for order in self.orders.values():
            order.retoken(node.slot, [("status", node.status)], [("status", status)])
        node.status = status

    def set_metadata(self, node: Node, metadata: dict[str, Any]) -> None:
        old = node.region
        node.metadata.update(metadata)
        new = node.region
        if new != old:
            self._move(self.by_region, old, new, node.slot)
            before = [("region", old)] if old is not None else []
            after = [("region", new)] if new is not None else []
            for order in self.orders.values():
                order.retoken(node.slot, before, after)

    def set_load(self, node: Node, load: float) -> None:
        order = self.orders.get("load")
        if order is not None:
            order.remove(node.slot)
        node.load = load
        if order is not None:
            order.insert(node.slot)

    def set_heartbeat(self, node: Node, at: float) -> None:
        order = self.orders.get("last_heartbeat_at")
        if order is not None:
            order.remove(node.slot)
        old, node.last_heartbeat_at = node.last_heartbeat_at, at
        if order is not None:
            order.insert(node.slot)
        for w in self.windows.values():
            was, now = w.holds(old), w.holds(at)
            if was != now:
                (bm_add if now else bm_discard)(w.bits, node.slot)

    def rebuild(self, nodes: Iterable[Node]) -> None:
        """Index `nodes` from scratch, in generation order, with dense slots; the key strings
        they hold are interned on the way (decoded anew from a snapshot, each node has its own
        copies: one shared string each saves ~300 bytes a node).

        One pass a block: the slots of each key collected as offsets, each key's bits made once
        per block (`_bits`) rather than a big int or'ed per node."""
        self.__init__()  # type: ignore[misc]
        ordered = sorted(nodes, key=attrgetter("generation"))
        indices = (self.by_type, self.by_capability, self.by_region, self.by_status)
        intern = sys.intern
        for first in range(0, len(ordered), BLOCK):
            found: tuple[dict[str, list[int]], ...] = ({}, {}, {}, {})
            types, capabilities, regions, statuses = found
            offset = 0
            for node in ordered[first : first + BLOCK]:
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
            block = first >> SHIFT
            self.live[block] = (1 << offset) - 1
            for index, keys in zip(indices, found, strict=True):
                for key, offsets in keys.items():
                    index.setdefault(key, {})[block] = _bits(offsets)
        self.slots.extend(ordered)

    # --- queries ---

    def window(self, within: float, now: float) -> Bitmap:
        """The bitmap of the nodes with a heartbeat at most `within` seconds before `now`."""
        w = self.windows.get(within)
        order = self.order("last_heartbeat_at")
        if w is None:
            if len(self.windows) >= MAX_WINDOWS:
                del self.windows[next(iter(self.windows))]
            w = self.windows[within] = Window(within, now)
            changed = order.ascending(self._cut(within, now), order.size)
        elif w.now != now:
            old, new = self._cut(within, w.now), self._cut(within, now)
            w.now = now
            changed = order.ascending(min(old, new), max(old, new))
        else:
            return w.bits
        nodes = self.slots
        for s in changed:
            if w.holds(nodes[s].last_heartbeat_at):  # type: ignore[union-attr]
                bm_add(w.bits, s)
            else:
                bm_discard(w.bits, s)
        return w.bits

    def _cut(self, within: float, now: float) -> int:
        """First position in heartbeat order whose key is within `within` of `now`."""
        return self.order("last_heartbeat_at").first_true(lambda k: now - k <= within)

    def page(
        self,
        *,
        type: str | None = None,
        capabilities: Iterable[str] = (),
        region: str | None = None,
        status: str | None = None,
        presence: str | None = None,
        online: bool | None = None,
        now: float = 0.0,
        online_within: float = 60.0,
        stale_within: float = 300.0,
        sort_by: str = "registered_at",
        descending: bool = False,
        skip: int = 0,
        limit: int = 100,
    ) -> tuple[list[Node], int]:
        """The nodes at ranks [skip, skip + limit) of the matches in the given order, and how
        many match. Orders are those of a stable sort of the matches in registration order."""
        pos: list[Bitmap] = []
        neg: list[Bitmap] = []
        tokens: list[Token] = []
        if type is not None:
            pos.append(self.by_type.get(type, {}))
            tokens.append(("type", type))
        for cap in capabilities:
            pos.append(self.by_capability.get(cap, {}))
            tokens.append(("capability", cap))
        if region is not None:
            pos.append(self.by_region.get(region, {}))
            tokens.append(("region", region))
        if status is not None:
            pos.append(self.by_status.get(status, {}))
            tokens.append(("status", status))
        if presence is not None or online is not None:
            on = self.window(online_within, now)
            if presence == "online" or online is True:
                pos.append(on)
            if online is False:
                neg.append(on)
            if presence == "stale":
                pos.append(self.window(stale_within, now))
                neg.append(on)
            elif presence == "offline":
                neg += [on, self.window(stale_within, now)]
        filtered = bool(pos or neg)
        if not pos:
            pos.append(self.live)
        if not all(pos):
            return [], 0
        blocks = intersect(pos, neg)
        total = count(blocks)
        if skip >= total or limit <= 0:
            return [], total
        if sort_by == "registered_at":
            slots = slots_of(blocks, skip, limit, descending)
        elif sort_by in ("type", "status"):
            groups = self.by_type if sort_by == "type" else self.by_status
            matches = dict(blocks) if filtered else None
            slots = self._by_group(groups, matches, descending, skip, limit)
        else:
            order = self.order(sort_by)
            lo, hi = 0, order.size
            if sort_by == "last_heartbeat_at":
                lo, hi = self._heartbeat_range(presence, online, now, online_within, stale_within)
            if not filtered:
                if descending:
                    slots = list(islice(order.descending_from(skip, lo, hi), limit))
                else:
                    slots = list(order.ascending(skip, min(hi, skip + limit)))
            else:
                # Walking visits about (skip + limit) / density entries (only limit / density
                # when whole blocks can be skipped by their counts); sorting the matches costs
                # about SORT_COST walk steps each. Take the cheaper.
                single = len(set(tokens)) == 1 and len(tokens) == len(pos) and not neg
                walk = ((limit if single else skip + limit) * (hi - lo)) / total
                if total * SORT_COST < walk:
                    found = slots_of(blocks, 0, total)
                    found.sort(key=order.key, reverse=descending)  # stable: ties stay by slot
                    slots = found[skip : skip + limit]
                elif single:
                    slots = order.skip_walk(tokens[0], dict(blocks), skip, limit, descending)
                else:
                    it = order.descending(lo, hi) if descending else order.ascending(lo, hi)
                    slots = _walk(it, dict(blocks), skip, limit)
        nodes = self.slots
        return [nodes[s] for s in slots], total  # type: ignore[misc]

    def _by_group(
        self,
        groups: dict[str, Bitmap],
        matches: Bitmap | None,
        descending: bool,
        skip: int,
        limit: int,
    ) -> list[int]:
        """Group by group in key order, each in slot order (a stable sort by the group key);
        `matches` None when there is no filter."""
        out: list[int] = []
        for key in sorted(groups, reverse=descending):
            group = groups[key]
            # Count first (no lists): only the group the page lands in is cut into blocks.
            if matches is None:  # no filter: every node of the group
                n = sum(map(int.bit_count, group.values()))
            else:
                n = sum((x & matches.get(b, 0)).bit_count() for b, x in group.items())
            if skip >= n:
                skip -= n
                continue
            if matches is None:
                cut = sorted(group.items())
            else:
                cut = [(b, x & y) for b, x in sorted(group.items()) if (y := matches.get(b))]
            out += slots_of([(b, x) for b, x in cut if x], skip, limit - len(out))
            skip = 0
            if len(out) >= limit:
                break
        return out

    def _heartbeat_range(
        self,
        presence: str | None,
        online: bool | None,
        now: float,
        online_within: float,
        stale_within: float,
    ) -> tuple[int, int]:
        """Positions of the heartbeat order that can hold the presence asked: nodes within a
        window have a key past its cut, nodes out of it a key before (also the nodes that never
        sent a heartbeat, keyed 0.0, unless 0.0 itself is within the window)."""
        lo, hi = 0, self.order("last_heartbeat_at").size
        if presence == "online" or online is True:
            lo = max(lo, self._cut(online_within, now))
        if presence == "stale":
            lo = max(lo, self._cut(stale_within, now))
        out = [online_within] if presence == "stale" or online is False else []
        if presence == "offline":
            out = [online_within, stale_within]
        for within in out:
            if not now - 0.0 <= within:
                hi = min(hi, self._cut(within, now))
        return lo, max(lo, hi)


_ZEROS = b"0" * BLOCK


def _bits(offsets: list[int]) -> int:
    """The int whose bits `offsets` are set (offsets < BLOCK): as binary digits, parsed once."""
    digits = bytearray(_ZEROS)
    for offset in offsets:
        digits[offset] = 49  # "1"
    return int(digits[::-1], 2)


def _walk(slots: Iterable[int], matches: Bitmap, skip: int, limit: int) -> list[int]:
    """The matching slots of `slots` at match ranks [skip, skip + limit)."""
    out: list[int] = []
    for s in slots:
        if (matches.get(s >> SHIFT, 0) >> (s & MASK)) & 1:
            if skip:
                skip -= 1
            else:
                out.append(s)
                if len(out) >= limit:
                    break
    return out
