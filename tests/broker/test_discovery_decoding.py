"""After a start from a snapshot the nodes stay packed until touched (projections.node_record);
a query that reads every node's key (a sort by id, name or load, a prefix search) has them
decoded by `NodeService.decoded` a slice per turn of the loop, not all in its own one step."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from broker.services.nodes import NodeService
from eventstore.events import NodeRegistered
from projections import index_snapshot
from tests.projections.test_node_index import fold, through_snapshot


def service_on(projection: object) -> NodeService:
    service = NodeService.__new__(NodeService)
    service._runtime = SimpleNamespace(nodes=projection)  # type: ignore[assignment]
    return service


async def test_a_sort_by_a_decoded_key_decodes_the_packed_nodes_in_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered = [
        (float(i), NodeRegistered(node_id=f"n{i}", name=f"N{i}", node_type="t", public_key="k"))
        for i in range(10)
    ]
    restored = through_snapshot(fold(registered))  # type: ignore[arg-type]
    index = restored.index
    assert index.packed == 10
    monkeypatch.setattr(index_snapshot, "UNPACK_STEP", 3)
    service = service_on(restored)

    await service.decoded("registered_at")  # the slots' order: nothing to decode
    assert index.packed == 10

    seen: list[int] = []  # what another task sees between the decoding's turns

    async def watch() -> None:
        while index.packed:
            seen.append(index.packed)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await service.decoded("name")
    await watcher
    assert index.packed == 0
    assert any(0 < n < 10 for n in seen)  # the loop ran other work while it decoded
