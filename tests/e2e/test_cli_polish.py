"""The `broker` command's surface: --version, serve --host/--port, help on every flag, and values
outside a fixed set refused with the list of valid ones (configuration and arguments)."""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

from broker import __version__
from broker.cli.main import build_parser
from eventstore.events import EVENT_TYPES
from tests.e2e.procs import free_port, run_broker, served


def test_version(tmp_path: Path) -> None:
    r = run_broker(["--version"], tmp_path / "data")
    assert r.returncode == 0 and r.stdout.strip() == f"broker {__version__}"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _parsers(sub)
    return found


def test_every_flag_has_help() -> None:
    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in _parsers(build_parser())
        for a in p._actions
        if not a.help and not isinstance(a, argparse._SubParsersAction)
    ]
    assert not missing, missing


def test_unknown_log_level_is_refused_with_the_valid_ones(tmp_path: Path) -> None:
    r = run_broker(["verify"], tmp_path / "data", BROKER_LOG__LEVEL="verbose")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "broker: [log] level must be one of debug, info, warning, error, critical, not 'verbose'"
    )
    # any case of a valid one is fine
    r = run_broker(["replay", "--limit", "1"], tmp_path / "data", BROKER_LOG__LEVEL="WARNING")
    assert r.returncode == 1 and "no log at" in r.stderr


def test_unknown_event_type_is_refused_with_the_valid_ones(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for bad in (["--type", "bogus.type"], ["--type", "node.registered,nope.*"]):
        r = run_broker(["replay", *bad], data)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert "argument --type: unknown event type" in last
        assert all(name in last for name in EVENT_TYPES)
    # names and patterns that match are accepted (then: no log here yet)
    r = run_broker(["replay", "--type", "node.*,user.created", "--type", "message.sent"], data)
    assert r.returncode == 1 and "no log at" in r.stderr


def test_serve_host_and_port_override_the_configuration(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    # the configuration names an address this machine does not have: only the flags can work
    args = ["--host", "127.0.0.1", "--port", str(port)]
    with served(
        data, port, args=args, BROKER_SERVER__HOST="203.0.113.7", BROKER_SERVER__PORT="1"
    ) as (base, proc):
        with urllib.request.urlopen(f"{base}/health", timeout=30) as resp:
            assert json.load(resp)["status"] == "healthy"
        started = [json.loads(line) for line in proc.log if line.startswith("{")]  # type: ignore[attr-defined]
        queue = next(e for e in started if e["event"] == "delivery_queue")
        assert queue["implementation"] in ("compiled", "pure-python") and queue["module"]


def test_serve_refuses_a_bad_port(tmp_path: Path) -> None:
    r = run_broker(["serve", "--port", "70000"], tmp_path / "data")
    assert r.returncode == 1 and r.stderr.strip() == "broker: --port must be 0..65535, not 70000"


def test_an_unknown_role_is_refused_with_the_roles(tmp_path: Path) -> None:
    args = ["users", "create", "--username", "ann", "--role", "wizard", "--password-stdin"]
    r = run_broker(args, tmp_path / "data", "correct horse battery\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown role(s): wizard; roles: " in r.stderr
    assert all(role in r.stderr for role in ("admin", "viewer"))
