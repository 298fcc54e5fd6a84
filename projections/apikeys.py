"""Operators' API keys: who owns each, its scopes, the hash of its secret, use and revocation.

A key stays known after revocation (so it keeps failing with "revoked", and the list shows it).
Deactivating the owner does not revoke the key: it stops working because its owner is not active
(broker.services.apikeys checks that on every use), and works again if the owner is reactivated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eventstore.base import Envelope
from eventstore.events import ApiKeyCreated, ApiKeyRevoked, ApiKeyUsed
from projections.base import Projection, handles


@dataclass(slots=True)
class ApiKey:
    id: str
    name: str
    owner_id: str
    scopes: list[str]
    key_hash: str
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None
    uses_recorded: int = 0
    revoked_at: float | None = None
    revoked_by: str = ""

    def live(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass
class ApiKeysProjection(Projection):
    name = "apikeys"
    keys: dict[str, ApiKey] = field(default_factory=dict)

    @handles(ApiKeyCreated)
    def _created(self, env: Envelope) -> None:
        e: ApiKeyCreated = env.event  # type: ignore[assignment]
        self.keys[e.key_id] = ApiKey(
            id=e.key_id,
            name=e.name,
            owner_id=e.owner_id,
            scopes=list(e.scopes),
            key_hash=e.key_hash,
            created_at=env.ts,
            expires_at=e.expires_at,
        )

    @handles(ApiKeyUsed)
    def _used(self, env: Envelope) -> None:
        e: ApiKeyUsed = env.event  # type: ignore[assignment]
        if (key := self.keys.get(e.key_id)) is not None:
            key.last_used_at = env.ts
            key.uses_recorded += 1

    @handles(ApiKeyRevoked)
    def _revoked(self, env: Envelope) -> None:
        e: ApiKeyRevoked = env.event  # type: ignore[assignment]
        if (key := self.keys.get(e.key_id)) is not None and key.revoked_at is None:
            key.revoked_at = env.ts
            key.revoked_by = e.by

    # --- queries ---

    def get(self, key_id: str) -> ApiKey | None:
        return self.keys.get(key_id)

    def owned_by(self, owner_id: str) -> list[ApiKey]:
        return [k for k in self.keys.values() if k.owner_id == owner_id]
