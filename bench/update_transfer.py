"""The server's memory while a 50 MB update is uploaded and downloaded.

    python -m bench.update_transfer [--mib 50] [--loop uvloop|asyncio]

Starts the broker in a child process (SQLite log in a temporary directory, a stub operator
token), resets the child's peak-RSS counter (/proc/<pid>/clear_refs), uploads a stored ZIP of
the given size with `requests`, reads the child's VmHWM, then does the same for a streamed
download. Prints one line: the server's peak RSS above its resident size before each transfer.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench.common import machine

TOKEN = "bench-admin"


def _serve(data_dir: str, port: int, loop: str) -> None:
    from aiohttp import web

    from broker.app import create_app
    from broker.config import Config, LogConfig, ServerConfig
    from broker.keys import AUTHENTICATOR
    from broker.principal import Principal
    from eventstore.base import StoreConfig

    if loop == "uvloop":
        import uvloop

        uvloop.install()
    principal = Principal("user", "usr_bench", "bench", frozenset({"updates:admin"}))

    async def authenticate(token: str) -> Principal:
        if token != TOKEN:
            from broker.errors import AuthenticationFailed

            raise AuthenticationFailed("invalid token")
        return principal

    config = Config(
        server=ServerConfig(host="127.0.0.1", port=port, data_dir=data_dir),
        store=StoreConfig(path=str(Path(data_dir) / "events.db")),
        log=LogConfig(level="warning"),
    )
    app = create_app(config)
    app[AUTHENTICATOR] = authenticate
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":", 1)
            out[name] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid)["VmRSS"]


def _big_zip(path: Path, mib: int) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf, zf.open("payload.bin", "w") as f:
        block = os.urandom(1 << 20)
        for i in range(mib):
            f.write(block[i:] + block[:i])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    import requests

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ctx = multiprocessing.get_context("spawn")
        server = ctx.Process(target=_serve, args=(tmp + "/data", port, args.loop), daemon=True)
        server.start()
        assert server.pid is not None
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    requests.get(url + "/health", timeout=1)
                    break
                except requests.ConnectionError:
                    time.sleep(0.05)
            src = Path(tmp) / "big.zip"
            sha = _big_zip(src, args.mib)
            size = src.stat().st_size

            before = _reset_peak(server.pid)
            t0 = time.perf_counter()
            with open(src, "rb") as f:
                resp = requests.post(
                    url + "/api/v1/admin/updates",
                    data={"version": "9.9.9", "changelog": "bench"},
                    files={"file": ("big.zip", f, "application/zip")},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=600,
                )
            up_s = time.perf_counter() - t0
            resp.raise_for_status()
            upd = resp.json()
            assert upd["sha256"] == sha, "uploaded file hash mismatch"
            up_peak = _status(server.pid)["VmHWM"] - before

            before = _reset_peak(server.pid)
            t0 = time.perf_counter()
            digest = hashlib.sha256()
            with requests.get(url + f"/update/download/{upd['id']}", stream=True, timeout=600) as r:
                r.raise_for_status()
                for chunk in r.iter_content(chunk_size=256 * 1024):
                    digest.update(chunk)
            down_s = time.perf_counter() - t0
            assert digest.hexdigest() == sha, "downloaded file hash mismatch"
            down_peak = _status(server.pid)["VmHWM"] - before
        finally:
            server.terminate()
            server.join(10)

    mib = size / 2**20
    print(
        f"update {mib:.1f} MiB ({args.loop}): upload peak RSS +{up_peak / 2**20:.1f} MiB "
        f"({mib / up_s:.0f} MiB/s), download peak RSS +{down_peak / 2**20:.1f} MiB "
        f"({mib / down_s:.0f} MiB/s); {machine()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
