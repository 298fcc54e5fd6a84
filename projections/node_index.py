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
- `last_heartbeat_at`: a `HeartbeatOrder` (`projections.heartbeat_order`), an append-only log
  with lazy deletion, kept from the first event on (a heartbeat is an append);
- `node_id`, `name`, `load`: a `SortedSlots` (`projections.sorted_slots`: blocks of slots sorted
  by (key, slot)), built in bounded slices (`build_step`: a server runs them in the background
  once it is up; a query that needs an order still building takes one slice and picks its page
  from the matches with `heapq`), then kept up to date by every event that changes the key.
A filtered page walks the order and tests each slot in the filter's bitmap (skipping whole
blocks by their token counts under a single filter), or sorts the matches when there are so few
that sorting costs less than the walk.

Presence is never stored (see `projections.nodes`): a `Window` is the bitmap of the nodes whose
last heartbeat is within `within` seconds of a given `now`. It is built in slices from the
heartbeat order (by the server's background task for its thresholds, or finished by the first
query that asks for it), kept right by every heartbeat, and moved to the `now` of each later
query by visiting only the nodes whose heartbeat crossed the boundary in between (built anew
when that would visit more than 1/REBUILD_WINDOW of the nodes). Windows are a cache: they are
not part of the state, and queries at any `now` are exact.

A snapshot saves the bitmaps and each node's slot, and a load restores them with the heartbeat
order instead of rebuilding (`projections.index_snapshot`), the nodes still packed (decoded on
first touch, or by the background slices before the token counts and sorted orders); the
sorted orders and windows are built again in the background.

A replay from nothing (a start without a snapshot) does not index node by node: after `defer` the
changes only set the nodes' fields, and `settle` indexes the nodes left at once, a block at a time
(`index_snapshot.rebuild`: ~4x cheaper than or'ing a 4,096-bit block per key per node); its slots
are dense where the replay's had holes, in the same order, so every query answers the same.

Invariant: every structure holds exactly the live nodes, keyed by their current attributes.
`NodesProjection` changes an attribute that a structure is keyed on only through this class.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from projections.node_record import Node

from projections.bitmaps import (
    BLOCK,
    Bitmap,
    bm_add,
    bm_discard,
    count,
    intersect,
    slots_of,
    walk,
)
from projections.heartbeat_order import HeartbeatOrder, Token
from projections.index_snapshot import rebuild, unpack, unpack_all, unpack_step
from projections.node_record import Packed
from projections.sorted_slots import SortedSlots
from projections.token_counts import Counts, count_bitmap

ORDERS = ("node_id", "name", "load")  # the SortedSlots (by last heartbeat: HeartbeatOrder)
MAX_WINDOWS = 4  # presence windows kept (one per distinct `within` asked)
WINDOW_STEP = 8_192  # nodes visited per slice of a window's build (~5 ms here)
REBUILD_WINDOW = 8  # a window moved past more than 1/8 of the nodes is built anew
SORT_COST = 4.0  # sorting one match costs about this many walk steps (measured)


class Window:
    """The slots of the nodes whose last heartbeat is within `within` seconds of `now`."""

    __slots__ = ("within", "now", "bits", "todo")

    def __init__(self, within: float, now: float) -> None:
        self.within = within
        self.now = now
        self.bits: Bitmap = {}
        # While built in slices: the heartbeat key up to which the order has been visited
        # (every node changed meanwhile is already right); None once complete.
        self.todo: float | None = -math.inf

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
        self.heartbeats = HeartbeatOrder(nodes)  # always kept: a heartbeat is an append
        self.windows: dict[float, Window] = {}
        self.regrouped = 0  # changes to the bitmaps so far (what `_size` caches are valid for)
        self._sizes: dict[int, int] = {}  # id of a group's bitmap -> its size
        self._sizes_at = 0
        # After a restore from a snapshot: the nodes still `Packed`, the registry that holds
        # them, and the first slot `index_snapshot.unpack_step` has not visited.
        self.packed = 0
        self.registry: dict[str, Node | Packed] = {}
        self.unpacked = 0
        self.orders_wanted = False  # `build_orders` called while nodes were still packed
        self.deferred = False  # `defer`: nothing indexed until `settle`

    def defer(self) -> None:
        """Until `settle`, changes set the nodes' fields only (an empty index)."""
        assert not self.slots, "only an empty index defers"
        self.deferred = True

    def settle(self, nodes: Iterable[Node]) -> None:
        """Index `nodes`, every live one, after `defer` (a no-op otherwise)."""
        if self.deferred:
            rebuild(self, nodes)  # anew: `deferred` is False again

    def order(self, name: str) -> SortedSlots | HeartbeatOrder | None:
        """The order of the live slots by `self.keys[name]` once it is ready, kept up to date
        from then on; None while it is built (its build starts on first use, or with
        `build_orders`, and moves one slice per `build_step`)."""
        if name == "last_heartbeat_at":
            return self.heartbeats
        if self.packed:  # it reads every node's key: decoded once, not once per key read
            unpack_all(self)
        order = self.orders.get(name)
        if order is None:
            order = self.orders[name] = SortedSlots(self.keys[name], self.slots)
            order.start(self.slots)
        return order if order.ready else None

    def build_orders(self) -> None:
        """Start building every order no query has asked for yet (a replay does not pay for
        them: a server calls this once it is up, then `build_step` between other work)."""
        if self.packed:  # by `build_step` once every node is decoded (they read every node)
            self.orders_wanted = True
            return
        for name in ORDERS:
            self.order(name)

    def build_step(self) -> bool:
        """One bounded slice of a window's build, of decoding restored nodes, or of an order's
        build; False when none is left."""
        for w in self.windows.values():
            if w.todo is not None:
                return self._window_step(w) or True
        if self.packed:
            if not unpack_step(self) and self.orders_wanted:
                self.build_orders()
            return True
        if self.heartbeats.uncounted:
            return self.heartbeats.count_step() or True
        return any(order.step() for order in self.orders.values())

    def _all_orders(self) -> list[SortedSlots | HeartbeatOrder]:
        return [*self.orders.values(), self.heartbeats]

    # --- changes (called by the projection's handlers) ---

    def add(self, node: Node) -> None:
        if self.deferred:
            return
        slot = node.slot = len(self.slots)
        self.slots.append(node)
        self._bitmaps(node, bm_add)
        self.heartbeats.insert(slot)
        for order in self.orders.values():
            order.insert(slot)
        for w in self.windows.values():
            if w.holds(node.last_heartbeat_at):
                bm_add(w.bits, slot)

    def remove(self, node: Node) -> bool:
        """Drop `node`; True when that compacted the slots (every node's slot changed)."""
        if self.deferred:
            return False
        slot = node.slot
        self._bitmaps(node, bm_discard)
        self.heartbeats.remove(slot)
        for order in self.orders.values():
            order.remove(slot)
        for w in self.windows.values():
            bm_discard(w.bits, slot)
        self.slots[slot] = None
        self.holes += 1
        if self.holes > BLOCK and self.holes * 2 > len(self.slots):
            unpack_all(self)
            self.rebuild([n for n in self.slots if n is not None])
            return True
        return False

    def _bitmaps(self, node: Node, op: Callable[[Bitmap, int], None]) -> None:
        self.regrouped += 1
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

    def _keys(self, node: Node) -> Iterator[tuple[dict[str, Bitmap], str]]:
        yield self.by_type, node.type
        for cap in node.capabilities:
            yield self.by_capability, cap
        if node.region is not None:
            yield self.by_region, node.region
        yield self.by_status, node.status

    def _move(self, index: dict[str, Bitmap], old: str | None, new: str | None, slot: int) -> None:
        self.regrouped += 1
        if old is not None:
            bm_discard(index[old], slot)
            if not index[old]:
                del index[old]
        if new is not None:
            bm_add(index.setdefault(new, {}), slot)

    def set_status(self, node: Node, status: str) -> None:
        if not self.deferred:
            self._move(self.by_status, node.status, status, node.slot)
            for order in self._all_orders():
                order.retoken(node.slot, [("status", node.status)], [("status", status)])
        node.status = status

    def set_metadata(self, node: Node, metadata: dict[str, Any]) -> None:
        old = node.region
        node.metadata.update(metadata)
        new = node.region
        if new != old and not self.deferred:
            self._move(self.by_region, old, new, node.slot)
            before = [("region", old)] if old is not None else []
            after = [("region", new)] if new is not None else []
            for order in self._all_orders():
                order.retoken(node.slot, before, after)

    def set_load(self, node: Node, load: float) -> None:
        order = self.orders.get("load")
        if order is not None:
            order.remove(node.slot)
        node.load = load
        if order is not None:
            order.insert(node.slot)

    def set_heartbeat(self, node: Node, at: float) -> None:
        if not self.deferred:
            self.heartbeats.move(node, at)
        old, node.last_heartbeat_at = node.last_heartbeat_at, at
        for w in self.windows.values():
            now = w.holds(at)
            if now != w.holds(old) or w.todo is not None:  # a window being built: set it
                (bm_add if now else bm_discard)(w.bits, node.slot)

    def rebuild(self, nodes: Iterable[Node]) -> None:
        """Index `nodes` from scratch (`index_snapshot.rebuild`)."""
        rebuild(self, nodes)

    def counts_of(self, bm: Bitmap) -> Counts:
        """How many nodes of `bm` carry each type, capability, region and status."""
        return count_bitmap(self.groups(), bm)

    def groups(self) -> tuple[dict[str, Bitmap], ...]:
        return self.by_type, self.by_capability, self.by_region, self.by_status

    # --- queries ---

    def window(self, within: float, now: float) -> Bitmap:
        """The bitmap of the nodes with a heartbeat at most `within` seconds before `now`."""
        w = self.windows.get(within)
        order = self.heartbeats
        if w is None:
            w = self.prepare_window(within, now)
        while w.todo is not None:  # not built in the background (yet): finish it
            self._window_step(w)
        if w.now == now:
            return w.bits
        old, new = self._cut(within, w.now), self._cut(within, now)
        if abs(new - old) * REBUILD_WINDOW > order.size:  # cheaper built anew
            del self.windows[within]
            return self.window(within, now)
        w.now = now
        nodes = self.slots
        for s in order.ascending(min(old, new), max(old, new)):
            if w.holds(nodes[s].last_heartbeat_at):  # type: ignore[union-attr]
                bm_add(w.bits, s)
            else:
                bm_discard(w.bits, s)
        return w.bits

    def prepare_window(self, within: float, now: float) -> Window:
        """The window of `within` at `now`, to be built by `build_step` (or its first query)."""
        w = self.windows.get(within)
        if w is None:
            if len(self.windows) >= MAX_WINDOWS:
                del self.windows[next(iter(self.windows))]
            w = self.windows[within] = Window(within, now)
        return w

    def _window_step(self, w: Window) -> bool:
        """Visit the next WINDOW_STEP nodes of the heartbeat order in `w`; False once done."""
        order, now, within, todo = self.heartbeats, w.now, w.within, w.todo
        lo = order.first_true(lambda k: k > todo and now - k <= within)  # type: ignore[operator]
        hi = min(order.size, lo + WINDOW_STEP)
        w.todo = None
        if hi < order.size:  # to the end of the tie group at `hi`
            w.todo = last = order.key(next(order.ascending(hi - 1, hi)))
            hi = order.first_true(lambda k: k > last)
        for b, x in order.bitmap_of(lo, hi).items():
            w.bits[b] = w.bits.get(b, 0) | x
        return w.todo is not None

    def _cut(self, within: float, now: float) -> int:
        """First position in heartbeat order whose key is within `within` of `now`."""
        return self.heartbeats.first_true(lambda k: now - k <= within)

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
        elif (order := self.order(sort_by)) is None:
            # Its order is being built: one more slice of it, then the page from the matches
            # (the same result as a stable sort of them, in O(matches)).
            self.build_step()
            pick = heapq.nlargest if descending else heapq.nsmallest
            found = slots_of(blocks, 0, total)
            slots = pick(skip + limit, found, key=self.keys[sort_by])[skip:]
        else:
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
                steps = ((limit if single else skip + limit) * (hi - lo)) / total
                if total * SORT_COST < steps:
                    found = slots_of(blocks, 0, total)
                    found.sort(key=order.key, reverse=descending)  # stable: ties stay by slot
                    slots = found[skip : skip + limit]
                elif single:
                    slots = order.skip_walk(tokens[0], dict(blocks), skip, limit, descending)
                else:
                    it = order.descending(lo, hi) if descending else order.ascending(lo, hi)
                    slots = walk(it, dict(blocks), skip, limit)
        nodes = self.slots
        out: list[Any] = [nodes[s] for s in slots]
        if self.packed:  # restored nodes not decoded yet: decoded now
            out = [unpack(self, n) if isinstance(n, Packed) else n for n in out]
        return out, total

    def _size(self, group: Bitmap) -> int:
        """How many nodes `group` holds: cached until a node is added, removed or regrouped."""
        if self._sizes_at != self.regrouped:
            self._sizes.clear()
            self._sizes_at = self.regrouped
        n = self._sizes.get(id(group))
        if n is None:
            n = self._sizes[id(group)] = sum(map(int.bit_count, group.values()))
        return n

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
            if matches is None:  # no filter: every node of the group (counted once per change)
                n = self._size(group)
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
        lo, hi = 0, self.heartbeats.size
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
