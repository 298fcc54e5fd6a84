"""HTTP routes for software updates: the multipart upload and admin API, and the nodes' update
check and download (seed 002, public: the client sends no token; the tenant id and the update id
are what it knows).

Downloads are streamed from disk (sendfile where the transport allows it) with `Content-Length`,
a strong `ETag` (the SHA-256), `X-Checksum-SHA256`, `Repr-Digest` (RFC 9530) and single-range
`Range` support (206) so an interrupted download can resume.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Annotated, Literal

import msgspec
from aiohttp import BodyPartReader, web

from broker.errors import BrokerError, PayloadTooLarge, ValidationFailed
from broker.http.auth import Permission, Public
from broker.http.bodies import decode_body, json_response
from broker.http.routing import Routes
from broker.keys import REQUEST_ID, UPDATE_FILES, UPDATES
from broker.pagination import Page, PageQuery, decode_query, paginate
from broker.services import updates
from eventstore.timestamps import iso
from projections.updates import SEMVER, Update

routes = Routes("updates")
ADMIN = Permission("updates:admin")

READ_CHUNK = 256 * 1024
SEND_CHUNK = 256 * 1024
MAX_TEXT_FIELD = updates.MAX_CHANGELOG + 1
MULTIPART_OVERHEAD = 1024 * 1024  # text fields and part headers beside the file


# --- wire types ---


class UpdateUploadForm(msgspec.Struct, kw_only=True):
    """multipart/form-data fields of an upload (`file` is the ZIP, sent as a file part)."""

    version: str
    file: bytes
    changelog: str = ""
    tenant_ids: list[str] | None = None  # repeated field, comma-separated or a JSON array


class UpdateOut(msgspec.Struct, kw_only=True):
    id: str
    version: str
    changelog: str
    file_size: int
    sha256: str
    filename: str
    tenant_ids: list[str] | None
    created_at: str
    withdrawn: bool
    withdrawn_at: str | None
    withdraw_reason: str | None
    download_url: str


class UpdateListQuery(PageQuery, kw_only=True):
    sort_by: Literal["created_at", "file_size", "version"] | None = None
    version: str | None = None
    tenant_id: str | None = None  # updates this tenant may see
    withdrawn: bool | None = None


class UpdateWithdraw(msgspec.Struct, kw_only=True):
    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class CheckQuery(msgspec.Struct, kw_only=True):
    tenantId: str
    version: Annotated[str, msgspec.Meta(pattern=SEMVER.pattern, max_length=128)]


class UpdateCheckOut(msgspec.Struct, kw_only=True):
    """The seed's body, field for field (nulls when up to date)."""

    updateAvailable: bool
    currentVersion: str
    latestVersion: str
    updateId: str | None
    changelog: str | None
    fileSize: int | None


def update_out(u: Update) -> UpdateOut:
    return UpdateOut(
        id=u.id,
        version=u.version,
        changelog=u.changelog,
        file_size=u.file_size,
        sha256=u.sha256,
        filename=u.filename,
        tenant_ids=u.tenant_ids,
        created_at=iso(u.created_at) or "",
        withdrawn=u.withdrawn,
        withdrawn_at=iso(u.withdrawn_at),
        withdraw_reason=u.withdraw_reason,
        download_url=f"/update/download/{u.id}",
    )


# --- admin ---


@routes.post(
    "/api/v1/admin/updates",
    policy=ADMIN,
    body=UpdateUploadForm,
    content_type="multipart/form-data",
    response=UpdateOut,
    status=201,
    summary="Publish an update (multipart: version, changelog, file (ZIP), tenant_ids)",
)
async def publish_update(request: web.Request) -> web.Response:
    files = request.app[UPDATE_FILES]
    service = request.app[UPDATES]
    if request.content_length is not None and (
        request.content_length > files.max_file_bytes + MULTIPART_OVERHEAD
    ):
        raise PayloadTooLarge(f"update file larger than {files.max_file_bytes} bytes")
    try:
        reader = await request.multipart()
    except (KeyError, AssertionError, ValueError):
        raise ValidationFailed("expected a multipart/form-data body") from None
    fields: dict[str, str] = {}
    tenant_ids: list[str] = []
    upload: updates.Upload | None = None
    filename = ""
    try:
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise ValidationFailed("nested multipart bodies are not supported")
            name = part.name or ""
            if name == "file":
                if upload is not None:
                    raise ValidationFailed("only one file per update", details=[{"field": "file"}])
                if (
                    part.headers.get("Content-Transfer-Encoding", "binary").lower()
                    not in (
                        "binary",
                        "8bit",
                        "7bit",
                    )
                    or part.headers.get("Content-Encoding", "identity").lower() != "identity"
                ):
                    raise ValidationFailed("the file part must be sent as is (binary)")
                if "version" in fields:  # refuse a duplicate before receiving megabytes
                    service.check_publication(
                        fields["version"], fields.get("changelog", ""), tenant_ids or None
                    )
                filename = part.filename or ""
                upload = await files.receive(_chunks(part))
            elif name in ("version", "changelog"):
                fields[name] = await _text(part, name)
            elif name in ("tenant_ids", "tenant_ids[]"):
                tenant_ids.extend(_tenant_ids(await _text(part, "tenant_ids")))
            else:
                await part.release()
        if upload is None:
            raise ValidationFailed("missing file part `file`", details=[{"field": "file"}])
        if "version" not in fields:
            raise ValidationFailed("missing field `version`", details=[{"field": "version"}])
    except BaseException as exc:
        if upload is not None:
            await files.discard(upload)
        if isinstance(exc, (ValueError, web.HTTPRequestEntityTooLarge)) and not isinstance(
            exc, BrokerError
        ):
            raise ValidationFailed(f"malformed multipart body: {exc}") from None
        raise
    upd = await service.publish_update(
        files,
        upload,
        version=fields["version"].strip(),
        changelog=fields.get("changelog", ""),
        tenant_ids=tenant_ids or None,
        filename=filename,
    )
    return json_response(update_out(upd), status=201)


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(READ_CHUNK):
        yield chunk


async def _text(part: BodyPartReader, field: str) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(READ_CHUNK):
        data += chunk
        if len(data) > MAX_TEXT_FIELD:
            raise ValidationFailed(f"field `{field}` is too long", details=[{"field": field}])
    try:
        return data.decode(part.get_charset("utf-8"))
    except (UnicodeDecodeError, LookupError):
        raise ValidationFailed(
            f"field `{field}` is not valid text", details=[{"field": field}]
        ) from None


def _tenant_ids(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValidationFailed(
                "tenant_ids must be ids, comma-separated or a JSON array of strings",
                details=[{"field": "tenant_ids"}],
            )
        return [v.strip() for v in value if v.strip()]
    return [v.strip() for v in text.split(",") if v.strip()]


UPDATE_SORT = {
    "created_at": lambda u: u.created_at,
    "version": lambda u: u.key,
    "file_size": lambda u: u.file_size,
}


@routes.get(
    "/api/v1/admin/updates",
    policy=ADMIN,
    query=UpdateListQuery,
    response=Page[UpdateOut],
    summary="List updates",
)
async def list_updates(request: web.Request) -> web.Response:
    q = decode_query(request, UpdateListQuery)
    found = request.app[UPDATES].updates.find(q.version, q.tenant_id, q.withdrawn)
    return json_response(paginate(found, q, UPDATE_SORT, "created_at", update_out))


@routes.get(
    "/api/v1/admin/updates/{update_id}", policy=ADMIN, response=UpdateOut, summary="Get an update"
)
async def get_update(request: web.Request) -> web.Response:
    upd = request.app[UPDATES].get_update(request.match_info["update_id"])
    return json_response(update_out(upd))


@routes.post(
    "/api/v1/admin/updates/{update_id}/withdraw",
    policy=ADMIN,
    body=UpdateWithdraw,
    response=UpdateOut,
    summary="Withdraw an update: no longer offered nor downloadable",
)
async def withdraw_update(request: web.Request) -> web.Response:
    body = await decode_body(request, UpdateWithdraw)
    upd = await request.app[UPDATES].withdraw_update(request.match_info["update_id"], body.reason)
    return json_response(update_out(upd))


# --- nodes (seed 002) ---


@routes.get(
    "/update/check",
    policy=Public(),
    query=CheckQuery,
    response=UpdateCheckOut,
    summary="Is there a newer version for this tenant?",
    errors=(400,),  # TENANT_INACTIVE, as seed 002 expects
    tags=("nodes: updates",),
)
async def check_update(request: web.Request) -> web.Response:
    q = decode_query(request, CheckQuery)
    found = request.app[UPDATES].check_for_update(q.tenantId, q.version)
    latest = found.latest
    if found.available and latest is not None:
        out = UpdateCheckOut(
            updateAvailable=True,
            currentVersion=found.current_version,
            latestVersion=latest.version,
            updateId=latest.id,
            changelog=latest.changelog,
            fileSize=latest.file_size,
        )
    else:
        out = UpdateCheckOut(
            updateAvailable=False,
            currentVersion=found.current_version,
            latestVersion=latest.version if latest is not None else found.current_version,
            updateId=None,
            changelog=None,
            fileSize=None,
        )
    return json_response(out)


@routes.get(
    "/update/download/{update_id}",
    policy=Public(),
    response_content_type="application/zip",
    # a byte range; not modified (If-None-Match); a range that cannot be satisfied
    responses={206: "application/zip", 304: None, 416: None},
    summary="Download an update's ZIP (Range, ETag and SHA-256 checksum headers)",
    tags=("nodes: updates",),
)
async def download_update(request: web.Request) -> web.StreamResponse:
    upd = request.app[UPDATES].downloadable(request.match_info["update_id"])
    return await send_file(request, request.app[UPDATE_FILES].path_of(upd.sha256), upd)


async def send_file(request: web.Request, path: Path, upd: Update) -> web.StreamResponse:
    """Serve an immutable, content-addressed file: conditional GET, one byte range, HEAD."""
    size, etag = upd.file_size, f'"{upd.sha256}"'
    name = upd.filename if upd.filename.lower().endswith(".zip") else f"update-{upd.version}.zip"
    headers = {
        "ETag": etag,
        "X-Checksum-SHA256": upd.sha256,
        "Repr-Digest": f"sha-256=:{_b64(upd.sha256)}:",
        "Accept-Ranges": "bytes",
        "Cache-Control": "public, max-age=31536000, immutable",
        "Content-Disposition": f'attachment; filename="{_ascii(name)}"',
        "X-Request-ID": request[REQUEST_ID],  # the middleware cannot add it once streaming
    }
    if _etag_matches(request.headers.get("If-None-Match"), upd.sha256):
        return web.Response(status=304, headers=headers)
    status, start, count = 200, 0, size
    if "Range" in request.headers and _etag_if_range(request.headers.get("If-Range"), etag):
        try:
            rng = request.http_range
        except ValueError:
            rng = None
        if rng is None or (rng.start is not None and rng.start >= size) or size == 0:
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if rng.start is not None:
            if rng.start < 0:  # the last -start bytes
                start = max(0, size + rng.start)
                end = size
            else:
                start = rng.start
                end = size if rng.stop is None else min(rng.stop, size)
            count = end - start
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = "application/zip"
    resp.content_length = count
    if request.method == "HEAD" or count == 0:
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    try:
        f: IO[bytes] = await asyncio.to_thread(open, path, "rb")
    except OSError:
        raise BrokerError("the update file is missing on this server") from None
    try:
        await resp.prepare(request)
        await _send(request, resp, f, start, count)
        await resp.write_eof()
    finally:
        await asyncio.to_thread(f.close)
    return resp


async def _send(
    request: web.Request, resp: web.StreamResponse, f: IO[bytes], offset: int, count: int
) -> None:
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(f.seek, offset)
    try:
        await loop.sendfile(transport, f, offset, count)  # falls back by itself for TLS
        return
    except (NotImplementedError, RuntimeError):
        # A loop (uvloop) or transport without sendfile: copy through a worker thread instead,
        # unless bytes already went out (the file position moves with what was sent).
        if await asyncio.to_thread(f.tell) != offset:
            raise
    while count > 0:
        chunk = await asyncio.to_thread(f.read, min(SEND_CHUNK, count))
        if not chunk:
            raise BrokerError("the update file is shorter than recorded")
        await resp.write(chunk)
        count -= len(chunk)


def _etag_matches(header: str | None, sha256: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or f'"{sha256}"' in tags


def _etag_if_range(header: str | None, etag: str) -> bool:
    """Honour Range unless If-Range names another version (a date never matches: no mtime)."""
    return header is None or header.strip() == etag


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def _ascii(name: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
