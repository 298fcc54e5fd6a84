"""Shared fixtures: configs on a temporary data dir, an app on a real socket, blockbuster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, LogConfig, ServerConfig
from eventstore.base import StoreConfig


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Fail any test whose code makes a blocking call inside the event loop."""
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx(
        scanned_modules=["broker", "eventstore", "projections"],
    ) as bb:
        yield bb  # type: ignore[misc]


def make_config(tmp_path: Path, backend: str = "sqlite", **server: object) -> Config:
    return Config(
        server=ServerConfig(data_dir=str(tmp_path / "data"), **server),  # type: ignore[arg-type]
        store=StoreConfig(backend=backend, path=str(tmp_path / "data" / "events.db")),
        log=LogConfig(level="warning"),
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def client(config: Config) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    """The app served on a real loopback socket, with the embedded SQLite log."""
    async with TestClient(TestServer(create_app(config))) as c:
        yield c
