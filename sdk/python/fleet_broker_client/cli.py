"""`fleet-node` (also `broker node`): a node from the command line.

    fleet-node init --server URL --id ID [--type T] [--capabilities a,b] [--region R] [--state DIR]
    fleet-node send --to ID[,ID…] --type T --content JSON [--priority P] [--ttl S]
    fleet-node listen          one JSON line per message, acknowledged once printed
    fleet-node heartbeat [--every S]
    fleet-node status [--set STATUS] [--load L]
    fleet-node nodes [--type T] [--capabilities a,b] [--region R] [--online]

The state directory (`--state`, default `$FLEET_NODE_STATE` or `./.fleet-node`, mode 0700)
holds the node's key (`key.pem`), its settings (`node.json`) and its login (`session.json`),
each of mode 0600. Commands run at the same time (a `listen` and a `send`) share the login.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from fleet_broker_client.errors import ApiError, BrokerClientError, TransportError
from fleet_broker_client.node import Node
from fleet_broker_client.session import write_private

PROG = "fleet-node"


class Settings(msgspec.Struct, kw_only=True):
    server: str
    node_id: str
    name: str | None = None
    type: str = "node"
    capabilities: list[str] = []
    region: str | None = None


class UsageError(Exception):
    pass


def _state(args: argparse.Namespace) -> Path:
    return Path(args.state or os.environ.get("FLEET_NODE_STATE") or ".fleet-node")


def _node(state: Path, settings: Settings) -> Node:
    return Node(
        settings.server,
        settings.node_id,
        key_file=state / "key.pem",
        name=settings.name,
        type=settings.type,
        capabilities=settings.capabilities,
        region=settings.region,
        session_file=state / "session.json",
    )


def _load(state: Path) -> Node:
    try:
        settings = msgspec.json.decode((state / "node.json").read_bytes(), type=Settings)
    except FileNotFoundError:
        raise UsageError(f"no node in {state}: run `{PROG} init` first") from None
    return _node(state, settings)


def _print(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


async def cmd_init(args: argparse.Namespace) -> int:
    state = _state(args)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    settings = Settings(
        server=args.server,
        node_id=args.id,
        name=args.name,
        type=args.type,
        capabilities=_csv(args.capabilities),
        region=args.region,
    )
    write_private(state / "node.json", msgspec.json.encode(settings))
    async with _node(state, settings) as node:
        info = await node.register()
        await node.login()
        _print(info)
    return 0


async def cmd_send(args: argparse.Namespace) -> int:
    try:
        content = json.loads(args.content)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--content is not JSON: {exc}") from None
    async with _load(_state(args)) as node:
        result = await node.send(
            _csv(args.to),
            args.type,
            content,
            priority=args.priority,
            ttl=args.ttl,
            idempotency_key=args.idempotency_key,
        )
        print(result.message_id, flush=True)
    return 0


async def cmd_listen(args: argparse.Namespace) -> int:
    async with _load(_state(args)) as node:
        failures = 0
        backoff = node.reconnect
        while True:  # for ever: the receiver reconnects; this restarts it after worse
            try:
                async for msg in node.messages(transport="poll" if args.poll else "auto"):
                    failures = 0
                    _print(
                        {
                            "id": msg.id,
                            "from_node": msg.from_node,
                            "message_type": msg.message_type,
                            "priority": msg.priority,
                            "content": msg.content,
                        }
                    )
            except (TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and not exc.retryable:
                    raise
                print(f"{PROG}: {exc}; reconnecting", file=sys.stderr, flush=True)
                await asyncio.sleep(backoff.delay(failures))
                failures += 1


async def cmd_heartbeat(args: argparse.Namespace) -> int:
    async with _load(_state(args)) as node:
        if args.every is None:
            _print(await node.heartbeat(args.status))
            return 0
        await node.run_heartbeats(args.every, status=args.status, on_beat=_print)
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    async with _load(_state(args)) as node:
        if args.set is None and args.load is None:
            _print(await node.get_node())
        else:
            _print(await node.update_status(status=args.set, load=args.load))
    return 0


async def cmd_nodes(args: argparse.Namespace) -> int:
    async with _load(_state(args)) as node:
        page = await node.discover(
            type=args.type,
            capabilities=_csv(args.capabilities) or None,
            region=args.region,
            online=True if args.online else None,
            limit=args.limit,
        )
        for info in page.nodes:
            _print(info)
    return 0


COMMANDS = {
    "init": cmd_init,
    "send": cmd_send,
    "listen": cmd_listen,
    "heartbeat": cmd_heartbeat,
    "status": cmd_status,
    "nodes": cmd_nodes,
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="A fleet broker node.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", help="state directory (default $FLEET_NODE_STATE, .fleet-node)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="create or load the key, register, log in")
    p.add_argument("--server", required=True, help="the broker's URL, http://host:8000")
    p.add_argument("--id", required=True, help="the node id")
    p.add_argument("--name")
    p.add_argument("--type", default="node")
    p.add_argument("--capabilities", help="comma-separated")
    p.add_argument("--region")

    p = sub.add_parser("send", parents=[common], help="send a message; prints its id")
    p.add_argument("--to", required=True, help="recipient ids, comma-separated")
    p.add_argument("--type", required=True, help="the message type")
    p.add_argument("--content", required=True, help="JSON")
    p.add_argument("--priority", default="normal", choices=("critical", "high", "normal", "low"))
    p.add_argument("--ttl", type=float)
    p.add_argument("--idempotency-key", help="default: a fresh one (retries send once)")

    p = sub.add_parser("listen", parents=[common], help="print messages as JSON lines, ack them")
    p.add_argument("--poll", action="store_true", help="poll over HTTP instead of the WebSocket")

    p = sub.add_parser("heartbeat", parents=[common], help="send a heartbeat (or one every S)")
    p.add_argument("--every", type=float, help="seconds between heartbeats (for ever)")
    p.add_argument("--status", default="healthy")

    p = sub.add_parser("status", parents=[common], help="show (or set) this node's status")
    p.add_argument("--set", help="a new status")
    p.add_argument("--load", type=float)

    p = sub.add_parser("nodes", parents=[common], help="discover nodes (JSON lines)")
    p.add_argument("--type")
    p.add_argument("--capabilities", help="comma-separated: all required")
    p.add_argument("--region")
    p.add_argument("--online", action="store_true")
    p.add_argument("--limit", type=int, default=100)
    return parser


async def _run(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await COMMANDS[args.command](args)
    except asyncio.CancelledError:
        return 0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130 if args.command != "listen" and args.command != "heartbeat" else 0
    except (UsageError, BrokerClientError, OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
