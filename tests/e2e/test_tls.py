"""TLS on `broker serve`: HTTPS and WSS with a certificate made in the test (the seed 001 client
and the SDK trust its CA), mutual TLS, and a certificate reload on SIGHUP that keeps open
WebSockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from fleet_broker_client import Node

from tests.e2e.procs import ROOT, free_port, run_broker, served
from tests.sdk.served_broker import FAST, websocket_exchange
from tests.tlscerts import Issued, TestCA


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def tls_env(issued: Issued, client_ca: Path | None = None) -> dict[str, str]:
    env = {"BROKER_SERVER__TLS_CERT": str(issued.cert), "BROKER_SERVER__TLS_KEY": str(issued.key)}
    if client_ca is not None:
        env["BROKER_SERVER__TLS_CLIENT_CA"] = str(client_ca)
    return env


@contextmanager
def tls_served(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    with served(data, scheme="https", BROKER_LIMITS__ENABLED="false", **env) as (base, proc):
        yield base, proc


def trusting(ca: TestCA, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.path))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


def install(issued: Issued, live: Issued) -> None:
    """Write a certificate and its key over the files the server reads (a renewal)."""
    live.cert.write_bytes(issued.cert.read_bytes())
    live.key.write_bytes(issued.key.read_bytes())


def get_json(url: str, context: ssl.SSLContext) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=30, context=context) as resp:
        return json.load(resp)  # type: ignore[no-any-return]


def peer_subject(port: int, context: ssl.SSLContext) -> str:
    """The common name of the certificate a new handshake gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cert = tls.getpeercert()
    assert cert is not None
    return dict(pair[0] for pair in cert["subject"])["commonName"]


def test_https_with_the_test_ca(tmp_path: Path, ca: TestCA) -> None:
    with tls_served(tmp_path, tls_env(ca.issue("server"))) as (base, proc):
        assert base.startswith("https://")
        assert get_json(f"{base}/health", trusting(ca))["status"] == "healthy"
        # a client that does not trust the CA refuses the server
        with pytest.raises(urllib.error.URLError) as refused:
            get_json(f"{base}/health", ssl.create_default_context())
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        # plain HTTP on the TLS port gets no answer
        with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
            urllib.request.urlopen(base.replace("https", "http") + "/health", timeout=30)
        started = [json.loads(line) for line in proc.log if line.startswith("{")]  # type: ignore[attr-defined]
        tls_line = next(e for e in started if e["event"] == "tls")
        assert tls_line["subject"] == "CN=server" and tls_line["client_ca"] is None
        # the test certificate lives 7 days: the start warns that it expires soon
        soon = next(e for e in started if e["event"] == "tls_expires_soon")
        assert soon["level"] == "warning" and soon["days_left"] in (6, 7)


def http_errors() -> type[Exception]:
    import http.client

    return http.client.HTTPException


def test_seed001_client_over_https(tmp_path: Path, ca: TestCA) -> None:
    """The seed client, unchanged, trusting the CA as a node trusts its system store."""
    with tls_served(tmp_path, tls_env(ca.issue("server"))) as (base, _proc):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SSL_CERT_FILE": str(ca.path)}
        r = subprocess.run(
            [sys.executable, "-m", "tests.e2e.seed001_over_tls", base],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary == {
            "registered": "node-001",
            "token_type": "bearer",
            "nodes": ["node-001"],
            "health": "healthy",
        }


async def test_sdk_over_wss(tmp_path: Path, ca: TestCA) -> None:
    with tls_served(tmp_path, tls_env(ca.issue("server"))) as (base, _proc):
        connector = aiohttp.TCPConnector(ssl=trusting(ca))
        async with aiohttp.ClientSession(connector=connector) as http:
            await websocket_exchange(base, http, tmp_path)  # wss://


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path, ca: TestCA) -> None:
    clients = TestCA(tmp_path / "client-pki", "client CA")
    good = clients.issue("node-7", server=False, client=True)
    stranger = TestCA(tmp_path / "other-pki", "other CA").issue("x", server=False, client=True)
    env = tls_env(ca.issue("server"), client_ca=clients.path)
    with tls_served(tmp_path, env) as (base, _proc):
        assert get_json(f"{base}/health", trusting(ca, good))["status"] == "healthy"
        for context in (trusting(ca), trusting(ca, stranger)):
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                get_json(f"{base}/health", context)


async def test_certificate_reload_keeps_open_websockets(tmp_path: Path, ca: TestCA) -> None:
    live = Issued(tmp_path / "live.pem", tmp_path / "live.key")
    install(ca.issue("first"), live)
    with tls_served(tmp_path, tls_env(live)) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        context = trusting(ca)
        assert peer_subject(port, context) == "first"
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with Node(base, "n1", key_file=tmp_path / "n1.pem", http=http, retry=FAST) as n:
                await n.register()
                token = await n.auth.access_token()
                ws = await http.ws_connect(
                    f"{base.replace('https', 'wss')}/api/v1/ws",
                    headers={"Authorization": f"Bearer {token}"},
                )
                try:
                    assert (await ws.receive_json(timeout=30))["type"] == "welcome"
                    # renew: the new certificate is written over the files, then SIGHUP
                    install(ca.issue("second"), live)
                    proc.send_signal(signal.SIGHUP)
                    await asyncio.to_thread(wait_for_log, proc, "tls_reloaded")
                    assert await asyncio.to_thread(peer_subject, port, context) == "second"
                    # the socket opened before the reload still answers
                    await ws.send_json([{"type": "heartbeat", "ref": 1, "status": "healthy"}])
                    [reply] = await ws.receive_json(timeout=30)  # a batch gets a batch
                    assert reply["type"] == "ok" and reply["ref"] == 1, reply
                    assert not ws.closed
                finally:
                    await ws.close()


def test_a_bad_renewal_keeps_the_old_certificate(tmp_path: Path, ca: TestCA) -> None:
    live = Issued(tmp_path / "live.pem", tmp_path / "live.key")
    install(ca.issue("first"), live)
    with tls_served(tmp_path, tls_env(live)) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        live.cert.write_bytes(ca.issue("second").cert.read_bytes())  # the key does not match
        proc.send_signal(signal.SIGHUP)
        failed = wait_for_log(proc, "tls_reload_failed")
        assert "live.pem" in failed["reason"]
        assert peer_subject(port, trusting(ca)) == "first"
        assert proc.poll() is None


def wait_for_log(proc: subprocess.Popen[str], event: str, timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
    """The first log entry named `event` once the server has written it (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.log):  # type: ignore[attr-defined]
            if line.startswith("{") and json.loads(line)["event"] == event:
                return json.loads(line)  # type: ignore[no-any-return]
        time.sleep(0.02)
    raise AssertionError(f"no {event} in the log")


def test_unusable_tls_files_stop_the_start(tmp_path: Path, ca: TestCA) -> None:
    data = tmp_path / "data"
    issued = ca.issue("server")
    r = run_broker(["serve"], data, BROKER_SERVER__TLS_CERT=str(tmp_path / "missing.pem"))
    assert r.returncode == 1 and "missing.pem" in r.stderr and "Traceback" not in r.stderr
    other = ca.issue("other")
    r = run_broker(
        ["serve", "--port", str(free_port())],
        data,
        BROKER_SERVER__TLS_CERT=str(issued.cert),
        BROKER_SERVER__TLS_KEY=str(other.key),
    )
    assert r.returncode == 1 and "cannot load the certificate" in r.stderr, r.stderr
    r = run_broker(["serve"], data, BROKER_SERVER__TLS_KEY=str(issued.key))
    assert r.returncode == 2 and "tls_key and tls_client_ca need tls_cert" in r.stderr
