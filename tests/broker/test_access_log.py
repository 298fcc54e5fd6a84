"""Access logs answer "who" (issue 20): the client's address (X-Forwarded-For only when trusted),
the principal (node, user or API key), the user agent, status, bytes, duration, traceparent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import LimitsConfig
from broker.http import middleware
from tests.broker.identity.helpers import bearer, operator_token
from tests.conftest import make_config


class Recorder:
    """Stands in for the middleware's logger: keeps what it logs (whatever structlog's global
    configuration, which other tests change)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []

    def info(self, event: str, **fields: object) -> None:
        self.entries.append({"event": event, **fields})

    def is_enabled_for(self, level: int) -> bool:  # the middleware builds its entry only if so
        return True

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self.info


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(middleware, "log", recorder)
    return recorder


TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def requests_logged(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "request"]


async def test_access_log_says_who(tmp_path: Path, logs: Recorder) -> None:
    config = make_config(tmp_path)
    config.limits = LimitsConfig(trust_forwarded_for=True)
    async with TestClient(TestServer(create_app(config))) as client:
        token = await operator_token(client, "alice", ["admin"])
        resp = await client.post(
            "/api/v1/admin/api-keys",
            json={"name": "k", "scopes": ["nodes:read"]},
            headers=bearer(token),
        )
        key = await resp.json()
        headers = {
            "X-API-Key": key["key"],
            "User-Agent": "probe/1.0",
            "traceparent": TRACE,
            "X-Forwarded-For": "192.0.2.1, 203.0.113.7",
        }
        logs.entries.clear()
        resp = await client.get("/api/v1/nodes", headers=headers)
        body = await resp.read()
        await client.get("/auth/me", headers={**bearer(token), "traceparent": "junk"})
        await client.get("/health")
        by_key, by_token, anonymous = requests_logged(logs.entries)
    assert by_key["principal"] == f"key:{key['id']}" and by_key["status"] == 200
    assert by_key["client"] == "203.0.113.7" and by_key["user_agent"] == "probe/1.0"
    assert by_key["traceparent"] == TRACE and by_key["bytes"] == len(body)
    assert isinstance(by_key["ms"], float)
    assert str(by_token["principal"]).startswith("user:usr_") and "traceparent" not in by_token
    assert anonymous["principal"] is None and anonymous["client"] == "127.0.0.1"


async def test_forwarded_for_is_ignored_unless_trusted(
    client: TestClient,  # type: ignore[type-arg]
    logs: Recorder,
) -> None:
    await client.get("/health", headers={"X-Forwarded-For": "203.0.113.7"})
    [entry] = requests_logged(logs.entries)
    assert entry["client"] == "127.0.0.1"
