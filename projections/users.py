"""Operators: users, roles and permissions (RBAC)."""

from __future__ import annotations

from dataclasses import dataclass, field

from eventstore.base import Envelope
from eventstore.events import (
    PermissionCreated,
    RoleCreated,
    RoleDeleted,
    RoleUpdated,
    UserActivated,
    UserCreated,
    UserDeactivated,
    UserLoggedIn,
    UserPasswordChanged,
    UserRoleGranted,
    UserRoleRevoked,
    UserUpdated,
)
from projections.base import Projection, handles

# Built in: they exist in every log, even an empty one.
PERMISSIONS: dict[str, str] = {
    "nodes:read": "list and read nodes",
    "nodes:write": "update and deregister nodes",
    "messages:send": "send messages as the broker",
    "messages:read_any": "read any node's mailbox and the dead letters",
    "events:read": "read and follow the event log",
    "licenses:admin": "manage tenants and licenses",
    "updates:admin": "publish and withdraw software updates",
    "users:admin": "manage operators, roles and permissions",
    "metrics:read": "read metrics",
    "log:admin": "compact the event log",
}
BUILTIN_ROLES: dict[str, tuple[str, ...]] = {
    "admin": tuple(PERMISSIONS),
    "operator": (
        "nodes:read",
        "nodes:write",
        "messages:send",
        "messages:read_any",
        "events:read",
        "licenses:admin",
        "updates:admin",
        "metrics:read",
    ),
    "viewer": ("nodes:read", "events:read", "metrics:read"),
}


@dataclass(slots=True)
class User:
    id: str
    username: str
    password_hash: str
    email: str | None
    full_name: str | None
    is_active: bool
    roles: list[str]
    created_at: float
    updated_at: float
    last_login: float | None = None
    must_change_password: bool = False  # set by an admin's reset; cleared by the user's change


@dataclass(slots=True)
class Role:
    id: str
    name: str
    description: str | None
    permissions: list[str]
    builtin: bool = False
    created_at: float = 0.0


@dataclass(slots=True)
class Permission:
    id: str
    name: str
    description: str | None
    builtin: bool = False


@dataclass
class UsersProjection(Projection):
    name = "users"
    users: dict[str, User] = field(default_factory=dict)
    by_username: dict[str, str] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)
    permissions: dict[str, Permission] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pname, desc in PERMISSIONS.items():
            self.permissions[pname] = Permission(pname, pname, desc, builtin=True)
        for rname, perms in BUILTIN_ROLES.items():
            self.roles[rname] = Role(rname, rname, f"built-in {rname} role", list(perms), True)

    # --- apply ---

    @handles(UserCreated)
    def _created(self, env: Envelope) -> None:
        e: UserCreated = env.event  # type: ignore[assignment]
        self.users[e.user_id] = User(
            e.user_id,
            e.username,
            e.password_hash,
            e.email,
            e.full_name,
            e.is_active,
            list(e.roles),
            env.ts,
            env.ts,
        )
        self.by_username[e.username.lower()] = e.user_id

    @handles(UserUpdated)
    def _updated(self, env: Envelope) -> None:
        e: UserUpdated = env.event  # type: ignore[assignment]
        if (u := self.users.get(e.user_id)) is not None:
            if e.email is not None:
                u.email = e.email
            if e.full_name is not None:
                u.full_name = e.full_name
            u.updated_at = env.ts

    @handles(UserPasswordChanged)
    def _password(self, env: Envelope) -> None:
        e: UserPasswordChanged = env.event  # type: ignore[assignment]
        if (u := self.users.get(e.user_id)) is not None:
            u.password_hash = e.password_hash
            if e.reason != "rehash":  # a rehash keeps the password, and what was asked of it
                u.must_change_password = e.must_change
            u.updated_at = env.ts

    @handles(UserActivated, UserDeactivated)
    def _active(self, env: Envelope) -> None:
        e = env.event
        if (u := self.users.get(e.user_id)) is not None:  # type: ignore[attr-defined]
            u.is_active = isinstance(e, UserActivated)
            u.updated_at = env.ts

    @handles(UserRoleGranted)
    def _granted(self, env: Envelope) -> None:
        e: UserRoleGranted = env.event  # type: ignore[assignment]
        if (u := self.users.get(e.user_id)) is not None and e.role not in u.roles:
            u.roles.append(e.role)
            u.updated_at = env.ts

    @handles(UserRoleRevoked)
    def _revoked(self, env: Envelope) -> None:
        e: UserRoleRevoked = env.event  # type: ignore[assignment]
        if (u := self.users.get(e.user_id)) is not None and e.role in u.roles:
            u.roles.remove(e.role)
            u.updated_at = env.ts

    @handles(UserLoggedIn)
    def _logged_in(self, env: Envelope) -> None:
        e: UserLoggedIn = env.event  # type: ignore[assignment]
        if (u := self.users.get(e.user_id)) is not None:
            u.last_login = env.ts

    @handles(RoleCreated)
    def _role_created(self, env: Envelope) -> None:
        e: RoleCreated = env.event  # type: ignore[assignment]
        self.roles[e.name] = Role(e.name, e.name, e.description, list(e.permissions), False, env.ts)

    @handles(RoleUpdated)
    def _role_updated(self, env: Envelope) -> None:
        e: RoleUpdated = env.event  # type: ignore[assignment]
        if (r := self.roles.get(_role_name(e.role_id))) is not None:
            if e.description is not None:
                r.description = e.description
            if e.permissions is not None:
                r.permissions = list(e.permissions)

    @handles(RoleDeleted)
    def _role_deleted(self, env: Envelope) -> None:
        e: RoleDeleted = env.event  # type: ignore[assignment]
        name = _role_name(e.role_id)
        self.roles.pop(name, None)
        for u in self.users.values():
            if name in u.roles:
                u.roles.remove(name)

    @handles(PermissionCreated)
    def _perm_created(self, env: Envelope) -> None:
        e: PermissionCreated = env.event  # type: ignore[assignment]
        self.permissions[e.name] = Permission(e.name, e.name, e.description)

    # --- queries ---

    def get(self, user_id: str) -> User | None:
        return self.users.get(user_id)

    def find_by_username(self, username: str) -> User | None:
        uid = self.by_username.get(username.lower())
        return self.users.get(uid) if uid else None

    def find_by_login(self, login: str) -> User | None:
        """The user whose username, or else email, is `login` (case-insensitive)."""
        user = self.find_by_username(login)
        if user is None and "@" in login:
            folded = login.lower()
            user = next((u for u in self.users.values() if (u.email or "").lower() == folded), None)
        return user

    def users_with_role(self, role: str) -> int:
        return sum(1 for u in self.users.values() if role in u.roles)

    def permissions_of(self, user: User) -> set[str]:
        """What the user may do now: nothing while they must choose a new password."""
        perms: set[str] = set()
        if user.must_change_password:
            return perms
        for rname in user.roles:
            if (role := self.roles.get(rname)) is not None:
                perms.update(role.permissions)
        return perms


def role_stream(name: str) -> str:
    return f"role:{name}"


def _role_name(role_id: str) -> str:
    return role_id.removeprefix("role:")
