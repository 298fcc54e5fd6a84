"""Schemathesis against /api/openapi.json: generated requests (valid and invalid) to every
documented operation, with an operator token, must never get a 5xx.

The app is served on a real socket by a thread with its own event loop; the number of examples
per operation is bounded (`FUZZ_EXAMPLES`) so the run takes well under a minute.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from broker import operators
from broker.app import create_app
from broker.config import LimitsConfig
from broker.keys import RUNTIME
from tests.conftest import make_config

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
PASSWORD = "fuzzing-password"
# Operations left out, and why: the feeds never end by design (tested in test_feed.py); logout
# would end the fuzzer's own session.
SKIP = {("GET", "/ws"), ("GET", "/api/v1/events/stream"), ("POST", "/auth/logout")}
# 5xx found by this test in other areas, reported and awaiting a fix (remove when fixed): a
# multipart part with an invalid header raises aiohttp's HttpProcessingError (InvalidHeader),
# which broker.middleware does not translate to a 400.
KNOWN_5XX: tuple[str, ...] = ()


class Served:
    """An app served by a background thread's event loop."""

    def __init__(self, data: Path) -> None:
        config = make_config(data)
        config.limits = LimitsConfig(enabled=False)
        self.app = create_app(config)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = self.runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        self.loop.run_until_complete(
            operators.create_user(
                self.app[RUNTIME], username="fuzzer", password=PASSWORD, roles=["admin"]
            )
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        async def cleanup() -> None:
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("fuzz"))
    try:
        yield s
    finally:
        s.stop()


def test_no_server_errors(served: Served) -> None:
    login = requests.post(
        served.base + "/auth/login", data={"username": "fuzzer", "password": PASSWORD}, timeout=30
    )
    assert login.status_code == 200, login.text
    headers = {"Authorization": "Bearer " + login.json()["access_token"]}
    schema = schemathesis.openapi.from_url(served.base + "/api/openapi.json")
    failures: list[str] = []
    operations = 0
    session = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in SKIP:
            continue
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(mode))
            def run(case: Any) -> None:
                resp = case.call(base_url=served.base, session=session, headers=headers, timeout=30)
                try:
                    case.validate_response(resp, checks=[not_a_server_error])
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                    failures.append(f"{case.method} {case.formatted_path}: {exc}"[:3000])

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (e.g. no parameters at all)
                assert mode is GenerationMode.NEGATIVE, op.path
    assert operations > 40
    unknown = [f for f in failures if not f.startswith(KNOWN_5XX)]
    assert not unknown, "\n\n".join(unknown[:10])
    if failures:
        pytest.xfail(f"known 5xx, reported to their owners: {failures[0][:500]}")
