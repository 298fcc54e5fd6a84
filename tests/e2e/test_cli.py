"""The `broker` command as a user runs it: real processes on a real log."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import requests

from tests.e2e.procs import free_port, one_line_error, run_broker, served
from tests.helpers.logfiles import tamper


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def create_user(data: Path, name: str, role: str = "admin") -> None:
    r = run_broker(
        ["users", "create", "--username", name, "--role", role, "--password-stdin"],
        data,
        stdin="correct horse battery\n",
    )
    assert r.returncode == 0, r.stderr
    assert f"created user {name}" in r.stdout


def test_users_create_then_replay_export_import_verify(data: Path, tmp_path: Path) -> None:
    create_user(data, "alice")
    create_user(data, "bob", "viewer")
    dup = run_broker(
        ["users", "create", "--username", "ALICE", "--password-stdin"], data, stdin="whatever12\n"
    )
    assert dup.returncode == 1 and "already exists" in dup.stderr

    r = run_broker(["replay"], data)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["type"] for x in lines] == ["user.created", "user.created"]
    assert [x["seq"] for x in lines] == [1, 2]
    assert lines[0]["data"]["username"] == "alice"
    assert "correct horse" not in r.stdout  # only the hash is stored

    r = run_broker(["replay", "--format", "table", "--type", "user.*", "--limit", "1"], data)
    assert r.returncode == 0 and "user.created" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 2  # header + 1 event

    r = run_broker(["replay", "--from-seq", "2", "--type", "node.*"], data)
    assert r.returncode == 0 and r.stdout == ""

    r = run_broker(["replay", "--rebuild"], data)
    assert r.returncode == 0, r.stderr
    assert "from 2 events" in r.stdout and "users: users=2" in r.stdout

    out = tmp_path / "export.jsonl"
    r = run_broker(["export", "--out", str(out)], data)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2

    other = tmp_path / "other"
    other.mkdir()
    r = run_broker(["import", str(out)], other)
    assert r.returncode == 0, r.stderr
    assert run_broker(["replay"], other).stdout == run_broker(["replay"], data).stdout
    r = run_broker(["verify"], other)
    assert r.returncode == 0 and "2 events" in r.stdout

    r = run_broker(["import", str(out)], other)  # not empty any more
    assert r.returncode == 1 and "not empty" in r.stderr


def test_verify_names_the_first_bad_seq(data: Path) -> None:
    for name in ("usr1", "usr2", "usr3"):
        create_user(data, name)
    tamper(data / "events.db", 2)
    r = run_broker(["verify"], data)
    assert r.returncode == 1
    assert "first bad seq 2" in r.stdout


def test_bad_config_and_bad_input_are_clear(data: Path, tmp_path: Path) -> None:
    r = run_broker(["serve"], data, BROKER_SERVER__PORT="not-a-port")
    assert r.returncode == 2 and "port" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    r = run_broker(["--config", str(bad), "verify"], data)
    assert r.returncode == 2 and "prot" in r.stderr
    r = run_broker(["verify"], tmp_path / "nowhere")
    assert r.returncode == 1 and "no log" in r.stderr
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{not json}\n")
    r = run_broker(["import", str(junk)], data)
    assert r.returncode == 1 and "junk.jsonl:1" in r.stderr


def test_server_holds_the_log_readers_work_beside_it(data: Path) -> None:
    create_user(data, "root")
    with served(data) as (base, _proc):
        r = run_broker(
            ["users", "create", "--username", "late", "--password-stdin"], data, stdin="x" * 12
        )
        assert r.returncode == 1 and "held for writing" in r.stderr
        assert run_broker(["verify"], data).returncode == 0
        assert run_broker(["replay"], data).stdout.count("user.created") == 1
        second = run_broker(["serve"], data)
        assert second.returncode == 1 and "held for writing" in second.stderr


def test_serve_refuses_a_corrupted_log(data: Path) -> None:
    create_user(data, "root")
    create_user(data, "other")
    tamper(data / "events.db", 1)
    r = run_broker(["serve"], data)
    assert r.returncode == 1
    assert "seq 1" in r.stderr and "integrity" in r.stderr


def test_another_applications_database_is_refused_by_every_command(data: Path) -> None:
    path = data / "events.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);")
    conn.execute("INSERT INTO invoices VALUES (1, 9.5)")
    conn.commit()
    conn.close()
    before = hashlib.sha256(path.read_bytes()).digest()
    for command in (["serve"], ["verify"]):
        r = run_broker(command, data, BROKER_SERVER__PORT=str(free_port()))
        assert r.returncode == 1, (command, r.stderr)
        assert "not an event log of this broker" in r.stderr, (command, r.stderr)
        assert "Traceback" not in r.stderr
    assert hashlib.sha256(path.read_bytes()).digest() == before


@pytest.mark.parametrize("loss", ["missing", "emptied", "shorter"])
def test_a_log_behind_its_snapshots_is_refused_with_one_clear_line(
    data: Path, tmp_path: Path, loss: str
) -> None:
    for name in ("usr1", "usr2", "usr3"):
        create_user(data, name)
    with served(data):
        pass  # stopping it writes a snapshot of the log's head
    snapshots = sorted((data / "snapshots").glob("snapshot-*.msgpack"))
    assert snapshots, "no snapshot written at shutdown"
    covered = int(snapshots[-1].name.split("-")[1].split(".")[0])
    log = data / "events.db"
    for extra in ("-wal", "-shm", ".head"):  # everything of the log goes
        log.with_name(log.name + extra).unlink(missing_ok=True)
    if loss == "missing":
        log.unlink()
        head = 0
    elif loss == "emptied":
        log.write_bytes(b"")
        head = 0
    else:  # replaced by an older copy
        other = tmp_path / "other"
        other.mkdir()
        create_user(other, "usr1")
        log.write_bytes((other / "events.db").read_bytes())
        head = 1
    before = log.read_bytes() if log.exists() else None
    expected = f"the log ends at seq {head} but snapshot {snapshots[-1]} covers up to seq {covered}"
    r = run_broker(["serve"], data, BROKER_SERVER__PORT=str(free_port()))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "restore it from backup" in lines[0]
    assert (log.read_bytes() if log.exists() else None) == before  # not created, not changed
    r = run_broker(["verify"], data)
    assert r.returncode == 1
    assert expected in r.stdout and "the log was lost or replaced" in r.stdout, r.stdout


def test_users_passwd_offline_lets_a_locked_out_admin_back_in(data: Path) -> None:
    create_user(data, "root")
    r = run_broker(
        ["users", "passwd", "--username", "root", "--password-stdin"],
        data,
        stdin="a brand new passphrase\n",
    )
    assert r.returncode == 0, r.stderr
    assert "password of root set" in r.stdout
    r = run_broker(
        ["users", "passwd", "--username", "ghost", "--password-stdin"], data, stdin="x" * 12
    )
    assert "no operator named ghost" in one_line_error(r)
    r = run_broker(
        ["users", "passwd", "--username", "root", "--password-stdin"], data, stdin="short\n"
    )
    assert "at least 8 characters" in one_line_error(r)
    with served(data) as (base, _proc):
        old = {"username": "root", "password": "correct horse battery"}
        assert requests.post(base + "/auth/login", data=old, timeout=30).status_code == 401
        new = {"username": "root", "password": "a brand new passphrase"}
        assert requests.post(base + "/auth/login", data=new, timeout=30).status_code == 200
