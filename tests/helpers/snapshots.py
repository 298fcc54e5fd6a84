"""Snapshot tests' shared steps: a started app's state and what start-up did."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config
from broker.keys import RUNTIME, SNAPSHOTS
from broker.upkeep.snapshots import WINDOW
from eventstore.events import BaseEvent
from projections.base import Projections


def state(projections: Projections) -> dict[str, Any]:
    return {name: part.state() for name, part in projections.parts.items()}


async def run_app(config: Config, events: list[BaseEvent] | None = None) -> dict[str, Any]:
    """Start the app, append `events`, stop it; what start-up did and the final state."""
    app = create_app(config)
    async with TestClient(TestServer(app)) as client:
        runtime = client.app[RUNTIME]
        boot = client.app[SNAPSHOTS].boot
        at_start = state(runtime.projections)
        for i in range(0, len(events or []), 50):
            await runtime.record((events or [])[i : i + 50])
        await client.app[SNAPSHOTS].wait()
        head = await runtime.store.head()
        final = state(runtime.projections)
        windows = {n: set(w) for n, w in client.app[SNAPSHOTS].windows.items()}
        types = {
            n: {cls.type_name() for cls in part.handlers()}
            for n, part in runtime.projections.parts.items()
        }
        exact = {
            n: {env.seq // WINDOW async for env in runtime.store.read(1, types=t)}
            for n, t in types.items()
        }
    return {
        "boot": boot,
        "head": head,
        "at_start": at_start,
        "final": final,
        "windows": windows,
        "exact": exact,
    }
