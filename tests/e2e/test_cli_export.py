"""`broker export` as a user runs it: the file is its owner's only, `--redact` leaves no secret
in it, and `broker import` refuses a redacted export before writing anything."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.services.eventlog import REDACTED, is_export_secret
from eventstore import open_store
from eventstore.base import StoreConfig
from eventstore.events import (
    EVENT_TYPES,
    LicenseIssued,
    MessageSent,
    NodeRegistered,
    TokenFamilyStarted,
    TokenRotated,
    UserCreated,
    UserPasswordChanged,
)
from tests.e2e.procs import one_line_error, run_broker

KEY_BODY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAsecretish"
PEM = f"-----BEGIN PUBLIC KEY-----\n{KEY_BODY}\n-----END PUBLIC KEY-----\n"
# Every value the log holds that a redacted export must not: hashes, key material, and
# secret-named values inside free-form fields.
SECRETS = {
    "pbkdf2$password-hash-1",
    "pbkdf2$password-hash-2",
    "refresh-hash-1",
    "refresh-hash-2",
    "license-hash-1",
    KEY_BODY,
    "meta-api-key",
    "nested-password",
    "content-token",
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)  # inherited by the broker processes started meanwhile
    try:
        yield
    finally:
        os.umask(old)


async def write_log(path: Path) -> None:
    """A log holding every kind of secret the broker records."""
    store = open_store(StoreConfig(path=str(path)))
    await store.open()
    try:
        await store.append(
            [
                UserCreated(
                    user_id="usr_1", username="alice", password_hash="pbkdf2$password-hash-1"
                ),
                UserPasswordChanged(user_id="usr_1", password_hash="pbkdf2$password-hash-2"),
                NodeRegistered(
                    node_id="node-1",
                    name="n1",
                    node_type="sensor",
                    public_key=PEM,
                    metadata={"api_key": "meta-api-key", "site": {"password": "nested-password"}},
                ),
                TokenFamilyStarted(
                    family_id="rtf:1",
                    subject_kind="user",
                    subject_id="usr_1",
                    token_hash="refresh-hash-1",
                    expires_at=2e9,
                ),
                TokenRotated(family_id="rtf:1", token_hash="refresh-hash-2", expires_at=2e9),
                LicenseIssued(
                    license_id="lic_1",
                    tenant_id="t1",
                    key_hash="license-hash-1",
                    key_last4="ABCD",
                    expires_at=2e9,
                ),
                MessageSent(
                    message_id="msg_1",
                    from_node="node-1",
                    to_nodes=("node-2",),
                    message_type="cfg",
                    content={"refresh_token": "content-token", "interval": 30},
                ),
            ]
        )
    finally:
        await store.close()


def test_export_is_readable_by_its_owner_only(data: Path, tmp_path: Path) -> None:
    r = run_broker(
        ["users", "create", "--username", "alice", "--password-stdin"], data, stdin="x" * 16
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "export.jsonl"
    with umask(0):
        r = run_broker(["export", "--out", str(out)], data)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "password_hash" in out.read_text()

    # An existing file, whatever its mode, is replaced by a new file of mode 0600.
    out.write_text("old\n")
    out.chmod(0o644)
    with umask(0):
        r = run_broker(["export", "--out", str(out)], data)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text().splitlines()[0])["type"] == "user.created"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "export.jsonl"]  # no .part


async def test_a_redacted_export_holds_no_secret_and_is_not_imported(
    data: Path, tmp_path: Path
) -> None:
    await write_log(data / "events.db")
    plain, redacted = tmp_path / "plain.jsonl", tmp_path / "redacted.jsonl"
    assert run_broker(["export", "--out", str(plain)], data).returncode == 0
    assert all(secret in plain.read_text() for secret in SECRETS)  # what --redact is for

    r = run_broker(["export", "--redact", "--out", str(redacted)], data)
    assert r.returncode == 0, r.stderr
    text = redacted.read_text()
    assert [s for s in SECRETS if s in text] == []
    assert stat.S_IMODE(redacted.stat().st_mode) == 0o600
    records = [json.loads(line) for line in text.splitlines()]
    by_type = {rec["type"]: rec["data"] for rec in records}
    assert by_type["user.created"]["password_hash"] == REDACTED
    assert by_type["user.created"]["username"] == "alice"  # the rest is kept
    assert by_type["node.registered"]["public_key"] == REDACTED
    assert by_type["node.registered"]["metadata"]["api_key"] == REDACTED
    assert by_type["node.registered"]["metadata"]["site"]["password"] == REDACTED
    assert by_type["token.family_started"]["token_hash"] == REDACTED
    assert by_type["license.issued"]["key_hash"] == REDACTED
    assert by_type["license.issued"]["key_last4"] == "ABCD"
    assert by_type["message.sent"]["content"] == {"refresh_token": REDACTED, "interval": 30}
    # Same events, same order: only values differ.
    assert [(x["seq"], x["type"]) for x in records] == [
        (x["seq"], x["type"]) for x in map(json.loads, plain.read_text().splitlines())
    ]

    other = tmp_path / "other"
    other.mkdir()
    r = run_broker(["import", str(redacted)], other)
    line = one_line_error(r)
    assert f"{redacted}:1:" in line and "--redact" in line
    assert run_broker(["replay"], other).stdout == ""  # nothing was imported
    r = run_broker(["import", str(plain)], other)  # the plain export still restores
    assert r.returncode == 0, r.stderr


def test_every_secret_field_of_every_event_is_redacted() -> None:
    """A new event field holding a hash, a token or key material must be covered by the export's
    redaction: this lists the ones that are, and the names that look secret but are not."""
    not_secret = {"idempotency_key", "key_last4", "challenge_id", "sha256", "key_id"}
    suspicious = ("hash", "token", "key", "secret", "password", "sha", "pem", "credential")
    for cls in EVENT_TYPES.values():
        for name in cls.__struct_fields__:
            if any(word in name for word in suspicious) and name not in not_secret:
                assert is_export_secret(name), f"{cls.__name__}.{name} is not redacted"
