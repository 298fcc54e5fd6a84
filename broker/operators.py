"""Operator accounts: the application functions behind `broker users create` and the admin API."""

from __future__ import annotations

import hashlib
import re

from broker.errors import Conflict, ValidationFailed
from broker.passwords import hash_password_async
from broker.runtime import Runtime
from eventstore.base import ConcurrencyError
from eventstore.events import UserCreated
from projections.users import User

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{3,64}$")
MIN_PASSWORD = 8


def user_id_for(username: str) -> str:
    """A user's id is derived from its (case-folded) username, so the log itself refuses a second
    user of the same name: both creations target one stream with expected version 0."""
    return "usr_" + hashlib.blake2b(username.lower().encode(), digest_size=8).hexdigest()


async def create_user(
    runtime: Runtime,
    *,
    username: str,
    password: str,
    roles: list[str],
    email: str | None = None,
    full_name: str | None = None,
) -> User:
    if not USERNAME.match(username):
        raise ValidationFailed(
            "username must be 3-64 letters, digits or . _ @ -", details=[{"field": "username"}]
        )
    if len(password) < MIN_PASSWORD:
        raise ValidationFailed(
            f"password must have at least {MIN_PASSWORD} characters",
            details=[{"field": "password"}],
        )
    unknown = [r for r in roles if r not in runtime.users.roles]
    if unknown:
        raise ValidationFailed(
            f"unknown role(s): {', '.join(unknown)}", details=[{"field": "roles"}]
        )
    if runtime.users.find_by_username(username) is not None:
        raise Conflict(f"User already exists: {username}")
    user_id = user_id_for(username)
    event = UserCreated(
        user_id=user_id,
        username=username,
        password_hash=await hash_password_async(password),
        email=email,
        full_name=full_name,
        roles=list(roles),
    )
    try:
        await runtime.record([event], expected_version=0)
    except ConcurrencyError:
        raise Conflict(f"User already exists: {username}") from None
    user = runtime.users.get(user_id)
    assert user is not None  # recorded events are applied before record() returns
    return user
