"""HTTP routes of messaging (seed 001): send, pending, mark read, message state, dead letters."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from broker.http.auth import Authenticated, Permission, principal_of
from broker.http.bodies import decode_body, json_response
from broker.http.routing import Call, Routes
from broker.keys import MESSAGING
from broker.pagination import decode_query
from broker.services.messaging import (
    DeadLetterView,
    MessageView,
    SendRequest,
    SendResult,
)
from projections.messages import PendingMessage

routes = Routes("messages")


class PendingQuery(msgspec.Struct, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    message_type: str | None = None


class PendingList(msgspec.Struct, kw_only=True):
    messages: list[PendingMessage]
    total: int


class ReadResult(msgspec.Struct, kw_only=True):
    message_id: str
    status: str


class DeadLetterList(msgspec.Struct, kw_only=True):
    items: list[DeadLetterView]
    total: int


class RedriveRequest(msgspec.Struct, kw_only=True):
    message_id: str
    node_id: str
    ttl: Annotated[float, msgspec.Meta(gt=0)] | None = None


@routes.answer(  # a hot route: the lean front answers it too (broker.http.lean)
    "POST",
    "/api/v1/messages/send",
    policy=Authenticated(),
    body=SendRequest,
    response=SendResult,
    summary="Send a message to nodes (Idempotency-Key header supported)",
)
async def send(request: Call) -> SendResult:
    body = await decode_body(request, SendRequest)
    key = request.headers.get("Idempotency-Key")
    return await request.app[MESSAGING].send(principal_of(request), body, key)


@routes.get(
    "/api/v1/messages/pending/{node_id}",
    policy=Permission("messages:read_any", node_self="node_id"),
    query=PendingQuery,
    response=PendingList,
    summary="A node's unread, unexpired messages in delivery order",
)
async def pending(request: web.Request) -> web.Response:
    query = decode_query(request, PendingQuery)
    node_id = request.match_info["node_id"]
    items, total = request.app[MESSAGING].pending(
        principal_of(request), node_id, query.limit, query.message_type
    )
    return json_response(PendingList(messages=items, total=total))


@routes.put(
    "/api/v1/messages/{message_id}/read",
    policy=Authenticated(("node",)),
    response=ReadResult,
    summary="Mark a message read (idempotent); the same as a WebSocket ack",
)
async def mark_read(request: web.Request) -> web.Response:
    message_id = request.match_info["message_id"]
    await request.app[MESSAGING].read(principal_of(request), message_id)
    return json_response(ReadResult(message_id=message_id, status="read"))


@routes.get(
    "/api/v1/messages/dead-letters",
    policy=Permission("messages:read_any"),
    response=DeadLetterList,
    summary="Messages given up on: expired or out of attempts",
)
async def dead_letters(request: web.Request) -> web.Response:
    items = request.app[MESSAGING].dead_letters()
    return json_response(DeadLetterList(items=items, total=len(items)))


@routes.post(
    "/api/v1/messages/dead-letters/redrive",
    policy=Permission("messages:send"),
    body=RedriveRequest,
    response=ReadResult,
    summary="Put a dead letter back in its node's queue with a fresh TTL",
)
async def redrive(request: web.Request) -> web.Response:
    body = await decode_body(request, RedriveRequest)
    await request.app[MESSAGING].redrive(
        principal_of(request), body.message_id, body.node_id, body.ttl
    )
    return json_response(ReadResult(message_id=body.message_id, status="queued"))


@routes.get(
    "/api/v1/messages/{message_id}",
    policy=Authenticated(),
    response=MessageView,
    summary="A message's state per recipient (sender, recipients, operators)",
)
async def get_message(request: web.Request) -> web.Response:
    view = request.app[MESSAGING].view(principal_of(request), request.match_info["message_id"])
    return json_response(view)
