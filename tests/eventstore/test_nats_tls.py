"""The NATS log over TLS, against real nats-server processes started with TLS by the test: a
tls:// URL with the CA, a client certificate for a server that verifies clients, and refusals
(an untrusted server, a server without TLS, a missing client certificate)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import eventstore.nats as natsmod
from eventstore import open_store
from eventstore.base import StoreConfig, StoreError, StoreUnavailable
from eventstore.events import LogNote
from tests.helpers.nats_tls import tls_args
from tests.nats_server import NatsServer
from tests.tlscerts import TestCA


@pytest.fixture(autouse=True)
def quick_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(natsmod, "CONNECT_TIMEOUT", 5.0)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def tls_nats(tmp_path: Path, ca: TestCA) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats", extra_args=tls_args(ca.issue("nats"))) as server:
        yield server


def config(server: NatsServer, **tls: str) -> StoreConfig:
    url = server.url.replace("nats://", "tls://")
    return StoreConfig(backend="nats", url=url, stream="TLS_TEST", **tls)


async def round_trip(cfg: StoreConfig) -> list[str]:
    store = open_store(cfg)
    await store.open()
    try:
        await store.append([LogNote(stream_id="s", text="over tls")])
        return [env.event.text async for env in store.read(1)]  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_tls_url_with_the_ca(tls_nats: NatsServer, ca: TestCA) -> None:
    assert await round_trip(config(tls_nats, tls_ca=str(ca.path))) == ["over tls"]


async def test_an_untrusted_server_is_refused(tls_nats: NatsServer) -> None:
    with pytest.raises(StoreUnavailable, match="certificate verify failed"):
        await round_trip(config(tls_nats))  # the system's CAs did not sign it


async def test_a_server_without_tls_is_refused(tmp_path: Path, ca: TestCA) -> None:
    with NatsServer(tmp_path / "plain") as plain:
        with pytest.raises(StoreUnavailable, match="TLS"):
            await round_trip(config(plain, tls_ca=str(ca.path)))


async def test_mutual_tls(tmp_path: Path, ca: TestCA) -> None:
    clients = TestCA(tmp_path / "clients", "client CA")
    me = clients.issue("broker-1", server=False, client=True)
    args = tls_args(ca.issue("nats"), client_ca=clients.path)
    with NatsServer(tmp_path / "nats", extra_args=args) as server:
        with pytest.raises(StoreUnavailable):
            await round_trip(config(server, tls_ca=str(ca.path)))
        cfg = config(server, tls_ca=str(ca.path), tls_cert=str(me.cert), tls_key=str(me.key))
        assert await round_trip(cfg) == ["over tls"]


def test_unusable_tls_files_are_named(tmp_path: Path, ca: TestCA) -> None:
    base = {"backend": "nats", "url": "tls://127.0.0.1:4222"}
    with pytest.raises(StoreError, match="missing.pem"):
        open_store(StoreConfig(**base, tls_ca=str(tmp_path / "missing.pem")))  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="client certificate"):
        open_store(StoreConfig(**base, tls_cert=str(ca.path)))  # type: ignore[arg-type]
