"""Replay determinism: state built live, one append at a time, equals state rebuilt from the log."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.runtime import Runtime, build_projections
from eventstore.events import BaseEvent
from eventstore.memory import MemoryStore
from projections.base import Projections
from tests.helpers.events import event_strategy


def state(projections: Projections) -> dict[str, Any]:
    return {name: part.state() for name, part in projections.parts.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(event_strategy(), min_size=1, max_size=4), max_size=25))
def test_live_equals_replayed(batches: list[list[BaseEvent]]) -> None:
    async def scenario() -> None:
        store = MemoryStore()
        await store.open()
        runtime = Runtime(store)
        await runtime.start()
        for batch in batches:
            await runtime.record(batch)
        replayed = build_projections()
        replayed.apply_many([env async for env in store.read()])
        assert replayed.seq == runtime.projections.seq
        assert state(replayed) == state(runtime.projections)
        # Folding in one go equals folding in two halves from a restarted runtime.
        half = replayed.seq // 2
        restarted = build_projections()
        restarted.apply_many([env async for env in store.read(1, half)])
        restarted.apply_many([env async for env in store.read(half + 1)])
        assert state(restarted) == state(replayed)

    asyncio.run(scenario())
