"""Software updates published by operators, and which one a tenant should install next.

"Latest" is by Semantic Versioning 2.0 precedence (build metadata ignored, a pre-release ranks
below its release), among the updates that are not withdrawn and that the tenant may see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from eventstore.base import Envelope
from eventstore.events import UpdatePublished, UpdateWithdrawn
from projections.base import Projection, handles

SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)

# (major, minor, patch, is_release, pre-release identifiers as (0, number) | (1, text))
VersionKey = tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]


def semver_key(version: str) -> VersionKey | None:
    """The precedence key of a Semantic Version, or None when `version` is not one."""
    if len(version) > 128:
        return None
    m = SEMVER.match(version)
    if m is None:
        return None
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    ids = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (major, minor, patch, 0, ids)


@dataclass(slots=True)
class Update:
    id: str
    version: str
    key: VersionKey
    changelog: str
    sha256: str
    file_size: int
    filename: str
    tenant_ids: list[str] | None
    created_at: float
    withdrawn: bool = False
    withdrawn_at: float | None = None
    withdraw_reason: str | None = None

    def visible_to(self, tenant_id: str) -> bool:
        return self.tenant_ids is None or tenant_id in self.tenant_ids


@dataclass
class UpdatesProjection(Projection):
    name = "updates"
    updates: dict[str, Update] = field(default_factory=dict)
    # Not withdrawn, newest version first (then newest publication): `latest_for` walks it.
    available: list[Update] = field(default_factory=list)

    # Snapshots save `updates`; `available` holds the same objects and is derived from them.
    snapshot_version: ClassVar[int] = 1

    def snapshot(self) -> Any:
        return {"updates": self.updates}

    def restore(self, raw: bytes) -> None:
        self.updates = _snapshot_decoder.decode(raw).updates
        self.available = [u for u in self.updates.values() if not u.withdrawn]
        self._sort_available()

    def _sort_available(self) -> None:
        # stable: equal keys keep publication order, as the live list does
        self.available.sort(key=lambda u: (u.key, u.created_at), reverse=True)

    @handles(UpdatePublished)
    def _published(self, env: Envelope) -> None:
        e: UpdatePublished = env.event  # type: ignore[assignment]
        key = semver_key(e.version)
        if key is None:  # validated before recording; never let a bad event break replay
            key = (0, 0, 0, 0, ((1, e.version),))
        upd = Update(
            e.update_id,
            e.version,
            key,
            e.changelog,
            e.sha256,
            e.file_size,
            e.filename,
            list(e.tenant_ids) if e.tenant_ids is not None else None,
            env.ts,
        )
        old = self.updates.get(e.update_id)  # an id is never reused in practice; if it were,
        if old is not None and not old.withdrawn:  # the newer publication replaces the older
            self.available.remove(old)
        self.updates[e.update_id] = upd
        self.available.append(upd)
        self._sort_available()

    @handles(UpdateWithdrawn)
    def _withdrawn(self, env: Envelope) -> None:
        e: UpdateWithdrawn = env.event  # type: ignore[assignment]
        if (upd := self.updates.get(e.update_id)) is None or upd.withdrawn:
            return
        upd.withdrawn, upd.withdrawn_at, upd.withdraw_reason = True, env.ts, e.reason
        self.available.remove(upd)

    # --- queries ---

    def get(self, update_id: str) -> Update | None:
        return self.updates.get(update_id)

    def latest_for(self, tenant_id: str) -> Update | None:
        """The highest-versioned available update that `tenant_id` may see."""
        for upd in self.available:
            if upd.visible_to(tenant_id):
                return upd
        return None

    def conflicting(self, version: str, tenant_ids: list[str] | None) -> Update | None:
        """An available update of the same version whose audience overlaps `tenant_ids`."""
        for upd in self.available:
            if upd.version != version:
                continue
            if upd.tenant_ids is None or tenant_ids is None:
                return upd
            if set(upd.tenant_ids) & set(tenant_ids):
                return upd
        return None

    def find(
        self,
        version: str | None = None,
        tenant_id: str | None = None,
        withdrawn: bool | None = None,
    ) -> list[Update]:
        """Updates filtered by exact version, visibility to a tenant and withdrawal."""
        return [
            u
            for u in self.updates.values()
            if (version is None or u.version == version)
            and (tenant_id is None or u.visible_to(tenant_id))
            and (withdrawn is None or u.withdrawn == withdrawn)
        ]


class _Snapshot(msgspec.Struct):
    updates: dict[str, Update]


_snapshot_decoder = msgspec.msgpack.Decoder(_Snapshot)
