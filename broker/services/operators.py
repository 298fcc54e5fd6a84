"""Operator accounts: the application functions behind `broker users create` and the admin API
(seed 004): login, roles and permissions (RBAC), activation."""

from __future__ import annotations

import hashlib
import re
import time

from broker.errors import AuthenticationFailed, Conflict, NotFound, ValidationFailed
from broker.runtime import Runtime
from broker.services.passwords import hash_password_async, needs_rehash, verify_password_async
from broker.services.tokens import TokenPair, TokenService
from eventstore.base import ConcurrencyError
from eventstore.events import (
    BaseEvent,
    PermissionCreated,
    RoleCreated,
    RoleDeleted,
    RoleUpdated,
    TokenFamilyRevoked,
    UserActivated,
    UserCreated,
    UserDeactivated,
    UserLoggedIn,
    UserPasswordChanged,
    UserRoleGranted,
    UserRoleRevoked,
)
from projections.users import Permission, Role, User, UsersProjection, role_stream

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{3,64}$")
MIN_PASSWORD = 8


def user_id_for(username: str) -> str:
    """A user's id is derived from its (case-folded) username, so the log itself refuses a second
    user of the same name: both creations target one stream with expected version 0."""
    return "usr_" + hashlib.blake2b(username.lower().encode(), digest_size=8).hexdigest()


class Operators:
    """Operators' accounts, roles and permissions, and their logins."""

    def __init__(self, runtime: Runtime, tokens: TokenService | None = None) -> None:
        """Without `tokens` (the offline commands), everything but opening sessions."""
        self.runtime = runtime
        self.tokens = tokens

    @property
    def users(self) -> UsersProjection:
        return self.runtime.users

    async def create_user(
        self,
        *,
        username: str,
        password: str,
        roles: list[str],
        email: str | None = None,
        full_name: str | None = None,
        is_active: bool = True,
    ) -> User:
        if not USERNAME.match(username):
            raise ValidationFailed(
                "username must be 3-64 letters, digits or . _ @ -", details=[{"field": "username"}]
            )
        check_password(password)
        unknown = [r for r in roles if r not in self.runtime.users.roles]
        if unknown:
            known = ", ".join(sorted(self.runtime.users.roles))
            raise ValidationFailed(
                f"unknown role(s): {', '.join(unknown)}; roles: {known}",
                details=[{"field": "roles"}],
            )
        if self.runtime.users.find_by_username(username) is not None:
            raise Conflict(f"User already exists: {username}")
        user_id = user_id_for(username)
        event = UserCreated(
            user_id=user_id,
            username=username,
            password_hash=await hash_password_async(password),
            email=email,
            full_name=full_name,
            roles=list(roles),
            is_active=is_active,
        )
        try:
            await self.runtime.record([event], expected_version=0)
        except ConcurrencyError:
            raise Conflict(f"User already exists: {username}") from None
        user = self.runtime.users.get(user_id)
        assert user is not None  # recorded events are applied before record() returns
        return user

    async def login(self, login: str, password: str) -> TokenPair:
        """Check an operator's password (by username, or email) and open a session. The password is
        checked against a dummy hash when the user does not exist, so the answer takes as long."""
        user = self.runtime.users.find_by_login(login)
        ok = await verify_password_async(password, user.password_hash if user else None)
        if user is None or not ok:
            raise AuthenticationFailed(_BAD_LOGIN)
        if not user.is_active:
            raise AuthenticationFailed("this account is deactivated")
        rehash: list[BaseEvent] = []
        if needs_rehash(user.password_hash):  # an older kind of hash: replaced now it is proved
            new_hash = await hash_password_async(password)
            rehash = [UserPasswordChanged(user_id=user.id, password_hash=new_hash, reason="rehash")]
        return await self.open_session(user, rehash)

    async def open_session(
        self,
        user: User,
        events: list[BaseEvent] | None = None,
        key: str = "",
    ) -> TokenPair:
        """A new login of `user`, recorded with `events` (with `key`: limited to that API key)."""
        tokens = self.tokens
        if tokens is None:
            raise RuntimeError("opening a session needs the token service")
        session = tokens.open_session("user", user.id, 0, tokens.clock(), key=key)
        events = events or []
        events = [*events, UserLoggedIn(user_id=user.id, family_id=session.family_id)]
        await self.runtime.record(
            [*events, *session.events], expected_version={session.family_id: 0}
        )
        return session.tokens

    async def _password_events(
        self, user: User, password: str, reason: str, must_change: bool
    ) -> list[BaseEvent]:
        """A new password and the end of every session of the user (their refresh families)."""
        changed = UserPasswordChanged(
            user_id=user.id,
            password_hash=await hash_password_async(password),
            reason=reason,
            must_change=must_change,
        )
        now = time.time()
        families = self.runtime.tokens.live_families("user", user.id, now)
        return [
            changed,
            *(TokenFamilyRevoked(family_id=f.family_id, reason=reason) for f in families),
        ]

    async def change_password(self, user_id: str, current: str, new: str) -> TokenPair:
        """The user's own change: proves the current password, ends every session of the user and
        opens a new one (returned), so the caller carries on and nobody else does."""
        user = self.get_user(user_id)
        check_password(new, "new_password")
        if not await verify_password_async(current, user.password_hash):
            raise AuthenticationFailed("the current password is wrong")
        if current == new:
            raise ValidationFailed(
                "the new password must differ from the current one",
                details=[{"field": "new_password"}],
            )
        events = await self._password_events(user, new, "change", False)
        return await self.open_session(user, events)

    async def reset_password(self, user_id: str, new: str, must_change: bool) -> User:
        """An admin's (or the offline command's) reset: every session of the user ends; with
        `must_change`, the user can do nothing but change it after their next login."""
        user = self.get_user(user_id)
        check_password(new)
        await self.runtime.record(await self._password_events(user, new, "reset", must_change))
        return self.get_user(user.id)

    def get_user(self, user_id: str) -> User:
        """A user by id (or, for convenience, by username); 404 otherwise."""
        user = self.runtime.users.get(user_id) or self.runtime.users.find_by_username(user_id)
        if user is None:
            raise NotFound(f"User not found: {user_id}")
        return user

    def find_users(self, *, search: str | None = None, is_active: bool | None = None) -> list[User]:
        """Users whose username, email or full name contains `search` (case-insensitive), with the
        given active state; in creation order."""
        users = list(self.runtime.users.users.values())
        if is_active is not None:
            users = [u for u in users if u.is_active is is_active]
        if search:
            needle = search.lower()
            users = [
                u
                for u in users
                if needle in u.username.lower()
                or needle in (u.email or "").lower()
                or needle in (u.full_name or "").lower()
            ]
        return users

    def get_role(self, role_id: str) -> Role:
        role = self.runtime.users.roles.get(role_id)
        if role is None:
            raise NotFound(f"Role not found: {role_id}")
        return role

    async def grant_role(self, user_id: str, role_id: str) -> User:
        user, role = self.get_user(user_id), self.get_role(role_id)
        if role.name not in user.roles:
            await self.runtime.record([UserRoleGranted(user_id=user.id, role=role.name)])
        return self.get_user(user.id)

    async def revoke_role(self, user_id: str, role_id: str) -> User:
        user, role = self.get_user(user_id), self.get_role(role_id)
        if role.name in user.roles:
            await self.runtime.record([UserRoleRevoked(user_id=user.id, role=role.name)])
        return self.get_user(user.id)

    async def set_active(self, user_id: str, active: bool, *, by: str) -> User:
        """Activate or deactivate a user; deactivation ends every session of the user at once.
        Operators cannot deactivate themselves (so the last admin cannot lock everyone out)."""
        user = self.get_user(user_id)
        if not active and user.id == by:
            raise Conflict("you cannot deactivate your own account")
        if user.is_active != active:
            event = UserActivated(user_id=user.id) if active else UserDeactivated(user_id=user.id)
            await self.runtime.record([event])
        return self.get_user(user.id)

    def _check_permissions(self, names: list[str]) -> list[str]:
        unknown = [p for p in names if p not in self.runtime.users.permissions]
        if unknown:
            raise ValidationFailed(
                f"unknown permission(s): {', '.join(unknown)}", details=[{"field": "permissions"}]
            )
        return list(dict.fromkeys(names))

    async def create_role(self, name: str, description: str | None, permissions: list[str]) -> Role:
        if not ROLE_NAME.match(name):
            raise ValidationFailed(
                "name must be 1-64 letters, digits or _ . -", details=[{"field": "name"}]
            )
        perms = self._check_permissions(permissions)
        if name in self.runtime.users.roles:
            raise Conflict(f"Role already exists: {name}")
        stream = role_stream(name)
        expected = await self.runtime.store.stream_version(
            stream
        )  # a deleted role's stream goes on
        event = RoleCreated(role_id=stream, name=name, description=description, permissions=perms)
        try:
            await self.runtime.record([event], expected_version=expected)
        except ConcurrencyError:
            raise Conflict(f"Role already exists: {name}") from None
        return self.get_role(name)

    async def update_role(
        self,
        role_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        permissions: list[str] | None = None,
    ) -> Role:
        """Change a role's description or permissions; names are fixed, and so are the permissions
        of the built-in roles."""
        role = self.get_role(role_id)
        if name is not None and name != role.name:
            raise ValidationFailed("roles cannot be renamed", details=[{"field": "name"}])
        if permissions is not None:
            permissions = self._check_permissions(permissions)
            if role.builtin and sorted(permissions) != sorted(role.permissions):
                raise Conflict(f"the permissions of the built-in role {role.name} are fixed")
        if description is not None or permissions is not None:
            await self.runtime.record(
                [
                    RoleUpdated(
                        role_id=role_stream(role.name),
                        description=description,
                        permissions=permissions,
                    )
                ]
            )
        return self.get_role(role.name)

    async def delete_role(self, role_id: str) -> None:
        """Delete a role (it is taken from every user holding it); built-in roles stay."""
        role = self.get_role(role_id)
        if role.builtin:
            raise Conflict(f"the built-in role {role.name} cannot be deleted")
        await self.runtime.record([RoleDeleted(role_id=role_stream(role.name))])

    async def create_permission(self, name: str, description: str | None) -> Permission:
        """A new permission `resource:action`, to be granted through roles."""
        if not PERMISSION_NAME.match(name):
            raise ValidationFailed(
                "name must look like resource:action (lower case)", details=[{"field": "name"}]
            )
        if name in self.runtime.users.permissions:
            raise Conflict(f"Permission already exists: {name}")
        event = PermissionCreated(
            permission_id=f"permission:{name}", name=name, description=description
        )
        try:
            await self.runtime.record([event], expected_version=0)
        except ConcurrencyError:
            raise Conflict(f"Permission already exists: {name}") from None
        return self.runtime.users.permissions[name]


# --- login ---

_BAD_LOGIN = "Incorrect username or password"


# --- passwords ---


def check_password(password: str, field: str = "password") -> None:
    if len(password) < MIN_PASSWORD:
        raise ValidationFailed(
            f"password must have at least {MIN_PASSWORD} characters", details=[{"field": field}]
        )


# --- users ---


# --- roles and permissions ---

ROLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PERMISSION_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}:[a-z0-9*][a-z0-9_.*-]{0,63}$")
