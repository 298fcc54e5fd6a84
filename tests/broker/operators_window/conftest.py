"""Fixtures for the operators' window: the app on a real socket with the real token service,
an operator token holding `events:read`, and helpers to fill the log quickly."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from aiohttp.test_utils import TestClient

from broker.keys import RUNTIME
from eventstore.base import Envelope
from eventstore.events import BaseEvent, LogNote, TenantCreated
from tests.broker.identity.helpers import operator_token

Client = TestClient  # type: ignore[type-arg]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def viewer(client: Client) -> str:
    """An operator's access token with the built-in viewer role (events:read)."""
    return await operator_token(client, "watcher", ["viewer"])


def note(i: int, stream: str = "") -> BaseEvent:
    return LogNote(stream_id=stream or f"s{i % 3}", text=f"n{i}", data={"i": i})


def mixed(i: int) -> BaseEvent:
    """Every fifth event a tenant.created (stream t<i>), the others system.note on s0..s2."""
    if i % 5 == 0:
        return TenantCreated(tenant_id=f"t{i}", name=f"Tenant {i}")
    return note(i)


async def append(client: Client, events: Sequence[BaseEvent]) -> list[Envelope]:
    return await client.app[RUNTIME].store.append(list(events))
