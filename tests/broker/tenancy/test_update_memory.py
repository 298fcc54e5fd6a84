"""A 50 MB update goes up and comes down with the process's memory staying flat.

Resource bound, not timing: the Python heap's peak (tracemalloc: client and server share this
process) may not grow by more than 20 MB over the baseline while 50 MB pass each way.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
import zipfile
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient

from tests.broker.tenancy.conftest import auth

SIZE = 50 * 1024 * 1024
BOUND = 20 * 1024 * 1024


def write_big_zip(path: Path) -> str:
    """A stored (uncompressed) ZIP of ~50 MB written in 1 MiB pieces; returns its sha256."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf, zf.open("payload.bin", "w") as f:
        block = os.urandom(1 << 20)
        for i in range(SIZE >> 20):
            f.write(block[i:] + block[:i])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_50mb_upload_and_download_keep_memory_flat(
    api: TestClient,  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    src = tmp_path / "big.zip"
    sha = await asyncio.to_thread(write_big_zip, src)
    size = src.stat().st_size
    assert size > SIZE

    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        f = await asyncio.to_thread(open, src, "rb")
        try:
            form = aiohttp.FormData()
            form.add_field("version", "5.0.0")
            form.add_field("file", f, filename="big.zip", content_type="application/zip")
            resp = await api.post("/api/v1/admin/updates", data=form, headers=auth())
            body = await resp.json()
        finally:
            await asyncio.to_thread(f.close)
        assert resp.status == 201, body
        assert body["sha256"] == sha and body["file_size"] == size
        upload_peak = tracemalloc.get_traced_memory()[1] - base

        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        resp = await api.get(f"/update/download/{body['id']}")
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == size
        digest, received = hashlib.sha256(), 0
        async for chunk in resp.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            received += len(chunk)
        download_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()

    assert received == size and digest.hexdigest() == sha
    print(
        f"upload peak +{upload_peak / 2**20:.1f} MiB, "
        f"download peak +{download_peak / 2**20:.1f} MiB"
    )
    assert upload_peak < BOUND, f"upload grew the heap by {upload_peak / 2**20:.1f} MiB"
    assert download_peak < BOUND, f"download grew the heap by {download_peak / 2**20:.1f} MiB"
