"""The operator console (docs/console.md): a browser app served from the package's own files.

- `GET /console`: the page (one HTML shell; the app routes by the URL's fragment).
- `GET /console/{asset}`: its scripts, styles and the vendored libraries (no CDN).
- `GET /api/v1/console/node-stats?ids=a,b`: what the fleet and node pages show beside
  GET /api/v1/nodes: each node's queue depth, in-flight and dead-letter counts and its WebSocket
  on this instance (O(1) per node from the delivery queue, at most MAX_IDS nodes a call).
- `GET /api/v1/console/node-search?q=PREFIX`: nodes whose id, then name, starts with PREFIX
  (the search box; O(log n + limit) on the discovery indices' sorted orders).
- `GET /api/v1/console/system`: what the System page shows beside health and metrics: the log's
  files and sizes, whether its hash chain was verified at start, the snapshots on disk.
- `GET /api/v1/console/fleet-at?at_seq=N`: time travel by pages: the nodes projection rebuilt
  as of seq N (the rebuilder of GET /api/v1/admin/state: one at a time, in windows), then one
  page of it with GET /api/v1/nodes's filters and sort, presence as of that event's time.
- `GET /`: a browser (`Accept: text/html`) is sent to `/console`; anything else gets the usual
  404 error body, as before.

The page holds no data: it signs in with the operator login and calls the JSON API with the
access token kept in memory (no cookie is ever set, so a cross-site request carries no
credential and CSRF has nothing to ride on). Its responses carry a strict Content-Security-Policy:
scripts, styles and connections from this origin only.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import aclosing
from pathlib import Path
from typing import Annotated

import msgspec
from aiohttp import web

from broker.errors import NotFound, ValidationFailed
from broker.http.auth import Permission, Public
from broker.http.bodies import json_response
from broker.http.routing import Routes
from broker.keys import (
    CONFIG,
    CONSOLE_FILES,
    DISPATCHER,
    NODES,
    REBUILDER,
    RUNTIME,
    SNAPSHOTS,
    TAKEOVER,
)
from broker.pagination import decode_query
from broker.services.connections import SHARED_BACKENDS
from broker.services.eventlog import split_list
from broker.services.nodes import NodeList, NodesQuery, NodeView
from broker.upkeep.snapshots import snapshot_paths
from eventstore.sqlite_checkpoint import Checkpoint, checkpoint_path
from eventstore.timestamps import iso
from projections.nodes import NodesProjection

routes = Routes("console")
STATIC = Path(__file__).parent.parent / "assets" / "console"
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def list_assets() -> dict[str, Path]:
    """Every file under assets/console by its path relative to it (blocking: in a thread)."""
    if not STATIC.is_dir():
        return {}
    return {
        p.relative_to(STATIC).as_posix(): p
        for p in STATIC.rglob("*")
        if p.is_file() and p.suffix in _TYPES
    }


MAX_IDS = 200


class NodeStatsQuery(msgspec.Struct, kw_only=True):
    ids: str  # comma-separated node ids


class NodeStats(msgspec.Struct, kw_only=True):
    queued: int  # messages waiting for the node, in flight included
    in_flight: int  # pushed and not yet acknowledged
    dead_letters: int
    connected: bool  # a node WebSocket open on this instance
    connected_since: str | None
    instance: str | None  # this instance's id (several share a log with the nats backend)


class NodeStatsList(msgspec.Struct, kw_only=True):
    items: dict[str, NodeStats]


class NodeSearchQuery(msgspec.Struct, kw_only=True):
    q: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20


class NodeSearchResult(msgspec.Struct, kw_only=True):
    nodes: list[NodeView]


class FleetAtQuery(NodesQuery, kw_only=True):
    at_seq: Annotated[int, msgspec.Meta(ge=0)]


class FleetAt(msgspec.Struct, kw_only=True):
    at_seq: int
    head: int
    events_applied: int
    as_of: str | None  # the time of event at_seq: presence is computed at it
    retired: int  # nodes deregistered by then
    page: NodeList


class FileInfo(msgspec.Struct, kw_only=True):
    name: str
    bytes: int
    modified_at: str | None


class SnapshotsInfo(msgspec.Struct, kw_only=True):
    enabled: bool
    every: int  # events between two snapshots
    keep: int
    last_seq: int  # of the newest snapshot this process loaded or wrote (0: none)
    failures: int  # periodic snapshots failed in a row
    files: list[FileInfo]


# The verified checkpoint beside the log (eventstore/sqlite_checkpoint.py), moved by `broker
# verify` and by the server's background verification; shown as it is, without opening the log.
_checkpoint = msgspec.json.Decoder(Checkpoint)


class LastVerify(msgspec.Struct, kw_only=True):
    up_to_seq: int
    at: str | None


class SystemInfo(msgspec.Struct, kw_only=True):
    backend: str
    instance: str | None  # this instance's id on a shared (nats) log
    started_at: str | None
    verified_at_start: bool  # the hash chain was checked before serving (past a trusted point)
    last_verify: LastVerify | None  # the verified checkpoint (broker verify, background), if any
    log_files: list[FileInfo]  # the SQLite log's files (none for nats or memory)
    snapshots: SnapshotsInfo


@routes.get(
    "/console",
    policy=Public(),
    summary="The operator console (a browser page; it signs in with /auth/login)",
    response_content_type="text/html",
)
@routes.get(
    "/console/{asset:.+}",
    policy=Public(),
    summary="The operator console's scripts, styles and libraries",
    response_content_type="application/octet-stream",
)
async def console_file(request: web.Request) -> web.FileResponse:
    path = request.app[CONSOLE_FILES].get(request.match_info.get("asset", "index.html"))
    if path is None:
        raise NotFound(f"Not found: {request.path}")
    # no-cache: revalidated (ETag / Last-Modified), so an upgraded server is seen at once
    headers = {**HEADERS, "Cache-Control": "no-cache", "Content-Type": _TYPES[path.suffix]}
    return web.FileResponse(path, headers=headers)


@routes.get(
    "/api/v1/console/node-stats",
    policy=Permission("nodes:read"),
    query=NodeStatsQuery,
    response=NodeStatsList,
    summary=f"Queue depth, dead letters and connection of up to {MAX_IDS} nodes (the console's)",
)
async def node_stats(request: web.Request) -> web.Response:
    ids = split_list(decode_query(request, NodeStatsQuery).ids) or []
    return json_response(NodeStatsList(items=stats_of(request.app, ids)))


def stats_of(app: web.Application, ids: list[str]) -> dict[str, NodeStats]:
    """Each node's queue counters (O(1) from the delivery queue), dead letters (one pass over
    them) and WebSocket on this instance."""
    if len(ids) > MAX_IDS:
        raise ValidationFailed(
            f"at most {MAX_IDS} node ids a call", details=[{"field": "ids", "max": MAX_IDS}]
        )
    messages = app[RUNTIME].messages
    queue = messages.queue
    wanted = set(ids)
    dead = Counter(node for _msg, node in messages.dead_letters if node in wanted)
    connections = app[DISPATCHER].connections
    shared = app[CONFIG].store.backend in SHARED_BACKENDS
    instance = app[TAKEOVER].instance if shared else None
    items = {}
    for node_id in ids:
        conn = connections.get(node_id)
        live = conn is not None and not conn.closed
        items[node_id] = NodeStats(
            queued=queue.pending_count(node_id),
            in_flight=queue.in_flight(node_id),
            dead_letters=dead[node_id],
            connected=live,
            connected_since=iso(conn.opened_at) if live and conn is not None else None,
            instance=instance if live else None,
        )
    return items


@routes.get(
    "/api/v1/console/node-search",
    policy=Permission("nodes:read"),
    query=NodeSearchQuery,
    response=NodeSearchResult,
    summary="Nodes whose id, then name (any case), starts with q (the console's search box)",
)
async def node_search(request: web.Request) -> web.Response:
    q = decode_query(request, NodeSearchQuery)
    service = request.app[NODES]
    await service.decoded()  # the id and name orders read every node
    found = request.app[RUNTIME].nodes.by_prefix(q.q, q.limit)
    now = service.clock()
    return json_response(NodeSearchResult(nodes=[service.view(n, now) for n in found]))


@routes.get(
    "/api/v1/console/fleet-at",
    policy=Permission("events:read"),
    query=FleetAtQuery,
    response=FleetAt,
    summary="The fleet as it was at a seq, one page of it (time travel; one rebuild at a time)",
)
async def fleet_at(request: web.Request) -> web.Response:
    return json_response(await fleet_as_of(request.app, decode_query(request, FleetAtQuery)))


async def fleet_as_of(app: web.Application, query: FleetAtQuery) -> FleetAt:
    store = app[RUNTIME].store
    rebuilt = await app[REBUILDER].rebuild(store, "nodes", query.at_seq)
    nodes: NodesProjection = rebuilt.part  # type: ignore[assignment]
    ts = None
    async with aclosing(store.read(rebuilt.at_seq, rebuilt.at_seq)) as events:
        async for env in events:
            ts = env.ts
    page = app[NODES].list_nodes(query, now=ts or 0.0, nodes=nodes)
    return FleetAt(
        at_seq=rebuilt.at_seq,
        head=rebuilt.head,
        events_applied=rebuilt.applied,
        as_of=iso(ts),
        retired=len(nodes.retired),
        page=page,
    )


@routes.get(
    "/api/v1/console/system",
    policy=Permission("metrics:read"),
    response=SystemInfo,
    summary="The log's files, its verification at start and the snapshots (the console's)",
)
async def system_info(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(system_of, request.app))


def _file_info(path: Path, name: str | None = None) -> FileInfo | None:
    try:
        st = path.stat()
    except OSError:  # gone meanwhile (a rotated snapshot, no WAL file)
        return None
    return FileInfo(name=name or path.name, bytes=st.st_size, modified_at=iso(st.st_mtime))


def system_of(app: web.Application) -> SystemInfo:
    """Blocking (file sizes): run in a thread."""
    config = app[CONFIG]
    store = config.store
    snap = app[SNAPSHOTS]
    log_files = []
    if store.backend == "sqlite":
        base = Path(store.path)
        for path in (base, base.with_name(base.name + "-wal")):
            if (info := _file_info(path)) is not None:
                log_files.append(info)
    files = [f for _seq, p in snapshot_paths(snap.directory) if (f := _file_info(p)) is not None]
    last_verify = None
    if store.backend == "sqlite":
        try:
            cp = _checkpoint.decode(checkpoint_path(store.path).read_bytes())
            last_verify = LastVerify(up_to_seq=cp.seq, at=iso(cp.at))
        except (OSError, msgspec.DecodeError):
            pass
    return SystemInfo(
        backend=store.backend,
        instance=app[TAKEOVER].instance if store.backend in SHARED_BACKENDS else None,
        started_at=iso(app[RUNTIME].started_at),
        verified_at_start=store.backend == "sqlite" and store.verify_on_open,
        last_verify=last_verify,
        log_files=log_files,
        snapshots=SnapshotsInfo(
            enabled=snap.enabled,
            every=snap.every,
            keep=snap.keep,
            last_seq=snap.last_seq,
            failures=snap.failures,
            files=files,
        ),
    )


@routes.get(
    "/",
    policy=Public(),
    summary="A browser is sent to the console (/console); other clients get 404",
    response_content_type="text/html",
    errors=(404,),
)
async def root(request: web.Request) -> web.StreamResponse:
    if "text/html" in request.headers.get("Accept", ""):
        raise web.HTTPFound("/console")
    raise NotFound("Not found: / (the API is under /api/v1; the console at /console)")
