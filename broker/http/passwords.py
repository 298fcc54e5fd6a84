"""HTTP routes of the password lifecycle: an operator's own change, an admin's reset.

Both end every session of the user (their refresh-token families); the own change answers with
a new session so the caller carries on. The offline reset, for a locked-out admin, is
`broker users passwd` (broker.cli.users).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from broker.errors import Forbidden
from broker.http.auth import Authenticated, Permission, principal_of
from broker.http.bodies import decode_body, json_response
from broker.http.ratelimit import charge_subject
from broker.http.routing import Routes
from broker.keys import OPERATORS
from broker.services import operators
from broker.services.tokens import TokenPair

routes = Routes("operators")
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class ChangePasswordRequest(msgspec.Struct, kw_only=True):
    current_password: Password
    new_password: Annotated[str, msgspec.Meta(min_length=operators.MIN_PASSWORD, max_length=1024)]


class ResetPasswordRequest(msgspec.Struct, kw_only=True):
    password: Annotated[str, msgspec.Meta(min_length=operators.MIN_PASSWORD, max_length=1024)]
    force_change: bool = False  # the user must choose a new password at their next login


class PasswordReset(msgspec.Struct):
    id: str
    username: str
    must_change_password: bool


@routes.post(
    "/auth/password",
    policy=Authenticated(("user",)),
    body=ChangePasswordRequest,
    response=TokenPair,
    summary="Change your password (needs the current one); ends your other sessions",
)
async def change_password(request: web.Request) -> web.Response:
    principal = principal_of(request)
    if principal.api_key:
        raise Forbidden("an API key cannot change its owner's password: log in with it")
    body = await decode_body(request, ChangePasswordRequest)
    charge_subject(request, "user:" + principal.name.lower())  # guesses of the current one
    tokens = await request.app[OPERATORS].change_password(
        principal.id,
        body.current_password,
        body.new_password,
    )
    return json_response(tokens)


@routes.post(
    "/admin/users/{user_id}/password",
    policy=Permission("users:admin"),
    body=ResetPasswordRequest,
    response=PasswordReset,
    summary="Reset an operator's password (ends their sessions; force_change: at next login)",
)
async def reset_password(request: web.Request) -> web.Response:
    body = await decode_body(request, ResetPasswordRequest)
    user = await request.app[OPERATORS].reset_password(
        request.match_info["user_id"], body.password, body.force_change
    )
    return json_response(PasswordReset(user.id, user.username, user.must_change_password))
