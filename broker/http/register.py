"""Self-registration of operators (seed 004's `POST /auth/register`), off by default.

With `[auth] self_registration = true`, anyone who can reach the server may create an account
named by its email. The account is inactive (it cannot log in) until an admin activates it
(`POST /admin/users/{id}/activate`), unless `[auth] registration_role` names a role: then it is
active at once with that role and nothing more.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
import structlog
from aiohttp import web

from broker.errors import Conflict, Forbidden, ValidationFailed
from broker.http.auth import Public
from broker.http.bodies import decode_body, json_response
from broker.http.ratelimit import LOGIN, charge_subject
from broker.http.routing import Routes
from broker.keys import CONFIG, OPERATORS
from eventstore.timestamps import iso

routes = Routes("operators")
log = structlog.get_logger("broker.register")
# The email becomes the username: the username's alphabet, with one @ and a dotted domain.
EMAIL = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


class RegisterRequest(msgspec.Struct, kw_only=True):
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=64)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    full_name: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class Registered(msgspec.Struct):
    id: str
    email: str
    full_name: str | None
    is_active: bool
    roles: list[str]
    created_at: str | None


@routes.post(
    "/auth/register",
    policy=Public(),
    body=RegisterRequest,
    response=Registered,
    status=201,
    summary="Create an operator account (when [auth] self_registration is on; inactive until "
    "an admin activates it, unless [auth] registration_role is set)",
    errors=(403,),  # self-registration is off
    extra={"rate_limit": LOGIN},
)
async def register(request: web.Request) -> web.Response:
    auth = request.app[CONFIG].auth
    if not auth.self_registration:
        raise Forbidden("self-registration is disabled on this server; ask an administrator")
    body = await decode_body(request, RegisterRequest)
    if not EMAIL.match(body.email):
        raise ValidationFailed(
            "email must be an address of letters, digits and . _ - (at most 64 characters)",
            details=[{"field": "email", "message": "Invalid email format"}],
        )
    charge_subject(request, "user:" + body.email.lower())
    service = request.app[OPERATORS]
    if service.users.find_by_login(body.email) is not None:
        raise Conflict(f"User already exists: {body.email}")
    role = auth.registration_role
    if role and role not in service.users.roles:
        log.warning("registration_role_missing", role=role)  # the admin activates by hand
        role = ""
    user = await service.create_user(
        username=body.email,
        password=body.password,
        roles=[role] if role else [],
        email=body.email,
        full_name=body.full_name,
        is_active=bool(role),
    )
    log.info("user_registered", user_id=user.id, active=user.is_active)
    view = Registered(
        user.id, body.email, user.full_name, user.is_active, list(user.roles), iso(user.created_at)
    )
    return json_response(view, status=201)
