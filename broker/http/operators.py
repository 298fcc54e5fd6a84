"""HTTP routes of operators (seed 004): login, me, refresh, logout, users, roles, permissions.

Thin handlers over `broker.services.operators`; every admin route needs `users:admin`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from broker.errors import Forbidden, ValidationFailed
from broker.http.auth import Authenticated, Permission, Public, bearer_token, principal_of
from broker.http.bodies import decode_body, json_response, read_form
from broker.http.nodes import RefreshRequest, refresh_tokens
from broker.http.ratelimit import LOGIN, charge_subject
from broker.http.routing import Routes
from broker.keys import OPERATORS, TOKENS
from broker.pagination import Page, PageQuery, decode_query, paginate
from broker.services import operators
from broker.services.tokens import TokenPair
from eventstore.timestamps import iso
from projections.users import Permission as PermissionRecord
from projections.users import Role, User, UsersProjection

routes = Routes("operators")
ADMIN = Permission("users:admin")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


# --- wire types ---


class LoginRequest(msgspec.Struct, kw_only=True):
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class Me(msgspec.Struct):
    id: str
    username: str
    email: str | None
    full_name: str | None
    is_active: bool
    roles: list[str]
    permissions: list[str]
    must_change_password: bool = False  # only POST /auth/password is allowed until it is done


class UserView(msgspec.Struct):
    id: str
    username: str
    email: str | None
    full_name: str | None
    is_active: bool
    roles: list[str]
    last_login: str | None
    created_at: str | None


class UsersQuery(PageQuery, kw_only=True):
    sort_by: (
        Literal["created_at", "username", "email", "full_name", "last_login", "is_active"] | None
    ) = None
    search: str | None = None
    is_active: bool | None = None


class RolesQuery(PageQuery, kw_only=True):
    sort_by: Literal["name", "created_at"] | None = None


class PermissionsQuery(PageQuery, kw_only=True):
    sort_by: Literal["name"] | None = None


class CreateUserRequest(msgspec.Struct, kw_only=True):
    username: str | None = None
    email: str | None = None
    password: Annotated[str, msgspec.Meta(min_length=operators.MIN_PASSWORD, max_length=1024)]
    full_name: str | None = None
    roles: list[str] = msgspec.field(default_factory=lambda: ["viewer"])


class Message(msgspec.Struct):
    message: str


class ActiveState(msgspec.Struct):
    id: str
    is_active: bool


class PermissionView(msgspec.Struct):
    id: str
    name: str
    description: str | None
    resource: str
    action: str
    builtin: bool


class RoleView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    description: str | None
    permissions: list[str]
    builtin: bool
    created_at: str | None


class RoleDetail(msgspec.Struct, kw_only=True):
    id: str
    name: str
    description: str | None
    permissions: list[PermissionView]
    users_count: int
    builtin: bool
    created_at: str | None


RoleName = Annotated[str, msgspec.Meta(pattern=operators.ROLE_NAME.pattern)]


class RoleRequest(msgspec.Struct, kw_only=True):
    name: RoleName
    description: str | None = None
    permissions: list[str] = []


class RoleUpdateRequest(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    permissions: list[str] | None = None


class PermissionRequest(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    resource: str | None = None
    action: str | None = None


# --- views ---


def _user_view(user: User) -> UserView:
    return UserView(
        user.id,
        user.username,
        user.email,
        user.full_name,
        user.is_active,
        list(user.roles),
        iso(user.last_login),
        iso(user.created_at),
    )


def _permission_view(p: PermissionRecord) -> PermissionView:
    resource, _, action = p.name.partition(":")
    return PermissionView(p.id, p.name, p.description, resource, action, p.builtin)


def _role_view(role: Role) -> RoleView:
    return RoleView(
        id=role.id,
        name=role.name,
        description=role.description,
        permissions=list(role.permissions),
        builtin=role.builtin,
        created_at=iso(role.created_at) if role.created_at else None,
    )


def _role_detail(users: UsersProjection, role: Role) -> RoleDetail:
    perms = users.permissions
    return RoleDetail(
        id=role.id,
        name=role.name,
        description=role.description,
        permissions=[_permission_view(perms[p]) for p in role.permissions if p in perms],
        users_count=users.users_with_role(role.name),
        builtin=role.builtin,
        created_at=iso(role.created_at) if role.created_at else None,
    )


# --- auth ---


@routes.post(
    "/auth/login",
    policy=Public(),
    body=LoginRequest,
    response=TokenPair,
    summary="Operator login (form-urlencoded or JSON username/password)",
    errors=(401,),  # the credentials are in the body
    content_type="application/x-www-form-urlencoded",
    extra={"rate_limit": LOGIN},
)
async def login(request: web.Request) -> web.Response:
    if request.content_type in _FORM_TYPES:
        form = await read_form(request)
        try:
            body = msgspec.convert(form, LoginRequest)
        except msgspec.ValidationError as exc:
            raise ValidationFailed(str(exc), details=[{"reason": str(exc)}]) from None
    else:
        body = await decode_body(request, LoginRequest)
    charge_subject(request, "user:" + body.username.lower())
    tokens = await request.app[OPERATORS].login(body.username, body.password)
    return json_response(tokens)


@routes.get("/auth/me", policy=Authenticated(("user",)), response=Me, summary="The operator")
async def me(request: web.Request) -> web.Response:
    principal = principal_of(request)
    user = request.app[OPERATORS].get_user(principal.id)
    return json_response(
        Me(
            user.id,
            user.username,
            user.email,
            user.full_name,
            user.is_active,
            list(user.roles),
            sorted(principal.permissions),
            user.must_change_password,
        )
    )


@routes.post(
    "/auth/refresh",
    policy=Public(),  # the credential is the refresh token itself, checked by the handler
    body=RefreshRequest,
    response=TokenPair,
    summary="Rotate a refresh token (Bearer, or refresh_token in the body)",
    errors=(401,),  # the credential is the refresh token
)
async def refresh(request: web.Request) -> web.Response:
    return await refresh_tokens(request, None)


@routes.post(
    "/auth/logout",
    policy=Authenticated(),
    response=Message,
    summary="End the session of this access token (its refresh token too)",
)
async def logout(request: web.Request) -> web.Response:
    principal = principal_of(request)
    if not principal.session:
        raise Forbidden("an API key has no session to end: revoke the key instead")
    service = request.app[TOKENS]
    token = bearer_token(request.headers.get("Authorization")) or ""
    await service.revoke(service.family_of(token), "logout")
    return json_response(Message("Logged out"))


# --- users ---


@routes.get(
    "/admin/users",
    policy=ADMIN,
    query=UsersQuery,
    response=Page[UserView],
    summary="List operators (search by username, email or name; filter by is_active)",
)
async def list_users(request: web.Request) -> web.Response:
    query = decode_query(request, UsersQuery)
    users = request.app[OPERATORS].find_users(search=query.search, is_active=query.is_active)
    sort_keys: dict[str, Any] = {
        "created_at": lambda u: u.created_at,
        "username": lambda u: u.username.lower(),
        "email": lambda u: (u.email or "").lower(),
        "full_name": lambda u: (u.full_name or "").lower(),
        "last_login": lambda u: u.last_login or 0.0,
        "is_active": lambda u: u.is_active,
    }
    return json_response(paginate(users, query, sort_keys, "created_at", _user_view))


@routes.post(
    "/admin/users",
    policy=ADMIN,
    body=CreateUserRequest,
    response=UserView,
    status=201,
    summary="Create an operator (username defaults to the email)",
)
async def create_user(request: web.Request) -> web.Response:
    body = await decode_body(request, CreateUserRequest)
    username = body.username or body.email
    if not username:
        raise ValidationFailed("username or email is required", details=[{"field": "username"}])
    user = await request.app[OPERATORS].create_user(
        username=username,
        password=body.password,
        roles=body.roles,
        email=body.email,
        full_name=body.full_name,
    )
    return json_response(_user_view(user), status=201)


@routes.get("/admin/users/{user_id}", policy=ADMIN, response=UserView, summary="One operator")
async def get_user(request: web.Request) -> web.Response:
    user = request.app[OPERATORS].get_user(request.match_info["user_id"])
    return json_response(_user_view(user))


@routes.post(
    "/admin/users/{user_id}/roles/{role_id}",
    policy=ADMIN,
    response=Message,
    summary="Grant a role to an operator",
)
async def grant_role(request: web.Request) -> web.Response:
    await request.app[OPERATORS].grant_role(
        request.match_info["user_id"], request.match_info["role_id"]
    )
    return json_response(Message("Role assigned successfully"))


@routes.delete(
    "/admin/users/{user_id}/roles/{role_id}",
    policy=ADMIN,
    status=204,
    summary="Take a role from an operator",
)
async def revoke_role(request: web.Request) -> web.Response:
    await request.app[OPERATORS].revoke_role(
        request.match_info["user_id"], request.match_info["role_id"]
    )
    return web.Response(status=204)


@routes.post(
    "/admin/users/{user_id}/activate",
    policy=ADMIN,
    response=ActiveState,
    summary="Activate an operator",
)
async def activate(request: web.Request) -> web.Response:
    return await _set_active(request, True)


@routes.post(
    "/admin/users/{user_id}/deactivate",
    policy=ADMIN,
    response=ActiveState,
    summary="Deactivate an operator (ends their sessions)",
)
async def deactivate(request: web.Request) -> web.Response:
    return await _set_active(request, False)


async def _set_active(request: web.Request, active: bool) -> web.Response:
    user = await request.app[OPERATORS].set_active(
        request.match_info["user_id"], active, by=principal_of(request).id
    )
    return json_response(ActiveState(user.id, user.is_active))


# --- roles ---


@routes.get(
    "/admin/roles", policy=ADMIN, query=RolesQuery, response=Page[RoleView], summary="List roles"
)
async def list_roles(request: web.Request) -> web.Response:
    query = decode_query(request, RolesQuery)
    roles = list(request.app[OPERATORS].users.roles.values())
    sort_keys: dict[str, Any] = {
        "name": lambda r: r.name,
        "created_at": lambda r: (r.created_at, r.name),
    }
    return json_response(paginate(roles, query, sort_keys, "created_at", _role_view))


@routes.post(
    "/admin/roles",
    policy=ADMIN,
    body=RoleRequest,
    response=RoleView,
    status=201,
    summary="Create a role",
)
async def create_role(request: web.Request) -> web.Response:
    body = await decode_body(request, RoleRequest)
    role = await request.app[OPERATORS].create_role(body.name, body.description, body.permissions)
    return json_response(_role_view(role), status=201)


@routes.get(
    "/admin/roles/{role_id}",
    policy=ADMIN,
    response=RoleDetail,
    summary="One role, its permissions and how many operators hold it",
)
async def get_role(request: web.Request) -> web.Response:
    service = request.app[OPERATORS]
    return json_response(
        _role_detail(service.users, service.get_role(request.match_info["role_id"]))
    )


@routes.put(
    "/admin/roles/{role_id}",
    policy=ADMIN,
    body=RoleUpdateRequest,
    response=RoleDetail,
    summary="Update a role's description or permissions",
)
async def update_role(request: web.Request) -> web.Response:
    body = await decode_body(request, RoleUpdateRequest)
    service = request.app[OPERATORS]
    role = await service.update_role(
        request.match_info["role_id"],
        name=body.name,
        description=body.description,
        permissions=body.permissions,
    )
    return json_response(_role_detail(service.users, role))


@routes.delete("/admin/roles/{role_id}", policy=ADMIN, status=204, summary="Delete a role")
async def delete_role(request: web.Request) -> web.Response:
    await request.app[OPERATORS].delete_role(request.match_info["role_id"])
    return web.Response(status=204)


# --- permissions ---


@routes.get(
    "/admin/permissions",
    policy=ADMIN,
    query=PermissionsQuery,
    response=Page[PermissionView],
    summary="List permissions",
)
async def list_permissions(request: web.Request) -> web.Response:
    query = decode_query(request, PermissionsQuery)
    perms = list(request.app[OPERATORS].users.permissions.values())
    sort_keys: dict[str, Any] = {"name": lambda p: p.name}
    return json_response(paginate(perms, query, sort_keys, "name", _permission_view))


@routes.post(
    "/admin/permissions",
    policy=ADMIN,
    body=PermissionRequest,
    response=PermissionView,
    status=201,
    summary="Create a permission (name, or resource and action)",
)
async def create_permission(request: web.Request) -> web.Response:
    body = await decode_body(request, PermissionRequest)
    name = body.name or (f"{body.resource}:{body.action}" if body.resource and body.action else "")
    if not name:
        raise ValidationFailed(
            "name, or resource and action, are required", details=[{"field": "name"}]
        )
    perm = await request.app[OPERATORS].create_permission(name, body.description)
    return json_response(_permission_view(perm), status=201)
