"""A log's history written by hand: events with the times they happened, as envelopes ready for
`store.restore` or `broker import` (seqs from 1, stream versions in order)."""

from __future__ import annotations

from eventstore.base import Envelope
from eventstore.events import BaseEvent


def envelopes(items: list[tuple[float, BaseEvent]]) -> list[Envelope]:
    versions: dict[str, int] = {}
    out = []
    for seq, (ts, event) in enumerate(items, 1):
        versions[event.stream] = versions.get(event.stream, 0) + 1
        out.append(Envelope(seq, event.stream, versions[event.stream], ts, f"{seq:032x}", event))
    return out
