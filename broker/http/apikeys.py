"""HTTP routes of API keys: create, list, show, revoke, and seed 003's `login-key` exchange.

Thin handlers over `broker.services.apikeys`. Any operator manages their own keys (never with
more than their own permissions); one holding `users:admin` sees and revokes everyone's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from broker.errors import AuthenticationFailed
from broker.http.auth import Authenticated, Public, principal_of
from broker.http.bodies import decode_body, json_response
from broker.http.ratelimit import LOGIN
from broker.http.routing import Routes
from broker.keys import API_KEYS, KEY_AUTHENTICATOR, OPERATORS
from broker.pagination import Page, PageQuery, decode_query, paginate
from broker.services import apikeys
from eventstore.timestamps import iso
from projections.apikeys import ApiKey

routes = Routes("api-keys")
OPERATOR = Authenticated(("user",))
DAY = 86400


class CreateKeyRequest(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    scopes: Annotated[list[str], msgspec.Meta(min_length=1, max_length=64)]
    # seconds until the key expires (default 90 days); null: never
    expires_in: Annotated[int, msgspec.Meta(ge=apikeys.MIN_TTL, le=apikeys.MAX_TTL)] | None = (
        90 * DAY
    )


class KeyView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    scopes: list[str]
    owner_id: str
    owner: str | None  # the owner's username
    status: Literal["active", "revoked", "expired"]
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None


class CreatedKey(KeyView, kw_only=True):
    key: str  # shown once: only its hash is kept


class KeysQuery(PageQuery, kw_only=True):
    sort_by: Literal["created_at", "name", "last_used_at"] | None = None
    owner: str | None = None  # a username or user id
    status: Literal["active", "revoked", "expired"] | None = None


class UserInfo(msgspec.Struct):
    user_id: str
    username: str
    email: str | None
    is_superadmin: bool
    organizations: list[Any]


class KeyLogin(msgspec.Struct):
    """Seed 003's AuthResponse: a token pair and who it is for."""

    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int
    user_info: UserInfo


def _view(request: web.Request, key: ApiKey) -> KeyView:
    owner = request.app[API_KEYS].users.get(key.owner_id)
    return KeyView(
        id=key.id,
        name=key.name,
        scopes=list(key.scopes),
        owner_id=key.owner_id,
        owner=owner.username if owner else None,
        status=apikeys.status(key, request.app[API_KEYS].clock()),
        created_at=iso(key.created_at),
        expires_at=iso(key.expires_at),
        last_used_at=iso(key.last_used_at),
        revoked_at=iso(key.revoked_at),
    )


@routes.post(
    "/api/v1/admin/api-keys",
    policy=OPERATOR,
    body=CreateKeyRequest,
    response=CreatedKey,
    status=201,
    summary="Create an API key of yours (scopes: permission names you hold); the key is shown once",
)
async def create_key(request: web.Request) -> web.Response:
    body = await decode_body(request, CreateKeyRequest)
    key, secret = await request.app[API_KEYS].create(
        principal_of(request),
        name=body.name,
        scopes=body.scopes,
        expires_in=body.expires_in,
    )
    view = _view(request, key)
    return json_response(
        CreatedKey(**{f: getattr(view, f) for f in view.__struct_fields__}, key=secret), status=201
    )


@routes.get(
    "/api/v1/admin/api-keys",
    policy=OPERATOR,
    query=KeysQuery,
    response=Page[KeyView],
    summary="API keys, without their secrets (yours; everyone's with users:admin)",
)
async def list_keys(request: web.Request) -> web.Response:
    query = decode_query(request, KeysQuery)
    service = request.app[API_KEYS]
    keys = service.visible(principal_of(request))
    if query.owner is not None:
        user = service.users.get(query.owner) or service.users.find_by_username(query.owner)
        keys = [k for k in keys if user is not None and k.owner_id == user.id]
    if query.status is not None:
        now = service.clock()
        keys = [k for k in keys if apikeys.status(k, now) == query.status]
    sort_keys: dict[str, Any] = {
        "created_at": lambda k: (k.created_at, k.id),
        "name": lambda k: (k.name.lower(), k.id),
        "last_used_at": lambda k: (k.last_used_at or 0.0, k.id),
    }
    return json_response(
        paginate(keys, query, sort_keys, "created_at", lambda k: _view(request, k))
    )


@routes.get(
    "/api/v1/admin/api-keys/{key_id}",
    policy=OPERATOR,
    response=KeyView,
    summary="One API key, without its secret",
)
async def get_key(request: web.Request) -> web.Response:
    key = request.app[API_KEYS].get(principal_of(request), request.match_info["key_id"])
    return json_response(_view(request, key))


@routes.delete(
    "/api/v1/admin/api-keys/{key_id}",
    policy=OPERATOR,
    status=204,
    summary="Revoke an API key: it stops working at once (open feeds and sessions too)",
)
async def revoke_key(request: web.Request) -> web.Response:
    await request.app[API_KEYS].revoke(principal_of(request), request.match_info["key_id"])
    return web.Response(status=204)


@routes.post(
    "/api/v1/auth/login-key",
    policy=Public(),  # the credential is the api-key header, checked by the handler
    response=KeyLogin,
    summary="Exchange an API key (header api-key) for tokens limited to the key's scopes",
    errors=(401,),
    extra={"rate_limit": LOGIN, "headers": ("api-key",)},
)
async def login_key(request: web.Request) -> web.Response:
    key = request.headers.get("api-key", "").strip()
    if not key:
        raise AuthenticationFailed("send the API key in the api-key header")
    keys, operators = request.app[KEY_AUTHENTICATOR], request.app[OPERATORS]
    record, principal = keys.check(key)
    user = operators.get_user(principal.id)
    pair = await operators.open_session(user, key=record.id)
    await keys.note_use(record)
    info = UserInfo(user.id, user.username, user.email, principal.can("users:admin"), [])
    return json_response(
        KeyLogin(pair.access_token, pair.refresh_token, pair.token_type, pair.expires_in, info)
    )
