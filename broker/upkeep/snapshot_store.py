"""Snapshots on the NATS backend, kept in JetStream itself so that any instance finds them.

A snapshot is the same file as on disk (`broker.upkeep.snapshot_file`) plus, in its `Final`,
the log's index (`eventstore.nats_index.LogIndex.save`) as of the stream message `applied` the cut
was at; the header's `log_hash` is that message's anchor (SHA-256 of its subject and data). It is
written locally (`<snapshots dir>/nats/`), uploaded to the JetStream object store bucket
`<stream>_SNAPSHOTS` as `snapshot-<seq>.msgpack`, and the local file removed; the bucket keeps
the newest `[snapshots] keep`.

At start-up the newest object is downloaded, its header and body checked (length, SHA-256) and
its index handed to the store (`NatsStore.start_from`), which uses it only if the stream still
holds, at `applied`, the very message it was saved at; the store then consumes only the
messages after it, and the projections load from the snapshot and apply the tail. A snapshot is
a cache: anything wrong with one (unreachable bucket, damaged object, another stream's) is logged
with the reason and the next older one, or a full replay, is used instead; start-up never fails
for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from broker.config import Config
from broker.upkeep.snapshot_file import (
    PREFIX,
    SUFFIX,
    Body,
    Header,
    Wanted,
    read_body,
    read_header,
)

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 5.0
CHUNK_BYTES = 512 * 1024  # object store chunk (NATS' max_payload, 1 MiB by default, bounds it)

Chosen = tuple[str, Header, Body]
IndexHook = Callable[[], tuple[bytes, Iterator[tuple[str, bytes]]]]


def bucket_name(stream: str) -> str:
    """The object store bucket of `stream`'s snapshots (bucket names allow [A-Za-z0-9_-])."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", stream) + "_SNAPSHOTS"


def _seq_of(name: str) -> int | None:
    digits = name[len(PREFIX) : -len(SUFFIX)]
    if name.startswith(PREFIX) and name.endswith(SUFFIX) and digits.isdigit():
        return int(digits)
    return None


class RemoteSnapshots:
    """The snapshots of one NATS stream in its object store bucket."""

    def __init__(self, config: Config, staging: Path) -> None:
        self.store_config = config.store
        self.url = config.store.url
        self.bucket = bucket_name(config.store.stream)
        self.replicas = config.store.replicas
        self.keep = max(1, config.snapshots.keep)
        self.staging = staging  # local files: written before upload, downloaded before reading

    @contextlib.asynccontextmanager
    async def _bucket(self, create: bool) -> AsyncIterator[Any]:
        """(JetStream, the bucket) on a connection of its own, with the log's TLS settings; the
        bucket is None if it does not exist and not `create`."""
        import nats
        import nats.js.errors
        from nats.js import api

        from eventstore.nats_tls import client_context, require_tls

        tls = client_context(self.store_config)
        nc = await nats.connect(
            self.url,
            connect_timeout=CONNECT_TIMEOUT,
            max_reconnect_attempts=0,
            allow_reconnect=False,
            **({"tls": tls} if tls is not None else {}),
        )
        try:
            if tls is not None:
                require_tls(nc, self.url)
            js = nc.jetstream(timeout=CONNECT_TIMEOUT)
            try:
                obs = await js.object_store(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    yield js, None
                    return
                config = api.ObjectStoreConfig(
                    bucket=self.bucket,
                    description="fleet broker projection snapshots",
                    storage=api.StorageType.FILE,
                    replicas=self.replicas,
                )
                obs = await js.create_object_store(self.bucket, config=config)
            yield js, obs
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    @staticmethod
    async def _names(obs: Any) -> list[tuple[int, str]]:
        """The snapshots in the bucket, newest (highest seq) first."""
        import nats.js.errors

        try:
            infos = await obs.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:  # empty
            return []
        found = [(seq, i.name) for i in infos if (seq := _seq_of(i.name)) is not None]
        return sorted(found, reverse=True)

    async def choose(
        self,
        store: Any,
        wanted: Wanted,
        ignored: list[tuple[str, str]],
    ) -> Chosen | None:
        """The newest snapshot in the bucket that reads back whole and carries a log index,
        read and decoded, its index handed to `store` (a NatsStore, not yet open); those passed
        over are added to `ignored` with the reason."""
        try:
            async with self._bucket(create=False) as (js, obs):
                if obs is None:
                    return None
                for _seq, name in await self._names(obs):
                    where = f"nats:{self.bucket}/{name}"
                    path = self.staging / f".download-{name}"
                    try:
                        await self._download(js, obs, name, path)
                        header = await asyncio.to_thread(read_header, path)
                        body = await asyncio.to_thread(read_body, path, header, wanted)
                        if body.index is None:
                            raise ValueError("it holds no log index (not written on NATS)")
                    except Exception as exc:  # unreadable, damaged, gone meanwhile
                        reason = str(exc) or type(exc).__name__
                        ignored.append((where, reason))
                        log.warning("snapshot_ignored", path=where, reason=reason)
                        continue
                    finally:
                        await asyncio.to_thread(path.unlink, missing_ok=True)
                    store.start_from = (body.index, body.index_arrays, header.log_hash, header.seq)
                    return where, header, body
        except Exception as exc:  # NATS or the bucket unreachable: a full replay instead
            reason = f"the snapshot bucket {self.bucket} is unreadable: {exc or type(exc).__name__}"
            ignored.append((f"nats:{self.bucket}", reason))
            log.warning("snapshot_ignored", path=f"nats:{self.bucket}", reason=reason)
        return None

    @staticmethod
    def taken(store: Any, chosen: Chosen, ignored: list[tuple[str, str]]) -> bool:
        """Whether `store`, now open, started from `chosen`'s index (else: why not, in
        `ignored`, and it consumed the whole stream)."""
        if store.start_refused:
            ignored.append((chosen[0], store.start_refused))
            return False
        return True

    async def _download(self, js: Any, obs: Any, name: str, path: Path) -> None:
        """Object `name` into `path`, its chunks fetched one by one with direct gets (the
        bucket's stream allows them): ~10x faster than `obs.get`'s push consumer, whose flow
        control paces it at ~20 MB/s. Its size and digest are checked as `obs.get` does."""
        info = await obs.get_info(name)
        subject = f"$O.{self.bucket}.C.{info.nuid}"
        digest, size, seq = hashlib.sha256(), 0, 0
        await asyncio.to_thread(self.staging.mkdir, parents=True, exist_ok=True)
        f = await asyncio.to_thread(open, path, "wb")
        try:
            for _ in range(info.chunks or 0):
                msg = await js.get_msg(
                    f"OBJ_{self.bucket}", seq=seq + 1, subject=subject, next=True, direct=True
                )
                data, seq = msg.data or b"", msg.seq
                digest.update(data)
                size += len(data)
                await asyncio.to_thread(f.write, data)
        finally:
            await asyncio.to_thread(f.close)
        expected = (info.digest or "").partition("=")[2]
        if size != info.size or base64.urlsafe_b64encode(digest.digest()).decode() != expected:
            raise ValueError("the object is damaged (size or digest mismatch)")

    async def upload(self, path: Path, seq: int) -> None:
        """Put the snapshot file `path` (at `seq`) in the bucket, then keep the newest `keep`."""
        from nats.js import api

        name = f"{PREFIX}{seq:012d}{SUFFIX}"
        async with self._bucket(create=True) as (_js, obs):
            f = await asyncio.to_thread(open, path, "rb")
            try:
                meta = api.ObjectMeta(
                    name=name, options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES)
                )
                await obs.put(name, f, meta=meta)
            finally:
                await asyncio.to_thread(f.close)
            for _old, old in (await self._names(obs))[self.keep :]:
                with contextlib.suppress(Exception):  # pruned by another instance meanwhile
                    await obs.delete(old)


def index_from(config: Config) -> Callable[[Any], Awaitable[str | None]]:
    """For `broker verify` on NATS: a hook handing a NatsStore, not yet open, the log index of
    the newest usable snapshot (a compacted stream's seqs need it); where it came from, or None."""

    async def start(store: Any) -> str | None:
        if not config.snapshots.enabled:
            return None
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="broker-verify-"))
        try:
            chosen = await RemoteSnapshots(config, tmp).choose(store, {}, [])
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        return chosen[0] if chosen is not None else None

    return start


def cut_hooks(store: Any) -> tuple[IndexHook, Callable[[int], Awaitable[bytes | None]]]:
    """For `write_snapshot` on a NatsStore: the log's index saved in the cut (its arrays' slices
    after it), and the header's hash, the anchor of the stream message the index was saved at
    (None, no snapshot, if the projections were not at the index's head: they are the store's
    listeners, so they are)."""
    at: dict[str, int] = {}

    def index() -> tuple[bytes, Iterator[tuple[str, bytes]]]:
        data, slices, at["applied"], at["head"] = store.save_index()
        return data, slices

    async def anchor(seq: int) -> bytes | None:
        if at.get("head") != seq:
            return None
        if at["applied"] == 0:
            return b""
        return await store.anchor(at["applied"])  # type: ignore[no-any-return]

    return index, anchor
