"""HTTP routes of nodes (seed 001): registration, login, refresh, discovery, status, heartbeat.

Thin handlers: decode, call one `NodeService`/`TokenService` function, encode.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from broker.errors import AuthenticationFailed, Forbidden
from broker.http.auth import Authenticated, Permission, Public, bearer_token, principal_of
from broker.http.bodies import decode_body, json_response
from broker.http.ratelimit import LOGIN, charge_subject
from broker.http.routing import Call, Routes
from broker.keys import NODES, TOKENS
from broker.pagination import decode_query
from broker.principal import Principal
from broker.services.nodes import (
    NODE_ID_PATTERN,
    Label,
    NodeList,
    NodesQuery,
    NodeView,
    Timestamp,
    iso,
)
from broker.services.tokens import TokenPair

routes = Routes("nodes")

NodeId = Annotated[str, msgspec.Meta(pattern=NODE_ID_PATTERN)]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
AnyNodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


# --- wire types ---


class RegisterRequest(msgspec.Struct, kw_only=True):
    node_id: NodeId
    name: Text
    type: Label
    public_key: Annotated[str, msgspec.Meta(min_length=1, max_length=16384)]
    capabilities: Annotated[list[Label], msgspec.Meta(max_length=64)] = []
    endpoint: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    metadata: dict[str, Any] | None = None


class ChallengeRequest(msgspec.Struct, kw_only=True):
    node_id: AnyNodeId


class ChallengeResponse(msgspec.Struct):
    challenge: str
    expires_in: int


class VerifyRequest(msgspec.Struct, kw_only=True):
    node_id: AnyNodeId
    challenge: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    signature: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class RefreshRequest(msgspec.Struct, kw_only=True):
    refresh_token: str | None = None


class StatusUpdate(msgspec.Struct, kw_only=True):
    status: Label | None = None
    load: float | None = None
    available_resources: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    last_seen: Timestamp | None = None


class HeartbeatRequest(msgspec.Struct, kw_only=True):
    timestamp: Timestamp | None = None
    status: Label | None = None
    metrics: dict[str, Any] | None = None


class HeartbeatResponse(msgspec.Struct):
    status: str
    node_id: str
    received_at: str | None
    presence: str
    next_heartbeat_in: float


class Jwks(msgspec.Struct):
    keys: list[dict[str, Any]]


def _who(principal: Principal) -> str:
    return "node" if principal.is_node else f"user:{principal.id}"


def _require_read(principal: Principal) -> None:
    """Nodes discover each other; operators need nodes:read."""
    if not principal.is_node and not principal.can("nodes:read"):
        raise Forbidden("missing permission nodes:read")


# --- node auth ---


@routes.post(
    "/api/v1/auth/register",
    policy=Public(),
    body=RegisterRequest,
    response=NodeView,
    status=201,
    summary="Register a node with its RSA public key",
)
async def register(request: web.Request) -> web.Response:
    body = await decode_body(request, RegisterRequest)
    service = request.app[NODES]
    node = await service.register(
        node_id=body.node_id,
        name=body.name,
        type=body.type,
        public_key=body.public_key,
        capabilities=body.capabilities,
        endpoint=body.endpoint,
        metadata=body.metadata,
    )
    return json_response(service.view(node, service.clock(), with_key=True), status=201)


@routes.post(
    "/api/v1/auth/login",
    policy=Public(),
    body=ChallengeRequest,
    response=ChallengeResponse,
    summary="Get a login challenge for a node (sign it, then call verify)",
    extra={"rate_limit": LOGIN},
)
async def challenge(request: web.Request) -> web.Response:
    body = await decode_body(request, ChallengeRequest)
    charge_subject(request, f"node:{body.node_id}")
    text, expires_in = request.app[NODES].issue_challenge(body.node_id)
    return json_response(ChallengeResponse(text, expires_in))


@routes.post(
    "/api/v1/auth/verify",
    policy=Public(),
    body=VerifyRequest,
    response=TokenPair,
    summary="Exchange a signed challenge (RSA-PSS SHA-256, hex) for tokens",
    errors=(401,),  # the credentials are in the body
    extra={"rate_limit": LOGIN},
)
async def verify(request: web.Request) -> web.Response:
    body = await decode_body(request, VerifyRequest)
    charge_subject(request, f"node:{body.node_id}")
    tokens = await request.app[NODES].login(body.node_id, body.challenge, body.signature)
    return json_response(tokens)


async def refresh_tokens(request: web.Request, kind: str | None) -> web.Response:
    """Shared by node and operator refresh: the refresh token comes as the Bearer token or as
    `refresh_token` in a JSON body."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is None and request.can_read_body:
        token = (await decode_body(request, RefreshRequest)).refresh_token
    if not token:
        raise AuthenticationFailed(
            "missing refresh token", headers={"WWW-Authenticate": 'Bearer realm="broker"'}
        )
    return json_response(await request.app[TOKENS].refresh(token, kind))


@routes.post(
    "/api/v1/auth/refresh",
    policy=Public(),  # the credential is the refresh token itself, checked by the handler
    body=RefreshRequest,
    response=TokenPair,
    summary="Rotate a refresh token (Bearer): a new token pair; reusing an old one revokes it",
    errors=(401,),  # the credential is the refresh token
)
async def refresh(request: web.Request) -> web.Response:
    return await refresh_tokens(request, None)


@routes.get(
    "/.well-known/jwks.json",
    policy=Public(),
    response=Jwks,
    summary="The public key that signs every token (JWKS)",
)
async def jwks(request: web.Request) -> web.Response:
    return json_response(request.app[TOKENS].jwks(), headers={"Cache-Control": "max-age=300"})


# --- nodes ---


@routes.get(
    "/api/v1/nodes",
    policy=Authenticated(),
    query=NodesQuery,
    response=NodeList,
    summary="Discover nodes (nodes, or operators with nodes:read)",
)
async def list_nodes(request: web.Request) -> web.Response:
    _require_read(principal_of(request))
    query = decode_query(request, NodesQuery)
    await request.app[NODES].decoded(query.sort_by)
    return json_response(request.app[NODES].list_nodes(query))


@routes.get(
    "/api/v1/nodes/{node_id}",
    policy=Authenticated(),
    response=NodeView,
    summary="One node (nodes, or operators with nodes:read)",
)
async def get_node(request: web.Request) -> web.Response:
    _require_read(principal_of(request))
    service = request.app[NODES]
    node = service.get(request.match_info["node_id"])
    return json_response(service.view(node, service.clock(), with_key=True))


@routes.put(
    "/api/v1/nodes/{node_id}",
    policy=Permission("nodes:write", node_self="node_id"),
    body=StatusUpdate,
    response=NodeView,
    summary="Update a node's status, load, resources, metadata (merged) and last_seen",
)
async def update_node(request: web.Request) -> web.Response:
    body = await decode_body(request, StatusUpdate)
    service = request.app[NODES]
    node = await service.update_status(
        request.match_info["node_id"],
        by=_who(principal_of(request)),
        status=body.status,
        load=body.load,
        available_resources=body.available_resources,
        metadata=body.metadata,
        last_seen=body.last_seen,
    )
    return json_response(service.view(node, service.clock()))


@routes.answer(  # a hot route: the lean front answers it too (broker.http.lean)
    "POST",
    "/api/v1/nodes/{node_id}/heartbeat",
    policy=Authenticated(("node",)),
    body=HeartbeatRequest,
    response=HeartbeatResponse,
    summary="A node's heartbeat (the node itself only)",
)
async def heartbeat(request: Call) -> HeartbeatResponse:
    node_id = request.match_info["node_id"]
    if principal_of(request).id != node_id:
        raise Forbidden("a node may only act on itself")
    body = await decode_body(request, HeartbeatRequest)
    service = request.app[NODES]
    node = await service.heartbeat(
        node_id, timestamp=body.timestamp, status=body.status, metrics=body.metrics
    )
    now = service.clock()
    return HeartbeatResponse(
        "ok",
        node_id,
        iso(node.last_heartbeat_at),  # not the whole view: one field is needed
        service.presence(node, now),
        service.config.heartbeat_interval,
    )


@routes.delete(
    "/api/v1/nodes/{node_id}",
    policy=Permission("nodes:write"),
    status=204,
    summary="Deregister a node and revoke its tokens",
)
async def deregister(request: web.Request) -> web.Response:
    await request.app[NODES].deregister(
        request.match_info["node_id"], by=_who(principal_of(request))
    )
    return web.Response(status=204)


# --- wiring ---
