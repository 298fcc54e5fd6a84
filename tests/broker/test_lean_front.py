"""The lean front (broker/http/lean.py) answers the hot routes as aiohttp's path does: the same
scenario against two servers, one answering through the front and one with it turned off, gives
the same statuses, headers, bodies, access log lines and request counts; what the front must
leave to aiohttp (pipelined requests, chunked bodies, Connection: close, a query) gets aiohttp's
answer, in order."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, LimitsConfig
from broker.http import middleware
from broker.http.lean import Front, LeanRunner, aiohttp_fits
from broker.keys import METRICS, NODES
from tests.broker.identity.helpers import bearer, node_session, operator_token
from tests.broker.test_access_log import Recorder
from tests.conftest import make_config

Client = TestClient  # type: ignore[type-arg]
HOT = ("/api/v1/messages/send", "/api/v1/nodes/{node_id}/heartbeat")


class LeanTestServer(TestServer):
    """aiohttp's test server, run by `broker serve`'s runner (the lean front on a real socket)."""

    async def _make_runner(self, **kwargs: Any) -> LeanRunner:
        return LeanRunner(self.app, **kwargs)


def lean_config(tmp_path: Path, **server: Any) -> Config:
    config = make_config(tmp_path, max_body_bytes=2048, **server)
    # the scenario's last steps reach it; refilled too slowly for the runs' timing to show
    config.limits = LimitsConfig(per_principal=30, window=86400.0)
    return config


class Counted:
    """How many answers the front wrote (wraps `Front.answer`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers = 0
        original = Front.answer

        async def answer(front: Front, *args: Any) -> bytes | None:
            self.answers += 1
            return await original(front, *args)

        monkeypatch.setattr(Front, "answer", answer)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counted:
    return Counted(monkeypatch)


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(middleware, "log", recorder)
    return recorder


async def lean_client(config: Config, *, lean: bool) -> AsyncIterator[Client]:
    async with TestClient(LeanTestServer(create_app(config))) as client:
        front = client.server.runner.front  # type: ignore[union-attr]
        assert front is not None
        front.enabled = lean
        yield client


_VOLATILE_HEADERS = {"Date", "X-RateLimit-Reset", "Retry-After"}  # the clock's, not the path's
_VOLATILE_FIELDS = re.compile(r'"(message_id|received_at|expires_at|timestamp)":"[^"]*"')
_RETRY_IN = re.compile(r"retry in \d+ s")


def normalised(status: int, headers: Any, body: bytes) -> tuple[Any, ...]:
    names = list(headers)  # which headers, in which order
    values = {name: headers[name] for name in names if name not in _VOLATILE_HEADERS}
    text = _RETRY_IN.sub("retry in … s", _VOLATILE_FIELDS.sub(r'"\1":"…"', body.decode()))
    return status, names, values, text


async def scenario(client: Client) -> list[tuple[Any, ...]]:
    """Every outcome of the two hot routes, in one order; each answer normalised."""
    a = (await node_session(client, "node-a"))["access_token"]
    await node_session(client, "node-b")
    c = (await node_session(client, "node-c"))["access_token"]
    admin = await operator_token(client, "root", ["admin"])
    resp = await client.delete("/api/v1/nodes/node-c", headers=bearer(admin))
    assert resp.status == 204  # node-c's token is revoked
    beat_a, beat_b = "/api/v1/nodes/node-a/heartbeat", "/api/v1/nodes/node-b/heartbeat"
    send = {"to_nodes": ["node-b"], "message_type": "data_sync", "content": {"k": 1}}
    steps: list[tuple[str, str | None, Any]] = [
        (beat_a, a, {"status": "healthy", "metrics": {"cpu": 1.5}}),  # ok
        (beat_a, a, b""),  # ok: an empty body is {}
        ("/api/v1/messages/send", a, send),  # ok
        ("/api/v1/messages/send", a, {**send, "priority": "high", "ttl": 60}),  # ok
        (beat_a, a, b'{"status": '),  # malformed
        (beat_a, a, {"status": 5}),  # invalid
        ("/api/v1/messages/send", a, {"message_type": "x"}),  # invalid: no recipients
        ("/api/v1/messages/send", a, b"[1, 2"),  # malformed
        ("/api/v1/messages/send", a, {**send, "content": {"n": 2**70}}),  # unstorable
        (beat_a, None, {}),  # no token
        (beat_a, "not-a-token", {}),  # bad token
        ("/api/v1/messages/send", "not-a-token", send),
        (beat_b, a, {}),  # another node's heartbeat
        (beat_a, admin, {}),  # an operator's token on a node's route
        ("/api/v1/nodes/node-c/heartbeat", c, {}),  # revoked
        ("/api/v1/messages/send", c, send),  # revoked
        ("/api/v1/messages/send", a, {**send, "to_nodes": ["node-x"]}),  # unknown node
        (beat_a, a, {"metrics": {"pad": "x" * 3000}}),  # too large
        ("/api/v1/messages/send", a, {**send, "content": "x" * 3000}),  # too large
    ]
    steps += [(beat_a, a, {})] * 30  # past [limits] per_principal: 429 with Retry-After
    answers = []
    for i, (path, token, body) in enumerate(steps):
        headers = {"X-Request-ID": f"step-{i}", "User-Agent": "lean-test"}
        if token is not None:
            headers.update(bearer(token))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = await client.post(path, data=data, headers=headers)
        answers.append(normalised(resp.status, resp.headers, await resp.read()))
    return answers


def counted_requests(client: Client) -> dict[tuple[str, ...], float]:
    metric = client.app[METRICS].http_requests
    return {
        tuple(sample.labels.values()): sample.value
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["route"] in HOT
    }


async def test_the_front_answers_as_aiohttp_does(
    tmp_path: Path, counted: Counted, logs: Recorder
) -> None:
    results = {}
    for lean in (False, True):
        config = lean_config(tmp_path / str(lean))
        async for client in lean_client(config, lean=lean):
            logs.entries.clear()
            before = counted.answers
            answers = await scenario(client)
            lines = [
                {k: v for k, v in e.items() if k != "ms"}
                for e in logs.entries
                if e["event"] == "request" and e["path"] != "/api/v1/nodes/node-c"
            ]
            results[lean] = (answers, lines, counted_requests(client))
            # every hot request but the two too large went through the front, when it is on
            assert counted.answers - before == (len(answers) - 2 if lean else 0)
    aiohttp_answers, lean_answers = results[False][0], results[True][0]
    statuses = [a[0] for a in lean_answers]
    assert {200, 401, 403, 404, 413, 422, 429} <= set(statuses)
    assert "Retry-After" in lean_answers[-1][1] and statuses[-1] == 429
    for i, (expected, got) in enumerate(zip(aiohttp_answers, lean_answers, strict=True)):
        assert got == expected, f"step {i}"
    assert results[True][1] == results[False][1]  # the access log
    assert results[True][2] == results[False][2]  # the request counter


async def raw_exchange(port: int, data: bytes, answers: int) -> list[bytes]:
    """Write `data` at once; read `answers` whole answers (Content-Length framed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = []
    for _ in range(answers):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        out.append(head + await reader.readexactly(length))
    writer.close()
    return out


def post(path: str, token: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {token}", *extra]
    if not any(line.startswith("Transfer-Encoding") for line in extra):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_pipelined_and_unusual_requests_keep_their_order(
    tmp_path: Path, counted: Counted
) -> None:
    async for client in lean_client(lean_config(tmp_path), lean=True):
        token = (await node_session(client, "node-a"))["access_token"]
        port = client.server.port
        assert port is not None
        beat = "/api/v1/nodes/node-a/heartbeat"
        pipelined = (
            post(beat, token, b"{}", "X-Request-ID: one")
            + b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: two\r\n\r\n"
            + post(beat, token, b"{}", "X-Request-ID: three")
            + post(beat + "?min_seq=1", token, b"{}", "X-Request-ID: four")
        )
        answers = await raw_exchange(port, pipelined, 4)
        ids = [re.search(rb"X-Request-ID: (\w+)", a)[1] for a in answers]  # type: ignore[index]
        assert ids == [b"one", b"two", b"three", b"four"]
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
        assert counted.answers == 1  # the first; the rest queued behind it went to aiohttp

        chunked = post(beat, token, b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked")
        (answer,) = await raw_exchange(port, chunked, 1)
        assert answer.startswith(b"HTTP/1.1 200 ") and counted.answers == 1

        # Connection: close is aiohttp's to honour: the answer says so, the socket closes
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(beat, token, b"{}", "Connection: close"))
        everything = await reader.read()  # until the server closes the connection
        assert b"Connection: close" in everything and everything.startswith(b"HTTP/1.1 200 ")
        writer.close()

        # keep-alive through the front: answers one after another on one connection
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(3):
            writer.write(post(beat, token, b"{}", f"X-Request-ID: k{i}"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and f"X-Request-ID: k{i}".encode() in head
            await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head)[1]))  # type: ignore[index]
        writer.close()
        assert counted.answers == 4
        node = client.app[NODES].get("node-a")
        assert node.last_heartbeat_at is not None


def test_the_hot_routes_resolve_to_the_routes_the_front_answers(tmp_path: Path) -> None:
    """aiohttp's router sends the front's paths to the same routes (no other route first)."""
    from aiohttp.test_utils import make_mocked_request

    app = create_app(lean_config(tmp_path))
    front = Front.of(app)
    assert front is not None
    assert sorted(route.name for route in front.routes) == sorted(HOT)

    async def resolve() -> None:
        for path in ("/api/v1/messages/send", "/api/v1/nodes/n-1.x_y/heartbeat"):
            request = make_mocked_request("POST", path, app=app)
            match = await app.router.resolve(request)
            hot = [r for r in front.routes if r.params(path) is not None]
            assert len(hot) == 1 and match.route.resource.canonical == hot[0].name  # type: ignore[union-attr]

    asyncio.run(resolve())


def test_off_in_the_configuration_or_with_other_middlewares(tmp_path: Path) -> None:
    assert Front.of(create_app(lean_config(tmp_path, lean_front=False))) is None
    app = create_app(lean_config(tmp_path))
    app.on_response_prepare.append(lambda request, response: asyncio.sleep(0))  # type: ignore[arg-type,return-value]
    assert Front.of(app) is None


class Held:
    """The heartbeat service held at its start until `gate` is set (`entered` says it is)."""

    def __init__(self, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.gate = asyncio.Event(), asyncio.Event()
        service = client.app[NODES]
        original = service.heartbeat

        async def held(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            await self.gate.wait()
            return await original(*args, **kwargs)

        monkeypatch.setattr(service, "heartbeat", held)

    @classmethod
    async def sent(
        cls, client: Client, monkeypatch: pytest.MonkeyPatch
    ) -> tuple[Held, str, asyncio.StreamReader, asyncio.StreamWriter]:
        """A node's heartbeat sent on a connection of its own and held in the service: the
        hold, the node's token and the connection."""
        token = (await node_session(client, "node-a"))["access_token"]
        held = cls(client, monkeypatch)
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(post("/api/v1/nodes/node-a/heartbeat", token, b"{}"))
        await held.entered.wait()
        return held, token, reader, writer


async def test_a_graceful_shutdown_waits_for_the_answer_in_flight(
    tmp_path: Path, counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for client in lean_client(lean_config(tmp_path), lean=True):
        held, _token, reader, writer = await Held.sent(client, monkeypatch)
        server = client.server.runner.server  # type: ignore[union-attr]
        assert server is not None
        server.pre_shutdown()
        stopping = asyncio.create_task(server.shutdown(10.0))  # runs before the gate opens
        held.gate.set()
        answer = await reader.read()  # the answer, then the server closes the connection
        await stopping
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}")
        assert counted.answers == 1
        writer.close()


async def test_a_client_gone_mid_request_leaves_the_server_serving(
    tmp_path: Path, counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for client in lean_client(lean_config(tmp_path), lean=True):
        held, token, _reader, writer = await Held.sent(client, monkeypatch)
        writer.close()
        await writer.wait_closed()
        held.gate.set()
        port = client.server.port
        assert port is not None
        (answer,) = await raw_exchange(
            port,
            post("/api/v1/nodes/node-a/heartbeat", token, b"{}"),
            1,
        )
        assert answer.startswith(b"HTTP/1.1 200 ") and counted.answers == 2


def test_the_front_runs_only_on_an_aiohttp_it_knows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the installed aiohttp (the one the tests run) the front is on; on a release it was
    not written for, every request goes to aiohttp."""
    app = create_app(make_config(tmp_path))
    assert aiohttp_fits()
    assert Front.of(app) is not None
    monkeypatch.setattr(aiohttp, "__version__", "4.0.0")
    assert not aiohttp_fits()
    assert Front.of(app) is None
