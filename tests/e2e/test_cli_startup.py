"""Start-up mistakes a user makes (a port already taken, a data directory or log path that cannot
be used): one line on stderr, a non-zero exit, no traceback, and nothing opened first."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.e2e.procs import one_line_error, run_broker


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "somefile"
    f.write_text("not a directory\n")
    return f


def test_serve_on_a_port_already_taken_fails_before_opening_the_log(data: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_broker(["serve"], data, BROKER_SERVER__PORT=str(port))
    line = one_line_error(r)
    assert line == f"broker: cannot listen on 127.0.0.1:{port}: address already in use"
    assert not (data / "events.db").exists()  # refused before the log was opened


def test_serve_with_the_data_directory_under_a_regular_file(data: Path, a_file: Path) -> None:
    r = run_broker(["serve"], data, BROKER_SERVER__DATA_DIR=str(a_file / "data"))
    line = one_line_error(r)
    assert str(a_file / "data") in line and f"{a_file} is not a directory" in line


def test_serve_with_a_data_directory_that_is_a_regular_file(data: Path, a_file: Path) -> None:
    r = run_broker(["serve"], data, BROKER_SERVER__DATA_DIR=str(a_file))
    assert f"{a_file} is not a directory" in one_line_error(r)


def _unwritable_directory(tmp_path: Path) -> Path:
    """An existing directory in which this user cannot create files. The tests may run as root,
    whom mode bits do not stop: then a sysfs directory (read-only or permission-checked even for
    root); as another user, a directory of mode 0500."""
    if os.geteuid() != 0:
        d = tmp_path / "readonly"
        d.mkdir(mode=0o500)
        return d
    for candidate in (Path("/sys/kernel"), Path("/sys")):
        if candidate.is_dir():
            try:
                os.close(os.open(candidate / ".broker-test", os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError:
                return candidate
            os.unlink(candidate / ".broker-test")
    pytest.skip("running as root without a directory root cannot write in (no /sys)")


def test_serve_with_an_unwritable_data_directory(data: Path, tmp_path: Path) -> None:
    where = _unwritable_directory(tmp_path)
    r = run_broker(["serve"], data, BROKER_SERVER__DATA_DIR=str(where))
    assert f"cannot write in the data directory {where}" in one_line_error(r)


@pytest.mark.parametrize(
    "command",
    [["serve"], ["users", "create", "--username", "root", "--password-stdin"], ["import", "-"]],
    ids=["serve", "users-create", "import"],
)
def test_a_log_path_under_a_regular_file(
    command: list[str], data: Path, a_file: Path, tmp_path: Path
) -> None:
    export = tmp_path / "empty.jsonl"
    export.write_text("")
    args = [str(export) if a == "-" else a for a in command]
    r = run_broker(
        args, data, stdin="correct horse battery\n", BROKER_STORE__PATH=str(a_file / "events.db")
    )
    line = one_line_error(r)
    assert f"cannot use {a_file} as the log's directory: {a_file} is not a directory" in line


def test_serve_with_an_unwritable_log_directory(data: Path, tmp_path: Path) -> None:
    where = _unwritable_directory(tmp_path)
    r = run_broker(["serve"], data, BROKER_STORE__PATH=str(where / "events.db"))
    assert f"cannot write in the log's directory {where}" in one_line_error(r)


def test_serve_with_a_signing_key_that_is_a_directory(data: Path, tmp_path: Path) -> None:
    r = run_broker(["serve"], data, BROKER_AUTH__KEY_FILE=str(tmp_path))
    assert f"the token signing key {tmp_path} is not a file" in one_line_error(r)


def test_a_start_that_fails_after_the_log_is_open_exits(data: Path) -> None:
    """The signing key is read after the log is opened and replayed: a key file that holds no
    key fails the start there. The process says so in one line and exits (it used to print a
    traceback and then hang for ever on the log's threads: run_broker's timeout bounds it)."""
    r = run_broker(["users", "create", "--username", "root", "--password-stdin"], data, "x" * 12)
    assert r.returncode == 0, r.stderr
    (data / "jwt_ed25519.pem").write_text("not a key\n")
    r = run_broker(["serve"], data)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"broker: cannot use the token signing key {data / 'jwt_ed25519.pem'} ([auth] key_file): "
        "not an Ed25519 key in PEM"
    ]
