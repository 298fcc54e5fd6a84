"""Software updates: content-addressed ZIP storage, publication, withdrawal, and the update check.

Files live at `<data_dir>/updates/<sha256>`. An upload is streamed to a temporary file under
`<data_dir>/updates/.incoming/` while it is hashed (never whole in memory; disk writes and hashing
run in a worker thread, a megabyte at a time), fsynced, then renamed to its hash. The
`update.published` event, recorded after the file is durable, holds the hash and the size.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from broker.errors import Conflict, NotFound, PayloadTooLarge, TenantInactive, ValidationFailed
from broker.runtime import Runtime
from broker.services.licensing import MSG_TENANT_INACTIVE
from eventstore.events import UpdatePublished, UpdateWithdrawn
from projections.updates import Update, UpdatesProjection, semver_key

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive
FLUSH_BYTES = 1 << 20
MAX_CHANGELOG = 64 * 1024


@dataclass(slots=True)
class Upload:
    """A received file, not yet published: `commit` gives it its content address."""

    temp_path: Path
    sha256: str
    size: int


class UpdateFiles:
    """The update files on disk, and the one lock serializing publications."""

    def __init__(self, data_dir: str | os.PathLike[str], max_file_bytes: int) -> None:
        self.root = Path(data_dir) / "updates"
        self.incoming = self.root / ".incoming"
        self.max_file_bytes = max_file_bytes
        self.publish_lock = asyncio.Lock()

    def path_of(self, sha256: str) -> Path:
        return self.root / sha256

    async def receive(self, chunks: AsyncIterator[bytes]) -> Upload:
        """Stream `chunks` to a temporary file while hashing; check it is a ZIP within the size
        limit (422 / 413), and make it durable. `discard` or `commit` the result."""
        await asyncio.to_thread(self.incoming.mkdir, parents=True, exist_ok=True)
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        f: IO[bytes] = await asyncio.to_thread(open, temp, "wb")
        digest = hashlib.sha256()
        size = 0
        pending: list[bytes] = []
        pending_bytes = 0
        head = b""
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise PayloadTooLarge(
                        f"update file larger than {self.max_file_bytes} bytes",
                        details=[{"field": "file", "max_bytes": self.max_file_bytes}],
                    )
                if len(head) < 4:
                    head += chunk[: 4 - len(head)]
                    if len(head) == 4 and head not in ZIP_MAGIC:
                        raise _not_a_zip()
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= FLUSH_BYTES:
                    await asyncio.to_thread(_write, f, digest, pending)
                    pending, pending_bytes = [], 0
            if size == 0:
                raise ValidationFailed("the update file is empty", details=[{"field": "file"}])
            if len(head) < 4:
                raise _not_a_zip()
            await asyncio.to_thread(_write, f, digest, pending)
            await asyncio.to_thread(_sync_and_close, f)
            if not await asyncio.to_thread(zipfile.is_zipfile, temp):
                raise _not_a_zip()
        except BaseException:
            await asyncio.to_thread(_close_and_remove, f, temp)
            raise
        return Upload(temp, digest.hexdigest(), size)

    async def commit(self, upload: Upload) -> Path:
        """Move a received file to its content address (an identical file may already be there)."""
        final = self.path_of(upload.sha256)
        await asyncio.to_thread(_rename_durably, upload.temp_path, final)
        return final

    async def discard(self, upload: Upload) -> None:
        await asyncio.to_thread(upload.temp_path.unlink, missing_ok=True)


def _not_a_zip() -> ValidationFailed:
    return ValidationFailed("the update file must be a ZIP archive", details=[{"field": "file"}])


def _write(f: IO[bytes], digest: hashlib._Hash, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)
        f.write(chunk)


def _sync_and_close(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _close_and_remove(f: IO[bytes], path: Path) -> None:
    f.close()
    path.unlink(missing_ok=True)


def _rename_durably(temp: Path, final: Path) -> None:
    os.replace(temp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- commands ---


def check_version(version: str, field: str = "version") -> str:
    version = version.strip()
    if semver_key(version) is None:
        raise ValidationFailed(
            f"{field} must be a semantic version (MAJOR.MINOR.PATCH), not {version!r}",
            details=[{"field": field}],
        )
    return version


class Updates:
    """Published updates: publication, withdrawal, and what a node may download."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def updates(self) -> UpdatesProjection:
        return self.runtime.updates

    def check_publication(self, version: str, changelog: str, tenant_ids: list[str] | None) -> None:
        """Validate what an upload declares (before and after streaming the file)."""
        check_version(version)
        if len(changelog) > MAX_CHANGELOG:
            raise ValidationFailed(
                f"changelog longer than {MAX_CHANGELOG} characters",
                details=[{"field": "changelog"}],
            )
        if tenant_ids is not None:
            unknown = [t for t in tenant_ids if self.runtime.tenants.tenant(t) is None]
            if unknown:
                raise ValidationFailed(
                    f"unknown tenant_ids: {', '.join(unknown)}",
                    details=[{"field": "tenant_ids", "unknown": unknown}],
                )
        if (other := self.runtime.updates.conflicting(version, tenant_ids)) is not None:
            raise Conflict(f"version {version} is already published (update {other.id})")

    async def publish_update(
        self,
        files: UpdateFiles,
        upload: Upload,
        *,
        version: str,
        changelog: str,
        tenant_ids: list[str] | None,
        filename: str = "",
    ) -> Update:
        """Publish a received file as an update; the file is discarded if anything is refused."""
        try:
            async with files.publish_lock:  # the version check and the append, as one step
                self.check_publication(version, changelog, tenant_ids)
                await files.commit(upload)
                update_id = str(uuid.uuid4())
                event = UpdatePublished(
                    update_id=update_id,
                    version=version,
                    changelog=changelog,
                    sha256=upload.sha256,
                    file_size=upload.size,
                    filename=filename[:255],
                    tenant_ids=tenant_ids,
                )
                await self.runtime.record([event], expected_version=0)
        except BaseException:
            await files.discard(upload)
            raise
        upd = self.runtime.updates.get(update_id)
        assert upd is not None
        return upd

    def get_update(self, update_id: str) -> Update:
        upd = self.runtime.updates.get(update_id)
        if upd is None:
            raise NotFound(f"Update not found: {update_id}")
        return upd

    async def withdraw_update(self, update_id: str, reason: str | None = None) -> Update:
        """Stop offering an update (its file stays: the log refers to it)."""
        upd = self.get_update(update_id)
        if not upd.withdrawn:
            await self.runtime.record([UpdateWithdrawn(update_id=update_id, reason=reason)])
        return upd

    def downloadable(self, update_id: str) -> Update:
        """The update a node may download: published and not withdrawn."""
        upd = self.runtime.updates.get(update_id)
        if upd is None or upd.withdrawn:
            raise NotFound(f"Update not found: {update_id}")
        return upd

    def check_for_update(self, tenant_id: str, version: str) -> UpdateCheck:
        """What `tenant_id`, running `version`, should install next (seed 002 `/update/check`)."""
        tenant = self.runtime.tenants.tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"Tenant not found: {tenant_id}")
        if not tenant.active:
            raise TenantInactive(MSG_TENANT_INACTIVE)
        version = check_version(version)
        current = semver_key(version)
        assert current is not None
        latest = self.runtime.updates.latest_for(tenant_id)
        return UpdateCheck(version, latest, latest is not None and latest.key > current)


@dataclass(frozen=True, slots=True)
class UpdateCheck:
    current_version: str
    latest: Update | None
    available: bool
