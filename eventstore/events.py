"""Every event type the broker records, in one module.

Rules (STYLE.md 1-2): each event is a frozen msgspec Struct with an explicit, stable tag; schemas only
grow (new fields get defaults, nothing is renamed or retyped); upgrades of old shapes happen in
`eventstore.codec`. `STREAM_FIELD` names, per class, the field whose value is the event's stream.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class BaseEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common base: subclasses set `tag=` and `stream_field`."""

    stream_field: ClassVar[str]

    @property
    def stream(self) -> str:
        return str(getattr(self, self.stream_field))

    @classmethod
    def type_name(cls) -> str:
        return str(cls.__struct_config__.tag)


# --- operators: users, roles, permissions (stream: the user id, "role:<name>", "permission:<name>") ---


class UserCreated(BaseEvent, frozen=True, tag="user.created"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    username: str
    password_hash: str
    email: str | None = None
    full_name: str | None = None
    roles: list[str] = []
    is_active: bool = True


class UserUpdated(BaseEvent, frozen=True, tag="user.updated"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    email: str | None = None
    full_name: str | None = None


class UserPasswordChanged(BaseEvent, frozen=True, tag="user.password_changed"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    password_hash: str


class UserActivated(BaseEvent, frozen=True, tag="user.activated"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str


class UserDeactivated(BaseEvent, frozen=True, tag="user.deactivated"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str


class UserRoleGranted(BaseEvent, frozen=True, tag="user.role_granted"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    role: str


class UserRoleRevoked(BaseEvent, frozen=True, tag="user.role_revoked"):
    stream_field: ClassVar[str] = "user_id"
    user_id: str
    role: str


class RoleCreated(BaseEvent, frozen=True, tag="role.created"):
    stream_field: ClassVar[str] = "role_id"
    role_id: str
    name: str
    description: str | None = None
    permissions: list[str] = []


class RoleUpdated(BaseEvent, frozen=True, tag="role.updated"):
    stream_field: ClassVar[str] = "role_id"
    role_id: str
    description: str | None = None
    permissions: list[str] | None = None


class RoleDeleted(BaseEvent, frozen=True, tag="role.deleted"):
    stream_field: ClassVar[str] = "role_id"
    role_id: str


class PermissionCreated(BaseEvent, frozen=True, tag="permission.created"):
    stream_field: ClassVar[str] = "permission_id"
    permission_id: str
    name: str
    description: str | None = None


# --- system ---


class LogNote(BaseEvent, frozen=True, tag="system.note"):
    """A free-form marker (benchmarks, imports, operator annotations)."""

    stream_field: ClassVar[str] = "stream_id"
    stream_id: str = "system"
    text: str = ""
    data: dict[str, Any] = {}


Event = (
    UserCreated
    | UserUpdated
    | UserPasswordChanged
    | UserActivated
    | UserDeactivated
    | UserRoleGranted
    | UserRoleRevoked
    | RoleCreated
    | RoleUpdated
    | RoleDeleted
    | PermissionCreated
    | LogNote
)

EVENT_TYPES: dict[str, type[BaseEvent]] = {
    cls.type_name(): cls
    for cls in Event.__args__  # type: ignore[attr-defined]
}
