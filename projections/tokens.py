"""Refresh-token families: the current token of each login (as a hash), rotations, revocations.

A family is one login; each refresh rotates its token. Only the hash of the current refresh token
is kept: a validly signed refresh token of a family whose hash is not the current one has been
rotated out, so presenting it is reuse, and the broker revokes the family. A revoked family stays
known (a tombstone) until its last token would have expired, so access tokens carrying its id keep
failing; expired families are dropped when their subject starts a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from eventstore.base import Envelope
from eventstore.events import (
    NodeDeregistered,
    TokenFamilyRevoked,
    TokenFamilyStarted,
    TokenRotated,
    UserDeactivated,
)
from projections.base import Projection, handles

Subject = tuple[str, str]  # (kind, id): ("node", "node-1") or ("user", "usr_...")


class Family(msgspec.Struct, gc=False):
    """A refresh-token family (one login). A msgspec Struct, as `Node` is: snapshots decode them
    by the hundred thousand."""

    family_id: str
    subject_kind: str
    subject_id: str
    token_hash: str
    expires_at: float
    started_at: float
    version: int  # stream version of the family, for optimistic rotation
    rotated_at: float | None = None
    rotations: int = 0
    revoked_at: float | None = None
    revoked_reason: str = ""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def live(self, now: float) -> bool:
        return self.revoked_at is None and self.expires_at > now


@dataclass
class TokensProjection(Projection):
    name = "tokens"
    families: dict[str, Family] = field(default_factory=dict)
    # subject -> its family ids, oldest first (a dict used as an ordered set)
    by_subject: dict[Subject, dict[str, None]] = field(default_factory=dict)

    # Snapshots save the families in slices (one per login: a million in a big fleet); the
    # index by subject is derived from them, in their order, at load.
    snapshot_version: ClassVar[int] = 1
    record_type: ClassVar[type] = Family

    def records(self) -> dict[str, Family]:
        return self.families

    def snapshot(self) -> Any:
        return {}

    def restore_sliced(self, records: dict[str, Any], raw: bytes) -> None:
        self.families, self.by_subject = records, {}
        for family_id, fam in records.items():
            subject = (fam.subject_kind, fam.subject_id)
            self.by_subject.setdefault(subject, {})[family_id] = None

    def _changing(self, family_id: str, env: Envelope) -> Family | None:
        """The family an event of its stream changes (marked dirty, at the event's version);
        None if it is gone."""
        fam = self.families.get(family_id)
        if fam is not None:
            self.mark_dirty(family_id)
            fam.version = env.stream_version
        return fam

    # --- apply ---

    @handles(TokenFamilyStarted)
    def _started(self, env: Envelope) -> None:
        e: TokenFamilyStarted = env.event  # type: ignore[assignment]
        subject = (e.subject_kind, e.subject_id)
        self._prune(subject, env.ts)
        old = self.families.get(e.family_id)  # an id is never started twice in practice (its
        if old is not None:  # stream starts at version 0); if it were, the newer start wins
            self._unindex(old)
        self.families[e.family_id] = Family(
            family_id=e.family_id,
            subject_kind=e.subject_kind,
            subject_id=e.subject_id,
            token_hash=e.token_hash,
            expires_at=e.expires_at,
            started_at=env.ts,
            version=env.stream_version,
        )
        self.by_subject.setdefault(subject, {})[e.family_id] = None
        self.mark_dirty(e.family_id)

    @handles(TokenRotated)
    def _rotated(self, env: Envelope) -> None:
        e: TokenRotated = env.event  # type: ignore[assignment]
        fam = self._changing(e.family_id, env)
        if fam is None or fam.revoked:
            return
        fam.token_hash = e.token_hash
        fam.expires_at = e.expires_at
        fam.rotated_at = env.ts
        fam.rotations += 1

    @handles(TokenFamilyRevoked)
    def _revoked(self, env: Envelope) -> None:
        e: TokenFamilyRevoked = env.event  # type: ignore[assignment]
        if (fam := self._changing(e.family_id, env)) is not None:
            self._revoke(fam, env.ts, e.reason)

    @handles(NodeDeregistered)
    def _node_gone(self, env: Envelope) -> None:
        e: NodeDeregistered = env.event  # type: ignore[assignment]
        self._revoke_subject(("node", e.node_id), env.ts, "deregistered")

    @handles(UserDeactivated)
    def _user_gone(self, env: Envelope) -> None:
        e: UserDeactivated = env.event  # type: ignore[assignment]
        self._revoke_subject(("user", e.user_id), env.ts, "deactivated")

    def _revoke(self, fam: Family, ts: float, reason: str) -> None:
        if fam.revoked_at is None:
            fam.revoked_at = ts
            fam.revoked_reason = reason
            self.mark_dirty(fam.family_id)

    def _revoke_subject(self, subject: Subject, ts: float, reason: str) -> None:
        for family_id in self.by_subject.get(subject, ()):
            self._revoke(self.families[family_id], ts, reason)

    def _prune(self, subject: Subject, ts: float) -> None:
        """Forget the subject's families whose last refresh token has expired by `ts`."""
        ids = self.by_subject.get(subject)
        if not ids:
            return
        for family_id in [f for f in ids if self.families[f].expires_at <= ts]:
            self._unindex(self.families.pop(family_id))
            self.mark_dirty(family_id)

    def _unindex(self, fam: Family) -> None:
        """Take `fam` out of its subject's families; a subject with none left goes (so the
        index is exactly what `restore_sliced` derives from the families)."""
        subject = (fam.subject_kind, fam.subject_id)
        ids = self.by_subject.get(subject)
        if ids is not None:
            ids.pop(fam.family_id, None)
            if not ids:
                del self.by_subject[subject]

    # --- queries ---

    def get(self, family_id: str) -> Family | None:
        return self.families.get(family_id)

    def live_families(self, kind: str, subject_id: str, now: float) -> list[Family]:
        """The subject's families that are neither revoked nor expired at `now`, oldest first."""
        ids = self.by_subject.get((kind, subject_id), {})
        return [f for f in (self.families[i] for i in ids) if f.live(now)]
