"""The tokens projection: refresh-token families, rotation, revocation, pruning."""

from __future__ import annotations

from eventstore.base import Envelope
from eventstore.events import (
    BaseEvent,
    NodeDeregistered,
    TokenFamilyRevoked,
    TokenFamilyStarted,
    TokenRotated,
    UserDeactivated,
)
from projections.base import Projections
from projections.tokens import TokensProjection


def fold(events: list[tuple[float, BaseEvent]]) -> TokensProjection:
    projection = TokensProjection()
    all_ = Projections([projection])
    versions: dict[str, int] = {}
    for seq, (ts, event) in enumerate(events, 1):
        versions[event.stream] = versions.get(event.stream, 0) + 1
        all_.apply(Envelope(seq, event.stream, versions[event.stream], ts, f"e{seq}", event))
    return projection


def started(fam: str, kind: str = "node", sub: str = "n1", exp: float = 1000.0) -> BaseEvent:
    return TokenFamilyStarted(
        family_id=fam, subject_kind=kind, subject_id=sub, token_hash=f"h-{fam}", expires_at=exp
    )


def test_rotation_keeps_only_the_current_hash() -> None:
    p = fold(
        [
            (1.0, started("rtf:1")),
            (2.0, TokenRotated(family_id="rtf:1", token_hash="h2", expires_at=2000.0)),
        ]
    )
    fam = p.get("rtf:1")
    assert fam is not None
    assert fam.token_hash == "h2" and fam.expires_at == 2000.0 and fam.rotations == 1
    assert fam.version == 2 and fam.live(1999.0) and not fam.live(2000.0)


def test_revocations_by_event_deregistration_and_deactivation() -> None:
    p = fold(
        [
            (1.0, started("rtf:1")),
            (1.0, started("rtf:2")),
            (1.0, started("rtf:3", kind="user", sub="usr_1")),
            (1.0, started("rtf:4", sub="n2")),
            (2.0, TokenFamilyRevoked(family_id="rtf:1", reason="logout")),
            (3.0, NodeDeregistered(node_id="n1")),
            (4.0, UserDeactivated(user_id="usr_1")),
            (5.0, TokenRotated(family_id="rtf:2", token_hash="late", expires_at=9.0)),
        ]
    )
    reasons = {f: p.families[f].revoked_reason for f in p.families}
    assert reasons == {
        "rtf:1": "logout",
        "rtf:2": "deregistered",
        "rtf:3": "deactivated",
        "rtf:4": "",
    }
    assert p.families["rtf:2"].token_hash == "h-rtf:2"  # a revoked family is not rotated
    assert [f.family_id for f in p.live_families("node", "n2", 10.0)] == ["rtf:4"]
    assert p.live_families("node", "n1", 10.0) == []


def test_expired_families_are_pruned_when_the_subject_logs_in_again() -> None:
    p = fold(
        [
            (1.0, started("rtf:old", exp=10.0)),
            (2.0, TokenFamilyRevoked(family_id="rtf:old", reason="logout")),
            (5.0, started("rtf:mid", exp=100.0)),
            (20.0, started("rtf:new", exp=200.0)),
        ]
    )
    assert set(p.families) == {"rtf:mid", "rtf:new"}  # the revoked one stayed until expiry
    assert list(p.by_subject[("node", "n1")]) == ["rtf:mid", "rtf:new"]
    assert [f.family_id for f in p.live_families("node", "n1", 50.0)] == ["rtf:mid", "rtf:new"]
