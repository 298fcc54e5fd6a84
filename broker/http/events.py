"""HTTP routes of the operators' window on the log: pages of events, the SSE feed, time travel.

- `GET /api/v1/events`: a page of decoded events, filtered by type patterns and streams, read
  forwards or backwards, with a seq cursor.
- `GET /api/v1/events/stream`: the live feed as Server-Sent Events (`Last-Event-ID` resumes).
- `GET /api/v1/admin/state/{projection}?at_seq=N`: a projection rebuilt as it was at seq N.

The WebSocket feed (`GET /ws`) is in `broker.ws.operators`; both feeds share one follower
(`eventlog.feed`), each with its own frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from broker.errors import AuthenticationFailed, BrokerError, ValidationFailed
from broker.http.auth import Permission, authenticate, credential
from broker.http.bodies import json_response
from broker.http.routing import Routes
from broker.keys import CONFIG, FEEDS, REBUILDER, RUNTIME
from broker.pagination import PageQuery, decode_query
from broker.services import eventlog
from eventstore.base import Envelope

routes = Routes("events")
EVENTS_READ = Permission("events:read")
SSE_CONTENT_TYPE = "text/event-stream"


class EventsQuery(PageQuery, kw_only=True):
    """Query of GET /api/v1/events; `types` and `stream` are comma-separated (patterns such as
    `node.*` allowed)."""

    sort_by: Literal["seq"] | None = None

    from_seq: Annotated[int, msgspec.Meta(ge=1)] | None = None
    to_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None
    types: str | None = None
    stream: str | None = None


class StreamQuery(msgspec.Struct, kw_only=True):
    """Query of GET /api/v1/events/stream. Without `from_seq` (or `Last-Event-ID`), only new
    events are sent."""

    from_seq: Annotated[int, msgspec.Meta(ge=1)] | None = None
    types: str | None = None
    stream: str | None = None


class StateQuery(msgspec.Struct, kw_only=True):
    at_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Projections(msgspec.Struct, kw_only=True):
    projections: list[str]
    head: int


@routes.get(
    "/api/v1/events",
    policy=EVENTS_READ,
    query=EventsQuery,
    response=eventlog.EventsPage,
    summary="Read the event log (filters, seq cursor, ascending or descending)",
)
async def list_events(request: web.Request) -> web.Response:
    q = decode_query(request, EventsQuery)
    if q.sort_by not in (None, "seq"):
        raise ValidationFailed(
            "sort_by must be seq", details=[{"field": "sort_by", "allowed": ["seq"]}]
        )
    skip, limit = q.window()
    page = await eventlog.read_page(
        request.app[RUNTIME].store,
        from_seq=q.from_seq,
        to_seq=q.to_seq,
        types=eventlog.split_list(q.types),
        streams=eventlog.split_list(q.stream),
        skip=skip,
        limit=limit,
        order=q.sort_order,
        scan_limit=request.app[CONFIG].events.page_scan_limit,
    )
    return json_response(page)


def _resume_from(request: web.Request, from_seq: int | None) -> int | None:
    last_id = request.headers.get("Last-Event-ID", "").strip()
    if not last_id:
        return from_seq
    if not last_id.isdigit():
        raise ValidationFailed(
            "Last-Event-ID must be the seq of the last event received",
            details=[{"field": "Last-Event-ID"}],
        )
    return int(last_id) + 1


@routes.get(
    "/api/v1/events/stream",
    policy=EVENTS_READ,
    query=StreamQuery,
    response_content_type=SSE_CONTENT_TYPE,
    summary="Follow the log as Server-Sent Events (history from from_seq, then live)",
)
async def stream_events(request: web.Request) -> web.StreamResponse:
    q = decode_query(request, StreamQuery)
    from_seq = _resume_from(request, q.from_seq)
    app = request.app
    cfg = app[CONFIG].events
    store = app[RUNTIME].store
    resp = web.StreamResponse(
        headers={
            "Content-Type": SSE_CONTENT_TYPE,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    await resp.prepare(request)
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=cfg.feed_write_buffer)
    lock = asyncio.Lock()
    expired = asyncio.Event()
    recheck = asyncio.Event()

    async def send(data: bytes) -> None:
        async with asyncio.timeout(cfg.feed_send_timeout), lock:
            await resp.write(data)

    async def keep_alive(feed: asyncio.Task[None]) -> None:
        header = credential(request.headers)
        while True:
            # every sse_ping seconds, or at once when a credential may have been revoked
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recheck.wait(), cfg.sse_ping)
            recheck.clear()
            try:
                await authenticate(app, header)  # expired, revoked or deactivated: stop
            except AuthenticationFailed as exc:
                expired.set()
                with contextlib.suppress(Exception):
                    await send(_error_event(exc))
                feed.cancel()
                return
            await send(b": ping\n\n")

    async def write(item: Envelope | eventlog.CaughtUp) -> None:
        frame = eventlog.encode_frame(item)
        if isinstance(item, eventlog.CaughtUp):
            await send(b"data: " + frame + b"\n\n")
        else:
            await send(b"id: %d\ndata: %b\n\n" % (item.seq, frame))

    async def pump() -> None:
        await send(b"retry: 3000\n\n")
        types, streams = eventlog.split_list(q.types), eventlog.split_list(q.stream)
        await eventlog.feed(store, from_seq, types, streams, cfg.feed_max_buffer, write)

    feed = asyncio.create_task(pump())
    pinger = asyncio.create_task(keep_alive(feed))
    feeds = app[FEEDS]

    async def stop() -> None:
        expired.set()  # (the server is shutting down: end the stream, the client resumes)
        feed.cancel()

    feeds.stoppers.add(stop)
    feeds.rechecks.add(recheck.set)
    # A revocation committed between the middleware's check and the line above called no
    # recheck of ours: the pinger checks once more now.
    recheck.set()
    try:
        await feed
    except asyncio.CancelledError:
        if not expired.is_set():
            raise
    except BrokerError as exc:  # it fell behind, or the log cannot be read
        with contextlib.suppress(Exception):
            await send(_error_event(exc))
    except (ConnectionError, TimeoutError):
        pass  # the client went away or stopped reading
    finally:
        feeds.stoppers.discard(stop)
        feeds.rechecks.discard(recheck.set)
        pinger.cancel()
        feed.cancel()
        await asyncio.gather(pinger, feed, return_exceptions=True)
    return resp


def _error_event(err: BrokerError) -> bytes:
    return b"data: " + eventlog.encode_error(err) + b"\n\n"


# --- time travel ---


@routes.get(
    "/api/v1/admin/state",
    policy=EVENTS_READ,
    response=Projections,
    summary="The projections whose past state can be rebuilt",
)
async def list_projections(request: web.Request) -> web.Response:
    head = await request.app[RUNTIME].store.head()
    return json_response(Projections(projections=request.app[REBUILDER].names(), head=head))


@routes.get(
    "/api/v1/admin/state/{projection}",
    policy=EVENTS_READ,
    query=StateQuery,
    response=eventlog.ProjectionState,
    summary="Rebuild a projection as it was at seq at_seq (time travel; one at a time)",
)
async def projection_state(request: web.Request) -> web.Response:
    q = decode_query(request, StateQuery)
    state = await request.app[REBUILDER].state_at(
        request.app[RUNTIME].store, request.match_info["projection"], q.at_seq
    )
    return json_response(state)
