"""The discovery order by last heartbeat: append-only, so a heartbeat costs O(1).

The order is the live slots sorted by (key, slot), key = `last_heartbeat_at or 0.0`, the order a
stable sort of registration order gives. It is kept as **segments** in key order: the runs of
negative keys, the **zero** group (every node without a heartbeat, and any at exactly 0.0: one
bitmap, in slot order), the runs of positive keys.

A **run** is a block of a log: parallel arrays of (key, slot) entries, keys non-decreasing, the
slots of a tie in arrival order (they are sorted when the run is read). A tie group never
straddles two runs, and every key of a run is below every key of the next. The store gives every
event a timestamp at least the previous one, so a heartbeat is an append to the last run (a new
run once it holds RUN_LEN entries and the key grows). An older timestamp (an imported log, a
clock set back) is inserted in the run that covers it, which splits when it doubles.

Deletion is lazy: `where[slot]` and `off[slot]` say which entry is the slot's live one; any other
entry of that slot is dead. A run counts its live entries and, per type, capability, region and
status, how many of them carry it (what `skip_walk` skips whole segments by). A run with more
dead entries than live ones is compacted (its live entries only), merged into the previous run
when it ends up small; a run with no live entry is dropped.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate, chain, compress, count, repeat
from operator import and_, attrgetter, eq, is_, itemgetter, not_
from typing import TYPE_CHECKING, Any

from projections.bitmaps import Bitmap, bm_add, bm_discard, from_flags, slots_of, walk
from projections.token_counts import (
    KIND,
    Counts,
    Token,
    count_node,
    count_slots,
    count_tokens,
    new_counts,
)

if TYPE_CHECKING:
    from projections.nodes import Node

_heartbeat = attrgetter("last_heartbeat_at")

RUN_LEN = 1024  # entries per run of the log (more only while a tie group goes on)
COUNT_STEP = 4096  # entries whose tokens a slice of `count_step` counts


class Run:
    """A block of the log; see the module."""

    __slots__ = ("ts", "sl", "live", "counts", "_pairs", "_desc")

    def __init__(self, ts: array[float], sl: array[int], live: int, counts: Counts | None) -> None:
        self.ts = ts
        self.sl = sl
        self.live = live
        self.counts = counts
        self._pairs: list[tuple[float, int]] | None = None
        self._desc: list[tuple[float, int]] | None = None

    @property
    def maxkey(self) -> float:
        return self.ts[-1]

    def changed(self) -> None:
        self._pairs = self._desc = None

    def pairs(self, where: list[Any], off: array[int]) -> list[tuple[float, int]]:
        """The live (key, slot) entries, sorted."""
        if self._pairs is None:
            self._pairs = sorted(
                (t, x)
                for i, (t, x) in enumerate(zip(self.ts, self.sl, strict=True))
                if where[x] is self and off[x] == i
            )
        return self._pairs


class Zero:
    """The nodes keyed 0.0, in slot order."""

    __slots__ = ("bits", "live", "counts")
    maxkey = 0.0

    def __init__(self) -> None:
        self.bits: dict[int, int] = {}
        self.live = 0
        self.counts = new_counts()

    def slots(self, lo: int, hi: int) -> Iterator[int]:
        """The slots at ranks [lo, hi), cut from one block at a time (walks stop early)."""
        for b, x in sorted(self.bits.items()):
            if hi <= 0:
                return
            c = x.bit_count()
            if lo < c:
                yield from slots_of([(b, x)], lo, min(c, hi) - lo)
                lo = c
            lo -= c
            hi -= c


Segment = Run | Zero


class HeartbeatOrder:
    """Live slots by (last heartbeat or 0.0, slot): see the module. Positions are ranks among
    the live entries, as in `node_index.SortedSlots`, whose query interface this shares."""

    def __init__(self, nodes: list[Node | None]) -> None:
        self.nodes = nodes
        self.where: list[Segment | None] = []
        self.off: array[int] = array("q")
        self.neg: list[Run] = []
        self.pos: list[Run] = []
        self.zero = Zero()
        self.size = 0
        self.uncounted = 0  # runs whose token counts are still to be made (after a load)
        self._layout: tuple[list[Segment], list[int]] | None = None

    def key(self, s: int) -> float:
        return self.nodes[s].last_heartbeat_at or 0.0  # type: ignore[union-attr]

    def _grow(self, s: int) -> None:
        n = s + 1 - len(self.where)
        if n > 0:
            self.where.extend([None] * n)
            self.off.extend(array("q", bytes(8 * n)))

    # --- changes ---

    def insert(self, s: int) -> None:
        """Add slot `s` with its node's current key."""
        self._grow(s)
        node = self.nodes[s]
        assert node is not None
        self._put(s, node, node.last_heartbeat_at or 0.0)

    def remove(self, s: int) -> None:
        """Drop slot `s` (before its node's tokens change)."""
        node = self.nodes[s]
        assert node is not None
        self._take(s, node)

    def move(self, node: Node, at: float) -> None:
        """`node` had a heartbeat at `at` (call before `node.last_heartbeat_at` changes)."""
        s = node.slot
        seg = self.where[s]
        if seg is not None:
            if type(seg) is Run and at > 0.0 and self.pos:
                L = self.pos
                last = L[-1]
                top = last.ts[-1]
                if at >= top and (at == top or len(last.sl) < RUN_LEN) and last is not seg:
                    # The common case, inline: from an older run to the end of the last one.
                    self._kill(seg, s, node)
                    sl = last.sl
                    self.off[s] = len(sl)
                    last.ts.append(at)
                    sl.append(s)
                    self.where[s] = last
                    last.live += 1
                    if last.counts is not None:
                        count_node(last.counts, node, 1)
                    last._pairs = last._desc = None
                    self.size += 1
                    return
            self._take(s, node)
        self._put(s, node, at or 0.0)

    def retoken(self, s: int, old: Iterable[Token], new: Iterable[Token]) -> None:
        seg = self.where[s]
        if seg is not None and seg.counts is not None:
            count_tokens(seg.counts, old, -1)
            count_tokens(seg.counts, new, 1)

    def _put(self, s: int, node: Node, k: float) -> None:
        self.size += 1
        if k == 0.0:
            z = self.zero
            bm_add(z.bits, s)
            z.live += 1
            count_node(z.counts, node, 1)
            self.where[s] = z
            self._layout = None
            return
        L = self.pos if k > 0.0 else self.neg
        if not L or k > L[-1].ts[-1]:
            if not L or len(L[-1].sl) >= RUN_LEN:
                L.append(Run(array("d"), array("q"), 0, new_counts()))
            run = L[-1]
            j = len(run.sl)
        elif k == L[-1].ts[-1]:
            run = L[-1]
            j = len(run.sl)
        else:
            run = L[bisect_left(L, k, key=lambda r: r.ts[-1])]
            j = bisect_right(run.ts, k)
        if j == len(run.sl):
            run.ts.append(k)
            run.sl.append(s)
        else:  # out of order: the live entries after `j` move up by one
            where, off = self.where, self.off
            moved = [x for i, x in enumerate(run.sl[j:], j) if where[x] is run and off[x] == i]
            run.ts.insert(j, k)
            run.sl.insert(j, s)
            for x in moved:
                off[x] += 1
        self.where[s] = run
        self.off[s] = j
        run.live += 1
        if run.counts is not None:
            count_node(run.counts, node, 1)
        run.changed()
        self._layout = None
        if len(run.sl) > 2 * RUN_LEN:
            self._split(L, run)

    def _take(self, s: int, node: Node) -> None:
        seg = self.where[s]
        if seg is None:
            return
        if type(seg) is Zero:
            bm_discard(seg.bits, s)
            seg.live -= 1
            count_node(seg.counts, node, -1)
            self.size -= 1
            self._layout = None
        else:
            self._kill(seg, s, node)  # type: ignore[arg-type]
        self.where[s] = None

    def _kill(self, run: Run, s: int, node: Node) -> None:
        """The entry of `s` in `run` is dead from now on."""
        self.size -= 1
        self._layout = None
        run.live -= 1
        if run.counts is not None:
            count_node(run.counts, node, -1)
        run._pairs = run._desc = None
        if run.live * 2 >= len(run.sl):
            return
        L = self.pos if run.ts[0] > 0.0 else self.neg
        if not run.live:
            L.remove(run)
            self.uncounted -= run.counts is None
            return
        where, off = self.where, self.off
        self.where[s] = None  # so that the compaction drops it
        keep = [i for i, x in enumerate(run.sl) if where[x] is run and off[x] == i]
        run.ts = array("d", [run.ts[i] for i in keep])
        run.sl = array("q", [run.sl[i] for i in keep])
        for i, x in enumerate(run.sl):
            off[x] = i
        if len(run.sl) * 2 <= RUN_LEN:
            i = L.index(run)
            if i and len(L[i - 1].sl) + len(run.sl) <= RUN_LEN:
                prev = L[i - 1]
                base = len(prev.sl)
                prev.ts.extend(run.ts)
                prev.sl.extend(run.sl)
                for j, x in enumerate(run.sl, base):
                    where[x] = prev
                    off[x] = j
                prev.live += run.live
                if prev.counts is None or run.counts is None:
                    self.uncounted += 1 - (prev.counts is None) - (run.counts is None)
                    prev.counts = None
                else:
                    for mine, theirs in zip(prev.counts, run.counts, strict=True):
                        for v, c in theirs.items():
                            mine[v] = mine.get(v, 0) + c
                prev.changed()
                del L[i]

    def _split(self, L: list[Run], run: Run) -> None:
        """Cut `run` in two at the tie boundary nearest its middle (if it has one)."""
        ts, half = run.ts, len(run.sl) // 2
        m = bisect_left(ts, ts[half])
        if m == 0:
            m = bisect_right(ts, ts[half])
            if m == len(ts):
                return
        where, off = self.where, self.off
        live = [
            (t, x)
            for i, (t, x) in enumerate(zip(ts, run.sl, strict=True))
            if where[x] is run and off[x] == i
        ]
        cut = bisect_left(live, (ts[m], -1))
        parts: list[Run] = []
        for entries in (live[:cut], live[cut:]):
            sl = array("q", [x for _, x in entries])
            part = Run(
                array("d", [t for t, _ in entries]), sl, len(sl), count_slots(self.nodes, sl)
            )
            parts.append(part)
            for i, x in enumerate(sl):
                where[x] = part
                off[x] = i
        i = L.index(run)
        L[i : i + 1] = [p for p in parts if p.live]
        self.uncounted -= run.counts is None
        self._layout = None

    def load(
        self, slots: Iterable[int], counts_of: Callable[[Bitmap], Counts] | None = None
    ) -> None:
        """Replace the content with `slots` (ascending): the nodes without a heartbeat set as
        one bitmap, the others sorted once with a C key and cut into runs. `counts_of`, when
        given, counts the zero group's tokens from its bitmap (else from its nodes)."""
        nodes = self.nodes
        self.__init__(nodes)  # type: ignore[misc]
        # Every slot (no hole): the positions are the slots, no gather through them.
        every = slots == range(len(nodes))
        live: Sequence[int] = slots if every else list(slots)  # type: ignore[assignment]
        if live:
            self._grow(live[-1])
        of = nodes if every else map(nodes.__getitem__, live)
        keys = [k or 0.0 for k in map(_heartbeat, of)]
        where, off = self.where, self.off
        z = self.zero
        if every:  # one flag a slot in one C pass; the slots with a heartbeat get their runs
            flags: bytes | bytearray = bytes(map(not_, keys))
            where[:] = [z] * len(where)
        else:
            flags = bytearray(len(where))
            deque(map(flags.__setitem__, compress(live, map(not_, keys)), repeat(1)), maxlen=0)
            deque(map(where.__setitem__, compress(live, map(not_, keys)), repeat(z)), maxlen=0)
        z.bits = from_flags(flags)
        z.live = flags.count(1)
        if counts_of is not None:
            z.counts = counts_of(z.bits)
        else:
            z.counts = count_slots(nodes, compress(range(len(flags)), flags))
        # Only the nodes with a heartbeat are sorted (none in a registry that never had one).
        order = sorted(compress(range(len(keys)), keys), key=keys.__getitem__)  # ties by slot
        ordered_keys = list(map(keys.__getitem__, order))
        ordered = order if every else list(map(live.__getitem__, order))
        cut = bisect_left(ordered_keys, 0.0)
        for L, a, b in ((self.neg, 0, cut), (self.pos, cut, len(ordered))):
            while a < b:
                end = min(b, a + RUN_LEN)
                if end < b:
                    end = bisect_right(ordered_keys, ordered_keys[end - 1], end, b)
                sl = array("q", ordered[a:end])
                run = Run(array("d", ordered_keys[a:end]), sl, len(sl), None)  # see count_step
                deque(map(where.__setitem__, sl, repeat(run)), maxlen=0)
                deque(map(off.__setitem__, sl, range(len(sl))), maxlen=0)
                L.append(run)
                a = end
        self.size = len(live)
        self.uncounted = len(self.neg) + len(self.pos)

    def count_step(self) -> bool:
        """Count the tokens of runs a load left uncounted, about COUNT_STEP entries' worth (their
        nodes, in heartbeat order, lie scattered in memory: ~1 µs an entry, so a load leaves it
        to slices); False once every run is counted."""
        done = 0
        for run in chain(self.neg, self.pos):
            if done >= COUNT_STEP:
                break
            if run.counts is None:
                live = [x for _, x in run.pairs(self.where, self.off)]
                run.counts = count_slots(self.nodes, live)
                self.uncounted -= 1
                done += len(live)
        return self.uncounted > 0

    # --- queries (positions are ranks among the live entries) ---

    def layout(self) -> tuple[list[Segment], list[int]]:
        """The segments in key order and the rank of each one's first entry (and the size)."""
        if self._layout is None:
            segs: list[Segment] = [*self.neg, self.zero, *self.pos]
            self._layout = segs, list(accumulate((g.live for g in segs), initial=0))
        return self._layout

    def _asc(self, g: Segment, lo: int, hi: int) -> Iterator[int]:
        if type(g) is Zero:
            return g.slots(lo, hi)
        return map(itemgetter(1), g.pairs(self.where, self.off)[lo:hi])  # type: ignore[union-attr]

    def _desc(self, g: Segment, lo: int, hi: int, skip: int) -> Iterator[int]:
        """Ranks [lo, hi) of `g` (whole tie groups) by key descending, slots ascending in a tie,
        less the first `skip`."""
        if type(g) is Zero:  # one tie group
            return g.slots(lo + skip, hi)
        pairs = g.pairs(self.where, self.off)  # type: ignore[union-attr]
        if lo == 0 and hi == len(pairs):
            if g._desc is None:  # type: ignore[union-attr]
                g._desc = sorted(pairs, key=itemgetter(0), reverse=True)  # type: ignore[union-attr]
            part = g._desc  # type: ignore[union-attr]
        else:
            part = sorted(pairs[lo:hi], key=itemgetter(0), reverse=True)
        return map(itemgetter(1), part[skip:] if skip else part)

    def bitmap_of(self, lo: int, hi: int) -> Bitmap:
        """The bitmap of the slots at positions [lo, hi), less the nodes without a heartbeat:
        a slice of a presence window, built in C loops (a flag per slot, read in blocks)."""
        segs, starts = self.layout()
        i = bisect_right(starts, lo) - 1
        flags = bytearray(len(self.where))
        mark = flags.__setitem__
        where, off, nodes = self.where, self.off, self.nodes
        while lo < hi and i < len(segs):
            g, a, end = segs[i], starts[i], min(hi, starts[i + 1])
            if type(g) is Zero:
                for s in g.slots(lo - a, end - a):
                    if nodes[s].last_heartbeat_at is not None:  # type: ignore[union-attr]
                        flags[s] = 1
            elif lo > a or end < starts[i + 1]:
                for _, s in g.pairs(where, off)[lo - a : end - a]:  # type: ignore[union-attr]
                    flags[s] = 1
            else:
                sl = g.sl  # type: ignore[union-attr]
                here = map(is_, map(where.__getitem__, sl), repeat(g))
                current = map(eq, map(off.__getitem__, sl), count())
                deque(map(mark, compress(sl, map(and_, here, current)), repeat(1)), maxlen=0)
            lo = end
            i += 1
        return from_flags(flags)

    def first_true(self, pred: Callable[[float], bool]) -> int:
        """The first position whose key satisfies `pred`, monotone (False then True) in key."""
        segs, starts = self.layout()
        i = bisect_left(segs, True, key=lambda g: pred(g.maxkey))
        if i == len(segs):
            return self.size
        g = segs[i]
        if type(g) is Zero:
            return starts[i]
        pairs = g.pairs(self.where, self.off)  # type: ignore[union-attr]
        return starts[i] + bisect_left(pairs, True, key=lambda p: pred(p[0]))

    def ascending(self, lo: int, hi: int) -> Iterator[int]:
        """The slots at positions [lo, hi)."""
        segs, starts = self.layout()
        i = bisect_right(starts, lo) - 1
        while lo < hi and i < len(segs):
            end = min(hi, starts[i + 1])
            yield from self._asc(segs[i], lo - starts[i], end - starts[i])
            lo = end
            i += 1

    def descending_from(self, skip: int, lo: int, hi: int) -> Iterator[int]:
        """Positions [lo, hi) (tie group boundaries) by key descending, slots ascending among
        equal keys (a stable sort with reverse=True), without the first `skip`."""
        segs, starts = self.layout()
        i = bisect_right(starts, hi - 1) - 1
        while hi > lo and i >= 0:
            a = max(lo, starts[i])
            if skip >= hi - a:
                skip -= hi - a
            else:
                yield from self._desc(segs[i], a - starts[i], hi - starts[i], skip)
                skip = 0
            hi = a
            i -= 1

    def descending(self, lo: int, hi: int) -> Iterator[int]:
        return self.descending_from(0, lo, hi)

    def skip_walk(
        self, token: Token, matches: dict[int, int], skip: int, limit: int, descending: bool
    ) -> list[int]:
        """`walk` over the whole order when the matches are the entries with `token`: whole
        segments are skipped by their counts."""
        if self.uncounted:  # not all counted yet: walk the whole order
            it = self.descending(0, self.size) if descending else self.ascending(0, self.size)
            return walk(it, matches, skip, limit)
        segs, starts = self.layout()
        kind, value = KIND[token[0]], token[1]
        if not descending:
            for i, g in enumerate(segs):
                c = g.counts[kind].get(value, 0)  # type: ignore[index]
                if skip < c:
                    return walk(self.ascending(starts[i], self.size), matches, skip, limit)
                skip -= c
            return []
        i = len(segs)
        while i > 0 and (c := segs[i - 1].counts[kind].get(value, 0)) <= skip:  # type: ignore[index]
            skip -= c
            i -= 1
        return walk(self.descending(0, starts[i]), matches, skip, limit)
