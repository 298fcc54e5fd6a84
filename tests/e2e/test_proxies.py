"""docs/deployment.md's nginx and Caddy configurations, taken from the page as they are (only the
certificate paths, the ports and the host name replaced), run for real in front of `broker serve`:
HTTPS, the SDK's WebSocket through the proxy, and a client-sent X-Forwarded-For that cannot
dodge the per-IP limits."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import ROOT, free_port, served, stop
from tests.sdk.served_broker import websocket_exchange
from tests.tlscerts import TestCA

DOC = ROOT / "docs" / "deployment.md"
LOGIN_PER_IP = 20


def snippet(lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, f"docs/deployment.md should show one {lang} block"
    return blocks[0]


def binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None
    )
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI: {name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (apt-get install nginx-light caddy)")
    return found


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the proxy did not start:\n{log.read_text()}")
        time.sleep(0.05)


@contextmanager
def running(argv: list[str], port: int, log: Path, **env: str) -> Iterator[None]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    try:
        wait_listening(port, proc, log)
        yield
    finally:
        stop(proc)


def site(lang: str, tmp: Path, upstream: int, ca: TestCA, **more: str) -> str:
    """The page's configuration with the test's certificate, upstream port and `more`."""
    issued = ca.issue("localhost")
    text = snippet(lang)
    replacements = {
        "127.0.0.1:8000": f"127.0.0.1:{upstream}",
        "/etc/ssl/fleet-broker/fullchain.pem": str(issued.cert),
        "/etc/ssl/fleet-broker/privkey.pem": str(issued.key),
        **more,
    }
    for old, new in replacements.items():
        assert old in text, f"docs/deployment.md's {lang} block lacks {old!r}"
        text = text.replace(old, new)
    return text


def nginx_conf(tmp: Path, port: int, upstream: int, ca: TestCA) -> Path:
    server = site(
        "nginx", tmp, upstream, ca, **{"listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;"}
    )
    temp = "\n".join(
        f"  {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} info;\n"
        + "events { worker_connections 1024; }\n"
        + f"http {{\n  access_log off;\n{temp}\n{server}\n}}\n"
    )
    return conf


def caddy_conf(tmp: Path, port: int, upstream: int, ca: TestCA) -> Path:
    server = site(
        "caddyfile", tmp, upstream, ca, **{"broker.example.com {": f"https://localhost:{port} {{"}
    )
    conf = tmp / "Caddyfile"
    conf.write_text("{\n  admin off\n  auto_https disable_redirects\n}\n\n" + server)
    return conf


@contextmanager
def broker(tmp: Path) -> Iterator[int]:
    data = tmp / "data"
    data.mkdir()
    port = free_port()
    env = {
        "BROKER_LIMITS__TRUST_FORWARDED_FOR": "true",
        "BROKER_LIMITS__LOGIN_PER_IP": str(LOGIN_PER_IP),
        "BROKER_LIMITS__LOGIN_PER_SUBJECT": "1000",
    }
    with served(data, port, **env):
        yield port


async def through_the_proxy(base: str, ca: TestCA, tmp: Path) -> None:
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca.path)))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "healthy"
        await websocket_exchange(base, http, tmp)  # the upgrade passes the proxy
        # a client naming another address each time is still one address to the limits
        statuses = []
        for i in range(LOGIN_PER_IP + 1):
            async with http.post(
                f"{base}/auth/login",
                data={"username": f"user{i}", "password": "not-the-password"},
                headers={"X-Forwarded-For": f"198.51.100.{i}"},
            ) as resp:
                statuses.append(resp.status)
        assert 429 in statuses, statuses


def test_nginx_configuration(tmp_path: Path) -> None:
    nginx = binary("nginx")
    ca = TestCA(tmp_path / "pki")
    with broker(tmp_path) as upstream:
        port = free_port()
        conf = nginx_conf(tmp_path, port, upstream, ca)
        check = subprocess.run(
            [nginx, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr
        with running([nginx, "-c", str(conf), "-p", str(tmp_path)], port, tmp_path / "nginx.out"):
            asyncio.run(through_the_proxy(f"https://localhost:{port}", ca, tmp_path))


def test_caddy_configuration(tmp_path: Path) -> None:
    caddy = binary("caddy")
    ca = TestCA(tmp_path / "pki")
    home = tmp_path / "caddy-home"
    home.mkdir()
    dirs = {"HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    with broker(tmp_path) as upstream:
        port = free_port()
        conf = caddy_conf(tmp_path, port, upstream, ca)
        argv = [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"]
        with running(argv, port, tmp_path / "caddy.out", **dirs):
            asyncio.run(through_the_proxy(f"https://localhost:{port}", ca, tmp_path))
