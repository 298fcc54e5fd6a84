"""Shared fixtures: configs on a temporary data dir, an app on a real socket, blockbuster."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, LogConfig, ServerConfig
from eventstore.base import StoreConfig


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled delivery queue older than its source (``make`` rebuilds it)."""
    from projections import stale_compiled_modules

    if stale := stale_compiled_modules():
        pytest.exit("; ".join(stale))


def _exception_repr(_logger: object, _method: str, event: dict[str, object]) -> dict[str, object]:
    """Tests log exceptions as their repr: formatting a traceback reads source files, which
    blockbuster rightly flags inside the event loop."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        exc = sys.exc_info()[1] if exc_info is True else exc_info
        event["exception"] = repr(exc[1] if isinstance(exc, tuple) else exc)
    return event


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Warnings and errors only, rendered without tracebacks."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _exception_repr,
            structlog.processors.KeyValueRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=False,
    )


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
