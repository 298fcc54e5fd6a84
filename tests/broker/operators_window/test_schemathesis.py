"""Schemathesis against /api/openapi.json: the schema is the contract.

Schemathesis' engine (what `st run` runs) exercises every operation of the document with every
check it has (server errors, status codes, content types, response schemas and headers,
negative data rejected, positive data accepted, auth not ignored, use after free, resources
available, ...) in every phase: explicit examples, coverage of boundaries and invalid values,
fuzzing, and stateful sequences along the links it infers. Requests carry an admin operator's
token, or a node's on the routes only nodes may call, so operations are exercised past the 401s.
`NOT_APPLICABLE` lists, per operation, the few checks that cannot hold there and why.

The app is served on a real socket by a thread with its own event loop; the examples per
operation are bounded (`FUZZ_EXAMPLES`), generation is derandomized and the seed fixed, so the
run is the same on every machine and takes well under a minute.
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

from broker.app import create_app
from broker.config import LimitsConfig
from broker.http.auth import Authenticated
from broker.http.routing import route_info
from broker.keys import OPERATORS
from tests.broker.identity.helpers import public_pem, rsa_key, sign
from tests.conftest import make_config

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
SEED = 14_11
PASSWORD = "fuzzing-password"
NODE_ID = "fuzz-node"
# The WebSocket routes answer 101 to an upgrade, which HTTP fuzzing cannot make: their contract is
# asserted by `test_websocket_routes` instead.
WEBSOCKETS = {("GET", "/ws"), ("GET", "/api/v1/ws")}
# The SSE feed never ends by design (tested in test_feed.py).
SKIP = WEBSOCKETS | {("GET", "/api/v1/events/stream")}


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
            self.app[OPERATORS].create_user(username="fuzzer", password=PASSWORD, roles=["admin"])
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

    def node_only(self) -> set[tuple[str, str]]:
        """(method, path) of the routes only a node token may call."""
        out = set()
        for route in self.app.router.routes():
            info = route_info(route.handler)
            if info and isinstance(info.policy, Authenticated) and info.policy.kinds == ("node",):
                out.add((info.method, info.path))
        return out


class Credentials:
    """The bearer headers of an admin operator and of a registered node."""

    def __init__(self, served: Served) -> None:
        self.base = served.base
        self.node_only = served.node_only()
        self.admin = self.operator_login()
        key = rsa_key(0)
        resp = requests.post(
            self.base + "/api/v1/auth/register",
            json={
                "node_id": NODE_ID,
                "name": "Fuzz",
                "type": "gateway",
                "public_key": public_pem(key),
            },
            timeout=30,
        )
        assert resp.status_code == 201, resp.text
        text = requests.post(
            self.base + "/api/v1/auth/login", json={"node_id": NODE_ID}, timeout=30
        ).json()["challenge"]
        resp = requests.post(
            self.base + "/api/v1/auth/verify",
            json={"node_id": NODE_ID, "challenge": text, "signature": sign(key, text)},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        self.node = {"Authorization": "Bearer " + resp.json()["access_token"]}

    def operator_login(self) -> dict[str, str]:
        resp = requests.post(
            self.base + "/auth/login",
            data={"username": "fuzzer", "password": PASSWORD},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        return {"Authorization": "Bearer " + resp.json()["access_token"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("fuzz"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def credentials(served: Served) -> Credentials:
    return Credentials(served)


# Checks that cannot hold for one operation, each with its reason; every other check runs on every
# operation. positive_data_acceptance expects any schema-valid request to be accepted, which these
# cannot do: their input must meet a condition JSON Schema cannot state, or name things that exist.
NOT_APPLICABLE: dict[str, tuple[str, ...]] = {
    # an RSA public key in PEM: no generated string is one
    "POST /api/v1/auth/register": ("positive_data_acceptance",),
    # username or email (one of two nullable fields), and roles that exist
    "POST /admin/users": ("positive_data_acceptance",),
    # name, or resource and action: a choice between fields
    "POST /admin/permissions": ("positive_data_acceptance",),
    # permissions that exist
    "POST /admin/roles": ("positive_data_acceptance",),
    # a name, if given, must be the role's own (roles are not renamed)
    "PUT /admin/roles/{role_id}": ("positive_data_acceptance",),
    # expires_at is read by datetime.fromisoformat (ISO 8601, dates too), and the tenant must exist
    "POST /api/v1/admin/licenses": ("positive_data_acceptance",),
    "PATCH /api/v1/admin/licenses/{license_id}": ("positive_data_acceptance",),
    # a file upload: the file must be a ZIP archive
    "POST /api/v1/admin/updates": ("positive_data_acceptance",),
    # at_seq must not be past the head of the log, which moves as the run goes
    "GET /api/v1/admin/state/{projection}": ("positive_data_acceptance",),
    "GET /api/v1/console/fleet-at": ("positive_data_acceptance",),
    # seed 002's contract: an inactive tenant or an expired, revoked or used-up license is a 400
    "GET /update/check": ("positive_data_acceptance",),
    "GET /api/license/validate": ("positive_data_acceptance",),
    # the same contract: telemetry for a tenant another call of the run deactivated is a 400
    "POST /telemetry": ("positive_data_acceptance",),
    # a credential in a header: a generated one is not a key that exists
    "POST /api/v1/auth/login-key": ("positive_data_acceptance",),
    # scopes must be permissions the caller holds
    "POST /api/v1/admin/api-keys": ("positive_data_acceptance",),
    # the current password must be the caller's (and a change ends the session used)
    "POST /auth/password": ("positive_data_acceptance", "use_after_free"),
    # GET /api/v1/messages/{message_id} matches /api/v1/messages/send too, so aiohttp's 405 lists
    # GET in Allow for it (a GET there is a 404 for message "send")
    "POST /api/v1/messages/send": ("allow_header_conformance",),
}


def config(credentials: Credentials) -> dict[str, Any]:
    operations: list[dict[str, Any]] = [
        {"include-name": f"{m} {p}", "headers": credentials.node}
        for m, p in sorted(credentials.node_only)
    ]
    # its own session: a logout ends it
    operations.append(
        {"include-name": "POST /auth/logout", "headers": credentials.operator_login()}
    )
    for method, path in sorted(SKIP):
        operations.append({"include-name": f"{method} {path}", "enabled": False})
    for name, checks in NOT_APPLICABLE.items():
        operations.append({"include-name": name, "checks": {c: {"enabled": False} for c in checks}})
    return {
        "seed": SEED,
        "headers": credentials.admin,
        "request-timeout": 30,
        "continue-on-failure": True,
        "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
        "operations": operations,
    }


def failures_of(event: Any) -> Iterator[str]:
    rec = event.recorder
    for case_id, checks in rec.checks.items():
        for check in checks:
            if check.failure_info is None:
                continue
            interaction = rec.interactions.get(case_id)
            resp = interaction.response if interaction else None
            got = f"{resp.status_code} {resp.content[:300]!r}" if resp else "no response"
            failure = check.failure_info.failure
            yield (
                f"[{event.phase}] {rec.label} {check.name}: {failure.title}\n{failure.message}\n"
                f"got {got}\n{check.failure_info.code_sample[:600]}"
            )


def test_the_schema_is_the_contract(served: Served, credentials: Credentials) -> None:
    """Every check, every operation (but SKIP), every phase; the seed is fixed."""
    from schemathesis.engine import events

    cfg = schemathesis.config.SchemathesisConfig.from_dict(config(credentials))
    schema = schemathesis.openapi.from_url(served.base + "/api/openapi.json", config=cfg)
    failures: list[str] = []
    tested: set[str] = set()
    phases: dict[str, str] = {}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tested.add(event.recorder.label)
            failures.extend(failures_of(event))
        elif isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = event.status.value
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"error: {event!r}"[:3000])
    assert not failures, f"{len(failures)} failures\n\n" + "\n\n".join(failures[:20])
    documented = {f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items() for m in ops}
    # schemathesis leaves out the document's own URL
    missing = documented - tested - {f"{m} {p}" for m, p in SKIP} - {"GET /api/openapi.json"}
    assert not missing, missing
    assert len(tested) > 50
    for phase in ("examples", "coverage", "fuzzing", "stateful"):
        assert phases.get(phase) in ("success", "skip"), phases  # skip: nothing to run there


def test_websocket_routes(served: Served) -> None:
    """A WebSocket route answers 101 to an upgrade only: the document says so (no body), and a
    plain GET gets a declared 4xx with the error body."""
    doc = requests.get(served.base + "/api/openapi.json", timeout=30).json()
    for method, path in WEBSOCKETS:
        op = doc["paths"][path][method.lower()]
        assert op["responses"]["101"] == {"description": "Switching Protocols"}, path
        resp = requests.get(served.base + path, timeout=30)
        assert 400 <= resp.status_code < 500, (path, resp.status_code)
        assert resp.json()["error"]["code"], path
        assert str(resp.status_code) in op["responses"], (path, resp.status_code)
