"""`broker ctl`: a client for a running server, authenticated by an API key.

    broker ctl [--server URL] [--api-key KEY] [--json] COMMAND ...

The server defaults to $BROKER_URL or http://127.0.0.1:8000, the key to $BROKER_API_KEY (a key
on the command line shows in `ps`: prefer the variable). Output is a table; `--json` prints the
server's JSON (one document, or one event per line for `tail`). An error is one line on stderr
and exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp

from broker.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE

DEFAULT_SERVER = "http://127.0.0.1:8000"


class CtlError(Exception):
    """A request failed; the message says why, in one line."""


class Client:
    def __init__(self, session: aiohttp.ClientSession, server: str, key: str) -> None:
        self.session, self.server, self.key = session, server.rstrip("/"), key

    async def call(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        query = {
            k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in (params or {}).items()
            if v is not None
        }
        try:
            async with self.session.request(
                method,
                self.server + path,
                json=json_body,
                params=query,
                headers={"X-API-Key": self.key},
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise CtlError(_error_line(resp.status, body))
                if resp.status == 204 or not body:
                    return None
                return json.loads(body)
        except aiohttp.ClientError as exc:
            raise CtlError(f"cannot reach {self.server}: {exc}") from None


def _error_line(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
        err = doc.get("error") or {}
        return f"{status} {err.get('code', '')}: {err.get('message') or doc.get('message')}"
    except (ValueError, AttributeError):
        return f"{status}: {body[:200].decode(errors='replace')}"


# --- output ---


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, list):
            return ",".join(map(str, v)) or "-"
        if isinstance(v, dict):
            return json.dumps(v, separators=(",", ":"))
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def show(args: argparse.Namespace, doc: Any, columns: Sequence[str], items: str = "items") -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    if isinstance(doc, dict) and isinstance(doc.get(items), list):
        print(table(doc[items], columns))
        total = doc.get("total")
        if total is not None and total > len(doc[items]):
            print(f"({len(doc[items])} of {total}; --limit and --skip page through them)")
    elif isinstance(doc, dict):
        width = max(map(len, doc), default=0)
        for k, v in doc.items():
            text = json.dumps(v) if isinstance(v, dict | list) else ("-" if v is None else v)
            print(f"{k.ljust(width)}  {text}")
    else:
        print(doc)


# --- commands ---

Command = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, None]]
NODE_COLUMNS = ("node_id", "name", "type", "status", "presence", "capabilities", "last_seen")


async def nodes(c: Client, a: argparse.Namespace) -> None:
    if a.node_id:
        show(a, await c.call("GET", f"/api/v1/nodes/{a.node_id}"), NODE_COLUMNS)
        return
    params = {
        "type": a.type,
        "capabilities": a.capability,
        "region": a.region,
        "status": a.status,
        "presence": a.presence,
        "limit": a.limit,
        "skip": a.skip,
    }
    show(a, await c.call("GET", "/api/v1/nodes", params=params), NODE_COLUMNS, items="nodes")


async def send(c: Client, a: argparse.Namespace) -> None:
    try:
        content = json.loads(a.content)
    except ValueError:
        content = a.content  # not JSON: sent as a string
    body = {
        "to_nodes": a.to.split(","),
        "message_type": a.type,
        "content": content,
        "priority": a.priority,
        "ttl": a.ttl,
    }
    show(a, await c.call("POST", "/api/v1/messages/send", json_body=body), ())


async def tail(c: Client, a: argparse.Namespace) -> None:
    """The live feed (operators' WebSocket): history from --from-seq, then live events."""
    url = c.server.replace("http", "ws", 1) + "/ws"
    seen = 0
    try:
        async with c.session.ws_connect(url, headers={"X-API-Key": c.key}) as ws:
            sub = {"type": "subscribe", "from_seq": a.from_seq, "types": a.type or None}
            await ws.send_json(sub)
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                if frame["type"] == "error":
                    raise CtlError(f"{frame['error']['code']}: {frame['error']['message']}")
                if frame["type"] != "event":
                    continue
                if a.json:
                    print(json.dumps(frame), flush=True)
                else:
                    data = json.dumps(frame.get("data"), separators=(",", ":"))
                    print(f"{frame['seq']:>8}  {frame['event']:<24} {frame['stream']}  {data}")
                    sys.stdout.flush()
                seen += 1
                if a.limit and seen >= a.limit:
                    return
    except aiohttp.WSServerHandshakeError as exc:
        raise CtlError(f"{exc.status}: the feed refused the connection") from None
    except aiohttp.ClientError as exc:
        raise CtlError(f"cannot reach {c.server}: {exc}") from None


async def dead_letters(c: Client, a: argparse.Namespace) -> None:
    if a.action == "redrive":
        if not (a.message_id and a.node_id):
            raise CtlError("dead-letters redrive needs MESSAGE_ID NODE_ID")
        body = {"message_id": a.message_id, "node_id": a.node_id, "ttl": a.ttl}
        show(a, await c.call("POST", "/api/v1/messages/dead-letters/redrive", json_body=body), ())
        return
    doc = await c.call("GET", "/api/v1/messages/dead-letters")
    if not a.json:
        for item in doc["items"]:
            item["message_type"] = item["message"].get("message_type")
    show(a, doc, ("message_id", "node_id", "message_type", "reason", "attempts", "at"))


USER_COLUMNS = ("id", "username", "email", "roles", "is_active", "last_login")


async def users(c: Client, a: argparse.Namespace) -> None:
    if a.action == "list":
        params = {"search": a.search, "limit": a.limit, "skip": a.skip}
        show(a, await c.call("GET", "/admin/users", params=params), USER_COLUMNS)
        return
    if not a.username:
        raise CtlError(f"users {a.action} needs a USERNAME")
    if a.action == "deactivate":
        show(a, await c.call("POST", f"/admin/users/{a.username}/deactivate"), ())
        return
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CtlError("give the password on standard input")
    if a.action == "create":
        body = {
            "username": a.username,
            "email": a.email,
            "password": password,
            "roles": a.role or ["viewer"],
        }
        show(a, await c.call("POST", "/admin/users", json_body=body), ())
    else:  # passwd
        body = {"password": password, "force_change": a.force_change}
        show(a, await c.call("POST", f"/admin/users/{a.username}/password", json_body=body), ())


async def licenses(c: Client, a: argparse.Namespace) -> None:
    params = {"limit": a.limit, "skip": a.skip}
    doc = await c.call("GET", "/api/v1/admin/licenses", params=params)
    columns = ("id", "tenant_name", "key_last4", "status", "usage_count", "expires_at")
    show(a, doc, columns)


async def api_keys(c: Client, a: argparse.Namespace) -> None:
    if a.action == "create":
        if not (a.name and a.scope):
            raise CtlError("api-keys create needs --name and at least one --scope")
        body = {"name": a.name, "scopes": a.scope, "expires_in": a.expires_in}
        doc = await c.call("POST", "/api/v1/admin/api-keys", json_body=body)
        show(a, doc, ())
        if not a.json:
            print("\nthe key is shown once: keep it now", file=sys.stderr)
    elif a.action == "revoke":
        if not a.key_id:
            raise CtlError("api-keys revoke needs a KEY_ID")
        await c.call("DELETE", f"/api/v1/admin/api-keys/{a.key_id}")
        show(a, {"id": a.key_id, "status": "revoked"}, ())
    else:
        doc = await c.call("GET", "/api/v1/admin/api-keys", params={"limit": a.limit})
        show(a, doc, ("id", "name", "owner", "scopes", "status", "last_used_at", "expires_at"))


# --- parsing ---


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--skip", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker ctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default=os.environ.get("BROKER_URL", DEFAULT_SERVER))
    parser.add_argument("--api-key", default=None, help="default: $BROKER_API_KEY")
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("nodes", help="list nodes (filters), or show one")
    p.add_argument("node_id", nargs="?", help="show this node")
    p.add_argument("--type")
    p.add_argument("--capability", help="comma-separated; every one is required")
    p.add_argument("--region")
    p.add_argument("--status")
    p.add_argument("--presence", choices=("online", "stale", "offline"))
    _paging(p)
    p.set_defaults(run=nodes)

    p = sub.add_parser("send", help="send a message to nodes")
    p.add_argument("--to", required=True, help="node ids, comma-separated")
    p.add_argument("--type", required=True, help="message type")
    p.add_argument("--content", default="null", help="JSON (or a plain string)")
    p.add_argument("--priority", default="normal", choices=("critical", "high", "normal", "low"))
    p.add_argument("--ttl", type=float, default=None, help="seconds")
    p.set_defaults(run=send)

    p = sub.add_parser("tail", help="follow the event log (history from --from-seq, then live)")
    p.add_argument("--from-seq", type=int, default=None, help="default: live events only")
    p.add_argument("--type", action="append", help="event type or pattern (node.*); repeatable")
    p.add_argument("--limit", type=int, default=None, help="stop after this many events")
    p.set_defaults(run=tail)

    p = sub.add_parser("dead-letters", help="list dead letters, or redrive one")
    p.add_argument("action", nargs="?", choices=("list", "redrive"), default="list")
    p.add_argument("message_id", nargs="?")
    p.add_argument("node_id", nargs="?")
    p.add_argument("--ttl", type=float, default=None)
    p.set_defaults(run=dead_letters)

    p = sub.add_parser("users", help="operators: list, create, deactivate, passwd")
    p.add_argument("action", choices=("list", "create", "deactivate", "passwd"))
    p.add_argument("username", nargs="?", help="(create, deactivate, passwd; password on stdin)")
    p.add_argument("--email")
    p.add_argument("--role", action="append", help="repeatable (create; default viewer)")
    p.add_argument("--force-change", action="store_true", help="(passwd) at next login")
    p.add_argument("--search")
    _paging(p)
    p.set_defaults(run=users)

    p = sub.add_parser("licenses", help="list licenses")
    _paging(p)
    p.set_defaults(run=licenses)

    p = sub.add_parser("api-keys", help="API keys: list, create, revoke")
    p.add_argument("action", nargs="?", choices=("list", "create", "revoke"), default="list")
    p.add_argument("key_id", nargs="?", help="(revoke)")
    p.add_argument("--name")
    p.add_argument("--scope", action="append", help="a permission name; repeatable")
    p.add_argument("--expires-in", type=int, default=90 * 86400, help="seconds (default 90 days)")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(run=api_keys)
    return parser


async def _run(args: argparse.Namespace, key: str) -> None:
    timeout = aiohttp.ClientTimeout(total=None if args.command == "tail" else 60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await args.run(Client(session, args.server, key), args)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    key = args.api_key or os.environ.get("BROKER_API_KEY", "")
    if not key:
        print("broker ctl: give an API key: --api-key or BROKER_API_KEY", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(_run(args, key))
    except CtlError as exc:
        print(f"broker ctl: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return EXIT_OK
