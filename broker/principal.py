"""The authenticated caller of a request or WebSocket: a node or an operator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["node", "user"]
    id: str  # node id, or user id
    name: str  # node id, or username
    permissions: frozenset[str] = frozenset()
    token_id: str = ""  # the token's jti
    expires_at: float = 0.0
    session: str = ""  # the login the token belongs to (its refresh-token family)
    api_key: str = ""  # the API key's id when the caller presented one (broker.services.apikeys)

    @property
    def is_node(self) -> bool:
        return self.kind == "node"

    def can(self, permission: str) -> bool:
        return self.kind == "user" and permission in self.permissions


# Turns a bearer token into a Principal or raises AuthenticationFailed (see broker.http.auth).
Authenticator = Callable[[str], Awaitable["Principal"]]
