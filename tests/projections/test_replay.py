"""Replay determinism: state built live, one append at a time, equals state rebuilt from the log."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.runtime import Runtime, build_projections
from eventstore.events import EVENT_TYPES, BaseEvent
from eventstore.memory import MemoryStore
from projections.base import Projections

_ids = st.sampled_from(["a", "b", "c", "admin", "operator", "viewer", "role:a", "role:viewer"])


def _for_type(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    if isinstance(t, msgspec.inspect.StrType):
        return _ids
    if isinstance(t, msgspec.inspect.BoolType):
        return st.booleans()
    if isinstance(t, msgspec.inspect.IntType):
        return st.integers(0, 5)
    if isinstance(t, msgspec.inspect.FloatType):
        return st.floats(0, 1e9, allow_nan=False)
    if isinstance(t, msgspec.inspect.NoneType):
        return st.none()
    if isinstance(t, msgspec.inspect.UnionType):
        return st.one_of(*(_for_type(x) for x in t.types))
    if isinstance(t, msgspec.inspect.ListType):
        return st.lists(_for_type(t.item_type), max_size=3)
    if isinstance(t, msgspec.inspect.VarTupleType):
        return st.lists(_for_type(t.item_type), max_size=3).map(tuple)
    if isinstance(t, msgspec.inspect.DictType):
        return st.dictionaries(_ids, _ids, max_size=2)
    if isinstance(t, msgspec.inspect.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, msgspec.inspect.StructType):
        return _struct(t)
    return st.none()


def _struct(info: msgspec.inspect.StructType) -> st.SearchStrategy[Any]:
    fields = {f.name: _for_type(f.type) for f in info.fields}
    return st.fixed_dictionaries(fields).map(lambda kw: info.cls(**kw))


def event_strategy() -> st.SearchStrategy[BaseEvent]:
    infos = [msgspec.inspect.type_info(cls) for cls in EVENT_TYPES.values()]
    return st.one_of(*(_struct(i) for i in infos))  # type: ignore[arg-type]


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
