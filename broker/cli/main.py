"""The `broker` command: serve, replay, export, import, verify, compact, users create; `node`
hands over to the node SDK's CLI. verify and compact live in broker.cli.log."""

# (The docstring above is `broker --help`'s description.) This module only assembles the parsers
# and dispatches; the commands live in broker.cli.serve, .records, .log and .users, what they
# share in broker.cli.common.

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from broker.cli import log as cli_log
from broker.cli import records as cli_records
from broker.cli import users as cli_users
from broker.cli.common import EXIT_FAIL, EXIT_USAGE, CommandError
from broker.config import Config, ConfigError, load_config
from broker.logs import configure_logging
from eventstore.base import StoreError


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from broker.cli.serve import serve  # the server's own module (TLS, sockets, signals)

    return serve(config, args)


def build_parser() -> argparse.ArgumentParser:
    from broker import __version__
    from broker.cli.serve import add_arguments as serve_arguments

    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    parser.add_argument("--config", help="config file (default: ./config.toml when present)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_arguments(sub.add_parser("serve", help="serve the HTTP and WebSocket API"))
    cli_records.add_parsers(sub)
    cli_log.add_parsers(sub)
    cli_users.add_parsers(sub)

    sub.add_parser(
        "ctl",
        help="a client of a running server, by API key: nodes, send, tail, dead-letters, users, "
        "licenses, api-keys (broker ctl --help)",
        add_help=False,
    )
    sub.add_parser(
        "node",
        help="a node's side (the SDK's fleet-node CLI): init, send, listen, heartbeat, status, "
        "nodes",
        add_help=False,
    )
    return parser


def node_cli(argv: Sequence[str]) -> int:
    """`broker node …`: the node CLI of the SDK distribution, when it is installed."""
    try:
        from fleet_broker_client.cli import main as fleet_node
    except ImportError:
        print(
            "broker: `broker node` needs the node SDK: pip install fleet-broker-client "
            "(from this repository: pip install -e sdk/python)",
            file=sys.stderr,
        )
        return EXIT_FAIL
    return fleet_node(list(argv), prog="broker node")


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], Any]] = {
    "serve": cmd_serve,
    **cli_records.COMMANDS,
    **cli_log.COMMANDS,
    **cli_users.COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["node"]:  # its arguments are the node CLI's, not the server's
        return node_cli(argv[1:])
    if argv[:1] == ["ctl"]:  # a client of a running server (broker.cli.ctl)
        from broker.cli.ctl import main as ctl

        return ctl(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure_logging(config.log)
        result = COMMANDS[args.command](config, args)
        if isinstance(result, Coroutine):
            result = asyncio.run(result)
        return int(result)
    except (ConfigError, CommandError, StoreError) as exc:
        # The one place where an error the user can act on becomes one line, no traceback.
        print(f"broker: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
