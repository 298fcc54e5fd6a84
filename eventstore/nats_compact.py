"""Compaction of the NATS log: purge the removable subjects up to what the newest snapshot covers.

Removable events (`nats_wire.REMOVABLE`: heartbeats, telemetry, connections) are published in
chunks of their own, on a subject per type (`<prefix>.=node:heartbeat`, ...), so JetStream removes
them without touching anything else: `purge` with that subject as filter and a stream sequence
(everything before it). What keeps every instance's seqs equal is the log index
(eventstore.nats_index): it records each batch's class, and the `log.compacted` event, folded by
every instance, says below which stream message each class is removed (`purged`). A purge never
goes past the stream message of the snapshot taken first, so an instance joining after it starts
from that snapshot's index (or a newer one), which has already counted every purged event; it
never needs a purged message. The steps, in order (broker.upkeep.compaction):

1. a snapshot is taken and stored in the bucket (acknowledged by the bucket's replicas);
2. `plan` picks, per type, the bound: the older of the snapshot's stream message and the first
   message newer than the type's retention; the `log.compacted` event recording the bounds is
   appended (acknowledged by the stream's replicas, applied here);
3. `purge` asks JetStream to purge each type's subject below its bound.

A crash between 1 and 2 purged nothing; between 2 and 3, the record says what is removed (reads
already pass over those batches, whether purged yet or not) and `finish`, run first by the next
compaction, purges it: a purge up to a sequence is idempotent. An instance that finds messages
gone without an index covering them refuses the stream (`LogIndex.apply`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from eventstore.base import StoreUnavailable
from eventstore.nats_index import LogIndex
from eventstore.nats_wire import REMOVABLE, class_of_type, removable_subject


@dataclass
class TypePlan:
    """What a compaction removes of one removable type."""

    event_type: str
    bound: int  # its subject's messages before this stream seq go
    events: int = 0  # events removed now (not by an earlier compaction)
    messages: int = 0  # batches removed now
    first: int = 0  # their first and last event seqs
    last: int = 0


@dataclass
class Plan:
    up_to: int  # the snapshot's event seq
    up_to_sseq: int  # the stream message holding it: no bound goes past it
    types: list[TypePlan] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(t.events for t in self.types)


def plan(index: LogIndex, up_to: int, cutoffs: Mapping[str, float]) -> Plan:
    """The bounds and counts of a compaction of `index` up to event seq `up_to` (a snapshot's),
    removing the removable types of `cutoffs` stored before their time. Blocking (it walks the
    batches since the previous bounds): run it in a thread, on arrays that only grow."""
    if up_to < 1 or up_to > index.head or not len(index):
        return Plan(up_to, 0)
    cut_sseq = index.entry(index.position(up_to))[0]
    out = Plan(up_to, cut_sseq)
    n = len(index)
    plans: dict[int, TypePlan] = {}
    for event_type, before in cutoffs.items():
        klass = class_of_type(event_type)
        if not klass:
            continue
        j = index.batch_at_time(before, n)
        bound = min(cut_sseq, index.entry(j)[0] if j < n else cut_sseq)
        if bound > index.purged.get(klass, 0):
            plans[klass] = TypePlan(event_type, bound)
    if not plans:
        return out
    low = min(index.purged.get(k, 0) for k in plans)
    high = max(p.bound for p in plans.values())
    lo, hi = index.batch_of_message(low, n), index.batch_of_message(high, n)
    for i in range(lo, hi):
        klass = index.klass(i)
        p = plans.get(klass)
        if p is None:
            continue
        sseq = index.entry(i)[0]
        if index.purged.get(klass, 0) <= sseq < p.bound:
            count = index.events_in(i)
            first = index.entry(i)[2]
            p.events += count
            p.messages += 1
            p.first = p.first or first
            p.last = first + count - 1
    out.types = [plans[k] for k in sorted(plans)]
    return out


class Compacting:
    """A NatsStore's side of a compaction (see the module doc); broker.upkeep.compaction drives
    it. A mixin of `NatsStore`, which owns the connection."""

    stream: str
    prefix: str
    _js: Any
    _index: LogIndex

    async def compaction_plan(self, up_to: int, cutoffs: Mapping[str, float]) -> Plan:
        """`plan` on this instance's index (in a thread: it walks batches)."""
        return await asyncio.to_thread(plan, self._index, up_to, cutoffs)

    def purge_bounds(self) -> dict[int, int]:
        """The bounds the `log.compacted` events folded so far recorded, by class."""
        return dict(self._index.purged)

    async def purge(self, bounds: Mapping[int, int]) -> int:
        """Purge each removable class's subject below its bound; the messages purged."""
        total = 0
        for klass, bound in sorted(bounds.items()):
            subject = removable_subject(self.prefix, klass)
            # the request `purge_stream` sends, for the count it drops
            request = msgspec.json.encode({"filter": subject, "seq": bound})
            try:
                resp = await self._js._api_request(
                    f"{self._js._prefix}.STREAM.PURGE.{self.stream}", request, timeout=30.0
                )
            except Exception as exc:
                raise StoreUnavailable(f"NATS refused the purge of {subject}: {exc}") from None
            total += int(resp.get("purged", 0))
        return total

    async def finish_purges(self) -> int:
        """Purge what the recorded compactions removed (one interrupted after its record):
        idempotent."""
        return await self.purge(self.purge_bounds())

    async def last_compaction(self) -> int | None:
        """The seq of the newest `log.compacted` event, if any."""
        return self._index.last_compaction or None

    async def stream_size(self) -> tuple[bool, int, int]:
        """(whether the stream allows purges, its messages, its bytes)."""
        try:
            async with asyncio.timeout(5.0):
                info = await self._js.stream_info(self.stream)
        except Exception as exc:
            raise StoreUnavailable(f"NATS stream info unavailable: {exc}") from None
        return not info.config.deny_purge, info.state.messages, info.state.bytes


__all__ = ["REMOVABLE", "Compacting", "Plan", "TypePlan", "plan"]
