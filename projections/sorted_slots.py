"""`SortedSlots`: the discovery orders by node_id, name and load (see `projections.node_index`).

Slots sorted by (key, slot) in blocks of about BLOCK_LEN, each block counting its entries per
type, capability, region and status. An order is built in **bounded slices** (`Build`), so that
no step holds the event loop long on a large registry: a sample of the keys gives one splitter per
future block; slots are dealt to their block in registration order (a cursor: a change to a slot
the cursor has not reached is left to it), then each block is sorted and counted. Changes that
arrive while it builds are applied to the blocks as they stand. Until it is done the order is not
`ready`, and queries sort their matches instead.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from random import Random
from typing import TYPE_CHECKING, Any

from projections.bitmaps import Bitmap, walk
from projections.token_counts import KIND, Counts, count_node, count_slots, count_tokens

if TYPE_CHECKING:
    from projections.nodes import Node

Token = tuple[str, str]  # ("type" | "capability" | "region" | "status", value)

BLOCK_LEN = 1024  # entries per block (split at twice that)
BUILD_STEP = 4_096  # slots dealt per build step (~3 ms here)
SORT_STEP = 1_024  # block entries sorted and counted per build step (~5 ms here)
SAMPLE = 8  # keys sampled per block to come


class SortedSlots:
    """Slots sorted by (key(slot), slot), in blocks of about BLOCK_LEN: insert and remove in
    O(log n + BLOCK_LEN), position lookups in O(n / BLOCK_LEN). `key` must give the key an
    entry was inserted with until it is removed (remove before changing the attribute)."""

    def __init__(self, key: Callable[[int], Any], nodes: Sequence[Node | None]) -> None:
        self.key = key
        self.nodes = nodes  # by slot: whose tokens each block counts (see `skip_walk`)
        self.blocks: list[list[int]] = []
        self.maxes: list[tuple[Any, int]] = []  # (key, slot) of each block's last entry
        self.counts: list[Counts] = []  # per block: its entries per token
        self.size = 0
        self._starts: list[int] | None = None  # position of each block's first entry
        self.build: Build | None = None  # while built in slices

    @property
    def ready(self) -> bool:
        return self.build is None

    def start(self, slots: Sequence[Node | None]) -> None:
        """Build the order of the live slots of `slots` in slices: see `step`."""
        self.build = Build(self, slots)

    def step(self) -> bool:
        """One bounded slice of the build; False once the order is ready."""
        return self.build is not None and self.build.step()

    def _count(self, block: list[int]) -> Counts:
        return count_slots(self.nodes, block)

    def _add(self, counts: Counts, s: int, delta: int) -> None:
        count_node(counts, self.nodes[s], delta)  # type: ignore[arg-type]

    def retoken(self, s: int, old: Iterable[Token], new: Iterable[Token]) -> None:
        """Entry `s` now has the tokens `new` instead of `old`."""
        if self.build is not None:
            return self.build.retoken(s, old, new)
        i, _ = self._find(self._full(s))
        count_tokens(self.counts[i], old, -1)
        count_tokens(self.counts[i], new, 1)

    def _full(self, s: int) -> tuple[Any, int]:
        return self.key(s), s

    def _find(self, k: tuple[Any, int]) -> tuple[int, int]:
        """(block index, index in the block) of the first entry >= k (block may be len)."""
        i = bisect_left(self.maxes, k)
        if i == len(self.blocks):
            return i, 0
        return i, bisect_left(self.blocks[i], k, key=self._full)

    def insert(self, s: int) -> None:
        if self.build is not None:
            return self.build.insert(s)
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
        self._add(self.counts[i], s, 1)
        if len(block) > 2 * BLOCK_LEN:
            halves = [block[:BLOCK_LEN], block[BLOCK_LEN:]]
            self.blocks[i : i + 1] = halves
            self.maxes[i : i + 1] = [self._full(block[BLOCK_LEN - 1]), self.maxes[i]]
            self.counts[i : i + 1] = [self._count(half) for half in halves]

    def remove(self, s: int) -> None:
        if self.build is not None:
            return self.build.remove(s)
        i, j = self._find(self._full(s))
        block = self.blocks[i]
        if block[j] != s:
            raise KeyError(s)
        del block[j]
        self._add(self.counts[i], s, -1)
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
        kind, value = KIND[token[0]], token[1]
        counts, starts = [c[kind] for c in self.counts], self.starts()
        if not descending:
            for i in range(len(self.blocks)):
                c = counts[i].get(value, 0)
                if skip < c:
                    return walk(self.ascending(starts[i], self.size), matches, skip, limit)
                skip -= c
            return []
        i, counted = len(self.blocks), 0
        while i > 0 and counted + counts[i - 1].get(value, 0) <= skip:
            counted += counts[i - 1].get(value, 0)
            i -= 1
        hi = starts[i] if i < len(self.blocks) else self.size
        if 0 < hi < self.size:
            k = self.key(self.at(hi))
            if self.position(k) < hi:  # a tie group straddles: move to its end
                end = self.position(k, right=True)
                counted -= len(walk(self.ascending(hi, end), matches, 0, end - hi))
                hi = end
        return walk(self.descending(0, hi), matches, skip - counted, limit)


class Build:
    """An order built in slices (see the module): `step` deals BUILD_STEP slots to the blocks
    (found by the splitters), then sorts and counts blocks of about as many entries a step."""

    def __init__(self, order: SortedSlots, slots: Sequence[Node | None]) -> None:
        self.order = order
        self.slots = slots
        n = len(slots)
        stride = max(1, BLOCK_LEN // SAMPLE)
        full = order._full
        picks = Random(n).sample(range(n), n // stride) if n > stride else range(n)
        sample = sorted(full(s) for s in picks if slots[s] is not None)
        self.splitters = sample[SAMPLE - 1 :: SAMPLE]  # block i: keys <= splitters[i]
        self.blocks: list[list[int]] = [[] for _ in range(len(self.splitters) + 1)]
        self.counts: list[Counts] = []  # of the blocks sorted so far
        self.cursor = 0  # slots below it are dealt (all of them once dealing is done)

    def _at(self, s: int) -> int:
        return bisect_left(self.splitters, self.order._full(s))

    def insert(self, s: int) -> None:
        if s >= self.cursor:
            return  # the cursor will deal it
        i = self._at(s)
        if i < len(self.counts):
            insort(self.blocks[i], s, key=self.order._full)
            self.order._add(self.counts[i], s, 1)
        else:
            self.blocks[i].append(s)

    def remove(self, s: int) -> None:
        if s >= self.cursor:
            return
        i = self._at(s)
        block = self.blocks[i]
        if i < len(self.counts):
            del block[bisect_left(block, self.order._full(s), key=self.order._full)]
            self.order._add(self.counts[i], s, -1)
        else:
            block.remove(s)

    def retoken(self, s: int, old: Iterable[Token], new: Iterable[Token]) -> None:
        if s < self.cursor and (i := self._at(s)) < len(self.counts):
            count_tokens(self.counts[i], old, -1)
            count_tokens(self.counts[i], new, 1)

    def step(self) -> bool:
        slots, order = self.slots, self.order
        n = len(slots)
        if self.cursor < n:
            full, splitters, blocks = order._full, self.splitters, self.blocks
            end = min(n, self.cursor + BUILD_STEP)
            for s in range(self.cursor, end):
                if slots[s] is not None:
                    blocks[bisect_left(splitters, full(s))].append(s)
            self.cursor = end if end < n else 1 << 62
            return True
        done = 0
        while len(self.counts) < len(self.blocks):
            block = self.blocks[len(self.counts)]
            block.sort(key=order._full)
            self.counts.append(order._count(block))
            done += len(block)
            if done >= SORT_STEP:
                return True
        # A block the sample made large stays so until an insert splits it (no recount here).
        kept = [i for i, block in enumerate(self.blocks) if block]
        order.blocks = [self.blocks[i] for i in kept]
        order.counts = [self.counts[i] for i in kept]
        order.maxes = [order._full(block[-1]) for block in order.blocks]
        order.size = sum(map(len, order.blocks))
        order._starts = None
        order.build = None
        return False
