"""`broker users passwd`: set an operator's password on the log itself, with no server and no
token (the way back in for a locked-out admin). Like `broker users create`, it writes the log
directly: on the embedded log, stop the server first (the log takes one writer)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from broker.config import Config

if TYPE_CHECKING:
    from broker.runtime import Runtime

T = TypeVar("T")


def add_parsers(users: Any) -> None:
    """Register the subcommands of `broker users` that live here."""
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
    from broker.cli.main import CommandError, _check_log_path
    from broker.errors import BrokerError
    from broker.runtime import Runtime
    from eventstore import open_store

    _check_log_path(config)
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


async def cmd_passwd(config: Config, args: argparse.Namespace) -> int:
    from broker.cli.main import EXIT_OK, CommandError, _read_password
    from broker.services.operators import Operators

    password = _read_password(args)

    async def reset(runtime: Runtime) -> Any:
        user = runtime.users.find_by_username(args.username)
        if user is None:
            raise CommandError(f"no operator named {args.username}")
        return await Operators(runtime).reset_password(user.id, password, args.force_change)

    user = await on_log(config, reset)
    then = " (to be changed at next login)" if user.must_change_password else ""
    print(f"password of {user.username} set{then}; every session of theirs is ended")
    return EXIT_OK
