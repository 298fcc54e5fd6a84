"""Bitmaps over slots, cut in blocks of `BLOCK` slots, each block a Python int (`Bitmap`: block
number -> bits, absent when empty), and the operations the discovery indices use on them."""

from __future__ import annotations

from collections.abc import Iterable

SHIFT = 12
BLOCK = 1 << SHIFT
MASK = BLOCK - 1

Bitmap = dict[int, int]  # block number -> bits of the slots of that block (never 0)
Blocks = list[tuple[int, int]]  # (block number, bits), ascending, bits != 0

_DIGITS = bytes.maketrans(b"\x00\x01", b"01")


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


def walk(slots: Iterable[int], matches: Bitmap, skip: int, limit: int) -> list[int]:
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


def from_flags(flags: bytes | bytearray) -> Bitmap:
    """The bitmap of the slots whose flag (one byte a slot, 0 or 1) is 1: read a block at a
    time in C loops."""
    out: Bitmap = {}
    for b in range(0, (len(flags) + BLOCK - 1) // BLOCK):
        part = flags[b * BLOCK : (b + 1) * BLOCK]
        if part.count(1):
            out[b] = int(part[::-1].translate(_DIGITS), 2)
    return out
