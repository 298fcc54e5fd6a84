"""Token counts: how many entries of a block carry each type, capability, region and status,
so that a page under one filter skips whole blocks of a sorted order (`skip_walk`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from operator import attrgetter, methodcaller
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from projections.nodes import Node

Token = tuple[str, str]  # ("type" | "capability" | "region" | "status", value)
Counts = tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]
KIND = {"type": 0, "capability": 1, "region": 2, "status": 3}


def new_counts() -> Counts:
    return {}, {}, {}, {}


def count_node(counts: Counts, node: Node, delta: int) -> None:
    """Add `delta` to the counts of every token of `node`."""
    types, caps, regions, statuses = counts
    v: Any = node.type
    types[v] = types.get(v, 0) + delta
    for v in node.capabilities:
        caps[v] = caps.get(v, 0) + delta
    v = node.metadata.get("region")
    if type(v) is str:
        regions[v] = regions.get(v, 0) + delta
    v = node.status
    statuses[v] = statuses.get(v, 0) + delta


def count_tokens(counts: Counts, tokens: Iterable[Token], delta: int) -> None:
    for kind, value in tokens:
        c = counts[KIND[kind]]
        c[value] = c.get(value, 0) + delta


def count_slots(nodes: Sequence[Node | None], slots: Iterable[int]) -> Counts:
    """The counts of the tokens of `slots`, in C loops."""
    of = list(map(nodes.__getitem__, slots))
    try:
        by_region = Counter(map(_region, map(_metadata, of)))
    except TypeError:  # a region that is not hashable (a list, an object): not a region
        by_region = Counter(r for r in map(_region, map(_metadata, of)) if type(r) is str)
    return (
        dict(Counter(map(_type, of))),
        dict(Counter(chain.from_iterable(map(_capabilities, of)))),
        {r: c for r, c in by_region.items() if type(r) is str},
        dict(Counter(map(_status, of))),
    )


def count_bitmap(groups: Sequence[dict[str, dict[int, int]]], bm: dict[int, int]) -> Counts:
    """The counts of the nodes of bitmap `bm`, from the bitmaps of each type, capability,
    region and status (`groups`, in that order): an AND and a popcount a block."""
    out = new_counts()
    for counts, group in zip(out, groups, strict=True):
        for key, bits in group.items():
            n = sum((x & bm.get(b, 0)).bit_count() for b, x in bits.items())
            if n:
                counts[key] = n
    return out


_type, _capabilities, _status = attrgetter("type"), attrgetter("capabilities"), attrgetter("status")
_metadata, _region = attrgetter("metadata"), methodcaller("get", "region")
