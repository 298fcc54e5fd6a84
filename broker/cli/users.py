"""`broker users create` and `broker users passwd`: create an operator (the first admin,
typically) or set an operator's password on the log itself, with no server and no token (the way
back in for a locked-out admin). Both write the log directly: on the embedded log, stop the
server first (the log takes one writer)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from broker.cli.common import EXIT_OK, CommandError, check_log_path, read_password
from broker.config import Config

if TYPE_CHECKING:
    from broker.runtime import Runtime

T = TypeVar("T")


def add_parsers(sub: Any) -> None:
    """Register `broker users` and its subcommands."""
    users = sub.add_parser("users", help="operator accounts").add_subparsers(
        dest="users_command", required=True
    )
    p = users.add_parser("create", help="create an operator (the first admin, typically)")
    p.add_argument("--username", required=True, help="login name: 3-64 letters, digits, . _ @ -")
    p.add_argument("--role", action="append", help="role name (repeatable; default admin)")
    p.add_argument("--email", help="the operator's email (also accepted as login name)")
    p.add_argument("--full-name", help="the operator's name as shown to others")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p = users.add_parser(
        "passwd", help="set an operator's password offline (ends every session of theirs)"
    )
    p.add_argument("--username", required=True, help="the operator whose password is set")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument(
        "--force-change",
        action="store_true",
        help="the operator must choose a new password at their next login",
    )


async def on_log(config: Config, action: Callable[[Runtime], Awaitable[T]]) -> T:
    """Open the log for writing, build the projections, run `action`, close it all. An error
    the API would answer becomes a CommandError (one line, no traceback)."""
    from broker.errors import BrokerError
    from broker.runtime import Runtime
    from eventstore import open_store

    check_log_path(config)
    store = open_store(config.store)
    await store.open()
    try:
        runtime = Runtime(store)
        await runtime.start()
        try:
            return await action(runtime)
        except BrokerError as exc:
            raise CommandError(exc.message) from None
        finally:
            await runtime.stop()
    finally:
        await store.close()


async def cmd_create(config: Config, args: argparse.Namespace) -> int:
    from broker.services.operators import Operators

    password = read_password(args)
    user = await on_log(
        config,
        lambda runtime: Operators(runtime).create_user(
            username=args.username,
            password=password,
            roles=args.role or ["admin"],
            email=args.email,
            full_name=args.full_name,
        ),
    )
    print(f"created user {user.username} ({user.id}) with roles {', '.join(user.roles)}")
    return EXIT_OK


async def cmd_passwd(config: Config, args: argparse.Namespace) -> int:
    from broker.services.operators import Operators

    password = read_password(args)

    async def reset(runtime: Runtime) -> Any:
        user = runtime.users.find_by_username(args.username)
        if user is None:
            raise CommandError(f"no operator named {args.username}")
        return await Operators(runtime).reset_password(user.id, password, args.force_change)

    user = await on_log(config, reset)
    then = " (to be changed at next login)" if user.must_change_password else ""
    print(f"password of {user.username} set{then}; every session of theirs is ended")
    return EXIT_OK


def cmd_users(config: Config, args: argparse.Namespace) -> Any:
    """`broker users SUBCOMMAND`."""
    return (cmd_passwd if args.users_command == "passwd" else cmd_create)(config, args)


COMMANDS = {"users": cmd_users}
