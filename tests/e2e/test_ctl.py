"""`broker ctl` against a started `broker serve` (issue 20), as an operator's scripts use it: an
API key from the environment, tables by default, --json for scripts, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from tests.broker.identity.helpers import public_pem, rsa_key
from tests.e2e.procs import run_broker, served
from tests.e2e.test_cli import create_user


def test_ctl_against_a_running_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    create_user(data, "root")
    with served(data) as (base, _proc):
        login = {"username": "root", "password": "correct horse battery"}
        token = requests.post(base + "/auth/login", data=login, timeout=30).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        scopes = ["nodes:read", "messages:send", "messages:read_any", "events:read"]
        scopes += ["users:admin", "licenses:admin"]
        resp = requests.post(
            base + "/api/v1/admin/api-keys",
            json={"name": "ctl", "scopes": scopes},
            headers=auth,
            timeout=30,
        )
        assert resp.status_code == 201, resp.text
        key = resp.json()["key"]
        resp = requests.post(
            base + "/api/v1/auth/register",
            json={
                "node_id": "node-1",
                "name": "One",
                "type": "gateway",
                "capabilities": ["routing"],
                "public_key": public_pem(rsa_key(0)),
            },
            timeout=30,
        )
        assert resp.status_code == 201, resp.text

        def ctl(*args: str, stdin: str = "", key: str = key) -> tuple[int, str, str]:
            r = run_broker(["ctl", *args], data, stdin=stdin, BROKER_URL=base, BROKER_API_KEY=key)
            assert "Traceback" not in r.stderr, r.stderr
            return r.returncode, r.stdout, r.stderr

        code, out, _ = ctl("nodes")
        assert code == 0
        header, row = out.splitlines()[:2]
        assert header.split()[:3] == ["NODE_ID", "NAME", "TYPE"] and row.startswith("node-1")
        code, out, _ = ctl("--json", "nodes", "--type", "gateway", "--capability", "routing")
        assert [n["node_id"] for n in json.loads(out)["nodes"]] == ["node-1"]
        code, out, _ = ctl("--json", "nodes", "--type", "sensor")
        assert json.loads(out)["nodes"] == []
        code, out, _ = ctl("nodes", "node-1")
        assert code == 0 and "gateway" in out

        code, out, _ = ctl("--json", "send", "--to", "node-1", "--type", "greet", "--content", "{}")
        assert code == 0, out
        message_id = json.loads(out)["message_id"]
        code, out, _ = ctl(
            "--json", "tail", "--from-seq", "1", "--type", "message.*", "--limit", "1"
        )
        assert code == 0
        [line] = out.splitlines()
        event = json.loads(line)
        assert event["event"] == "message.sent" and event["stream"] == message_id
        code, out, _ = ctl("tail", "--from-seq", "1", "--type", "node.registered", "--limit", "1")
        assert "node.registered" in out and "node-1" in out

        code, out, _ = ctl("dead-letters")
        assert code == 0 and out.split()[:2] == ["MESSAGE_ID", "NODE_ID"]
        code, out, err = ctl("dead-letters", "redrive", message_id, "node-1")
        assert code == 1 and "404" in err

        code, out, _ = ctl("users", "create", "carol", "--role", "viewer", stdin="carol-password\n")
        assert code == 0 and "carol" in out
        code, out, _ = ctl("--json", "users", "list")
        assert {u["username"] for u in json.loads(out)["items"]} == {"root", "carol"}
        code, out, _ = ctl("users", "passwd", "carol", "--force-change", stdin="carol-reset-pw\n")
        assert code == 0 and "must_change_password  True" in out
        code, out, _ = ctl("users", "deactivate", "carol")
        assert code == 0 and "is_active  False" in out

        code, out, _ = ctl("licenses")
        assert code == 0 and out.split()[0] == "ID"

        code, out, _ = ctl("--json", "api-keys", "create", "--name", "tmp", "--scope", "nodes:read")
        assert code == 0
        created = json.loads(out)
        code, out, _ = ctl("api-keys")
        assert "tmp" in out and created["key"] not in out
        assert ctl("nodes", key=created["key"])[0] == 0
        code, out, _ = ctl("api-keys", "revoke", created["id"])
        assert code == 0
        code, out, err = ctl("nodes", key=created["key"])
        assert code == 1 and err.strip() == "broker ctl: 401 AUTHENTICATION_ERROR: API key revoked"
        # refused on every command, in one line
        code, out, err = ctl("users", "list", key=created["key"])
        assert code == 1 and err.startswith("broker ctl: 401")

    code, out, err = ctl("nodes")  # the server is gone
    assert code == 1 and "cannot reach" in err
    r = run_broker(["ctl", "nodes"], data)  # no key at all
    assert r.returncode == 2 and "API key" in r.stderr
