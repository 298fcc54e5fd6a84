"""The `broker` command: serve, replay, export, import, verify, compact, users create; `node`
hands over to the node SDK's CLI. verify and compact live in broker.cli.log."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec

from broker.cli import users as cli_users
from broker.config import Config, ConfigError, load_config
from broker.logs import configure_logging
from eventstore import open_store
from eventstore.base import Envelope, StoreError
from eventstore.codec import envelope_to_json, event_from_record, record_from_json

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A command failed for a reason the user can act on; the message says which."""


# --- progress bar (stderr, only on a terminal) ---


def progress_bar(label: str, stream: TextIO = sys.stderr) -> Callable[[int, int], None] | None:
    if not stream.isatty():
        return None

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        filled = int(frac * 30)
        stream.write(f"\r{label} [{'#' * filled}{' ' * (30 - filled)}] {done:,}/{total:,}")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


# --- commands ---


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from broker.cli.serve import serve  # the server's own module (TLS, sockets, signals)

    return serve(config, args)


def usable_dir(path: Path, what: str) -> None:
    """Create the directory `path` if needed and check that a file can be created in it (by
    creating one: mode bits do not stop root, a read-only mount or a pseudo-filesystem does)."""
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CommandError(f"cannot use {path} as {what}: {blocker} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create {what} {path}: {exc.strerror}") from None
    probe = path / f".broker-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise CommandError(f"cannot write in {what} {path}: {exc.strerror}") from None


def _check_log_path(config: Config) -> None:
    """Before a command writes the SQLite log: its directory exists (or can be made) and takes
    files, and the log path is not a directory."""
    if config.store.backend != "sqlite":
        return
    path = Path(config.store.path)
    if path.is_dir():
        raise CommandError(f"the log {path} is a directory")
    usable_dir(path.absolute().parent, "the log's directory")


def _readonly_store(config: Config) -> Any:
    if config.store.backend == "sqlite" and not Path(config.store.path).exists():
        raise CommandError(f"no log at {config.store.path}")
    return open_store(config.store, readonly=True)


async def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    store = _readonly_store(config)
    await store.open()
    try:
        if args.rebuild:
            return await _rebuild(store)
        types = [t for specs in args.type or [] for t in specs] or None
        count = 0
        out = sys.stdout
        if args.format == "table":
            out.write(f"{'SEQ':>8}  {'TIME (UTC)':<23}  {'TYPE':<24}  {'STREAM':<24}  V\n")
        async for env in store.read(args.from_seq, args.to_seq, types):
            if args.limit is not None and count >= args.limit:
                break
            out.write(_format(env, args.format))
            count += 1
        out.flush()
        return EXIT_OK
    finally:
        await store.close()


def _format(env: Envelope, fmt: str) -> str:
    if fmt == "jsonl":
        return envelope_to_json(env).decode() + "\n"
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(env.ts)) + f".{int(env.ts % 1 * 1000):03d}"
    )
    return f"{env.seq:>8}  {when:<23}  {env.type:<24}  {env.stream:<24}  {env.stream_version}\n"


async def _rebuild(store: Any) -> int:
    from broker.runtime import build_projections

    projections = build_projections()
    head = await store.head()
    show = progress_bar("rebuild")
    t0 = time.perf_counter()
    async for env in store.read(1):
        projections.apply(env)
        if show is not None and env.seq % 20_000 == 0:
            show(env.seq, head)
    if show is not None:
        show(head, head)
    elapsed = time.perf_counter() - t0
    rate = projections.applied / elapsed if elapsed > 0 else 0.0
    print(
        f"rebuilt {len(projections.parts)} projections from {projections.applied:,} events "
        f"in {elapsed:.3f} s ({rate:,.0f} events/s)"
    )
    for name, part in projections.parts.items():
        counts = {k: len(v) for k, v in vars(part).items() if isinstance(v, dict)}
        print(f"  {name}: " + ", ".join(f"{k}={n}" for k, n in counts.items()))
    return EXIT_OK


async def cmd_export(config: Config, args: argparse.Namespace) -> int:
    store = _readonly_store(config)
    render: Callable[[Envelope], bytes] = envelope_to_json
    if args.redact:
        from broker.services.eventlog import export_redacted_data
        from eventstore.codec import envelope_to_record

        def render(env: Envelope) -> bytes:
            return msgspec.json.encode(envelope_to_record(env, export_redacted_data))

    out: Path = args.out
    # An export holds password, refresh-token and license-key hashes: it is created readable
    # by its owner only (mode 0600 whatever the umask), as a new file renamed over `out` at the
    # end, so an existing `out` is replaced whatever its mode (not rewritten in place).
    try:
        fd, name = tempfile.mkstemp(
            dir=out.absolute().parent, prefix=f".{out.name}.", suffix=".part"
        )
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror}") from None
    tmp = Path(name)
    count = 0
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)
            await store.open()
            try:
                async for env in store.read(1):
                    f.write(render(env))
                    f.write(b"\n")
                    count += 1
            finally:
                await store.close()
            f.flush()
            os.fsync(f.fileno())
        try:
            tmp.replace(out)
        except OSError as exc:
            raise CommandError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    redacted = " (secrets redacted: not importable)" if args.redact else ""
    print(f"exported {count:,} events to {out}{redacted}", file=sys.stderr)
    return EXIT_OK


def _refuse_redacted(path: Path) -> None:
    """A redacted export lost the hashes logins are checked against: refuse it before anything
    is written (a cheap byte search first, a decode only of the lines that match)."""
    from broker.services.eventlog import REDACTED, holds_redacted

    marker = msgspec.json.encode(REDACTED)
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if marker not in line:
                    continue
                try:
                    data = record_from_json(line).data
                except msgspec.DecodeError:
                    continue  # the import names the line
                if holds_redacted(data):
                    raise CommandError(
                        f"{path}:{lineno}: this export was written with --redact: the password, "
                        "token and key hashes logins need are gone; import an export made "
                        "without --redact"
                    )
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


async def cmd_import(config: Config, args: argparse.Namespace) -> int:
    _check_log_path(config)
    _refuse_redacted(args.file)
    store = open_store(config.store)
    await store.open()
    try:
        if await store.head() != 0:
            raise CommandError(
                f"the log at {config.store.path} is not empty: import only into an empty log"
            )
        batch: list[Envelope] = []
        count = 0
        with open(args.file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = record_from_json(line)
                    event = event_from_record(rec)
                except Exception as exc:
                    raise CommandError(
                        f"{args.file}:{lineno}: not an exported event: {exc}"
                    ) from None
                batch.append(
                    Envelope(rec.seq, rec.stream, rec.stream_version, rec.ts, rec.id, event)
                )
                if len(batch) >= 1000:
                    await store.restore(batch)  # type: ignore[attr-defined]
                    count += len(batch)
                    batch = []
        if batch:
            await store.restore(batch)  # type: ignore[attr-defined]
            count += len(batch)
    except StoreError as exc:
        raise CommandError(f"import failed: {exc}") from None
    finally:
        await store.close()
    print(f"imported {count:,} events into {config.store.path}", file=sys.stderr)
    return EXIT_OK


async def cmd_users_create(config: Config, args: argparse.Namespace) -> int:
    from broker.services.operators import Operators

    password = _read_password(args)
    user = await cli_users.on_log(
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


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CommandError("no terminal to prompt for a password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise CommandError("the passwords do not match")
    return first


# --- parsing ---


def build_parser() -> argparse.ArgumentParser:
    from broker import __version__
    from broker.cli.args import event_types
    from broker.cli.serve import add_arguments as serve_arguments

    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    parser.add_argument("--config", help="config file (default: ./config.toml when present)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_arguments(sub.add_parser("serve", help="serve the HTTP and WebSocket API"))

    p = sub.add_parser("replay", help="print the log, or rebuild the projections from it")
    p.add_argument("--from-seq", type=int, default=1, help="first seq to print (default 1)")
    p.add_argument("--to-seq", type=int, default=None, help="last seq to print (default: head)")
    p.add_argument(
        "--type",
        action="append",
        type=event_types,
        help="event type or pattern (node.*), comma-separated; repeatable",
    )
    p.add_argument("--limit", type=int, default=None, help="print at most this many events")
    p.add_argument(
        "--format",
        choices=("jsonl", "table"),
        default="jsonl",
        help="jsonl: one envelope per line (default); table: seq, time, type, stream, version",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild every projection, print counts")

    p = sub.add_parser("export", help="write the whole log as JSON Lines (a file of mode 0600)")
    p.add_argument("--out", required=True, type=Path, help="the file to write (replaced whole)")
    p.add_argument(
        "--redact",
        action="store_true",
        help="replace password, token and license-key hashes, key material and every field "
        "named like a secret by [redacted] (such an export cannot be imported)",
    )

    p = sub.add_parser("import", help="load a JSON Lines export into an empty log")
    p.add_argument("file", type=Path, help="a file written by `broker export` (without --redact)")

    from broker.cli import log as cli_log

    cli_log.add_parsers(sub)

    users = sub.add_parser("users", help="operator accounts").add_subparsers(
        dest="users_command", required=True
    )
    p = users.add_parser("create", help="create an operator (the first admin, typically)")
    p.add_argument("--username", required=True, help="login name: 3-64 letters, digits, . _ @ -")
    p.add_argument("--role", action="append", help="role name (repeatable; default admin)")
    p.add_argument("--email", help="the operator's email (also accepted as login name)")
    p.add_argument("--full-name", help="the operator's name as shown to others")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    cli_users.add_parsers(users)

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


def _log_command(name: str, config: Config, args: argparse.Namespace) -> Any:
    from broker.cli import log as cli_log

    return cli_log.COMMANDS[name](config, args)


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
    "replay": cmd_replay,
    "export": cmd_export,
    "import": cmd_import,
    "verify": lambda config, args: _log_command("verify", config, args),
    "compact": lambda config, args: _log_command("compact", config, args),
    "users": lambda config, args: (
        cli_users.cmd_passwd if args.users_command == "passwd" else cmd_users_create
    )(config, args),
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
