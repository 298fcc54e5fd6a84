"""`broker serve`: check the paths, listen, start the application, serve until SIGINT or SIGTERM,
then stop it gracefully (open requests finish, a snapshot is written: docs/deployment.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import structlog

from broker.cli.common import EXIT_OK, CommandError, check_log_path, usable_dir
from broker.config import Config, ServerConfig
from broker.logs import write_line

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger("broker.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (overrides [server] host)")
    parser.add_argument(
        "--port", type=int, help="TCP port to listen on, 0-65535 (overrides [server] port)"
    )


def serve(config: Config, args: argparse.Namespace) -> int:
    from broker.app import create_app
    from broker.keys import SNAPSHOTS
    from broker.runtime import tune_gc
    from broker.tls import TlsError, server_context

    config = _with_overrides(config, args)
    _check_server_paths(config)
    try:
        tls = server_context(config.server)
    except TlsError as exc:
        raise CommandError(str(exc)) from None
    # Listen before the log is opened: a port already taken fails the start at once, not after
    # a replay of the whole log.
    sockets = listen(config.server.host, config.server.port)
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        from projections import delivery_queue_kind, stale_compiled_modules

        for stale in stale_compiled_modules():
            write_line(sys.stderr, f"warning: {stale}")
        kind, module = delivery_queue_kind()
        log.info("delivery_queue", implementation=kind, module=module)
        tune_gc()
        _raise_fd_limit()
        app = create_app(config)
        app[SNAPSHOTS].freeze_on_load = True
        app.on_startup.append(_freeze_startup_objects)  # after every cleanup context's start
        asyncio.run(_serve(app, sockets, config.server, tls))
    finally:
        for sock in sockets:
            sock.close()
    return EXIT_OK


def _with_overrides(config: Config, args: argparse.Namespace) -> Config:
    """`--host` and `--port` over the configuration's `[server]`."""
    changes = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    if not changes:
        return config
    if not 0 <= changes.get("port", 0) <= 65535:
        raise CommandError(f"--port must be 0..65535, not {changes['port']}")
    server = msgspec.structs.replace(config.server, **changes)
    return msgspec.structs.replace(config, server=server)


async def _serve(
    app: web.Application,
    sockets: list[socket.socket],
    server: ServerConfig,
    tls: ssl.SSLContext | None,
) -> None:
    """Start `app` on `sockets`, serve until SIGINT or SIGTERM, then stop it. Unlike
    `web.run_app`, a start that fails half-way (or is interrupted) still closes what had started
    (the log and its threads), so the process exits instead of hanging. SIGHUP loads the TLS
    files again (broker.tls)."""
    from aiohttp import web

    from broker import tls as tls_files
    from broker.http.lean import LeanRunner

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            task.cancel()

    def reload() -> None:
        if tls is None:
            log.info("sighup", tls="off: nothing to reload")
        else:
            tls_files.reload(tls, server)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    runner = LeanRunner(  # aiohttp's AppRunner, with the hot routes' lean front
        app, access_log=None, keepalive_timeout=75.0, shutdown_timeout=server.shutdown_timeout
    )
    try:
        await runner.setup()  # every cleanup context's start: the log is opened and replayed
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=tls).start()
        if tls is not None:
            tls_files.log_certificate("tls", server)
        names = ", ".join(sorted(str(site.name) for site in runner.sites))
        # never fails the start (stderr may be on a full device: broker.logs)
        write_line(sys.stderr, f"======== Running on {names} ========\n(Press CTRL+C to quit)")
        await asyncio.Event().wait()  # until a signal cancels this task
    except asyncio.CancelledError:
        if not stopping:
            raise
        task.uncancel()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)  # a second Ctrl-C interrupts the cleanup
        await runner.cleanup()  # after a failed start too: closes the contexts that started


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to, as asyncio's `create_server`
    makes them (SO_REUSEADDR, IPv6 sockets IPv6-only); a CommandError when one cannot listen."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise CommandError(f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # an address family this machine lacks (IPv6 disabled)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)  # at once: under SO_REUSEADDR two merely bound sockets share a port
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise CommandError(f"cannot listen on {where}: {reason}") from None
    if not sockets:
        raise CommandError(f"cannot listen on {where}: no usable address")
    return sockets


def _check_server_paths(config: Config) -> None:
    data_dir = Path(config.server.data_dir)
    usable_dir(data_dir, "the data directory")
    check_log_path(config)
    key_file = Path(config.auth.key_file) if config.auth.key_file else data_dir / "jwt_ed25519.pem"
    if not key_file.exists():  # created at the first start
        usable_dir(key_file.absolute().parent, "the signing key's directory")
    elif not key_file.is_file():
        raise CommandError(f"the token signing key {key_file} is not a file")


def _raise_fd_limit() -> None:
    """Take the hard descriptor limit as the soft one: every node WebSocket holds a descriptor
    (docs/operations.md: LimitNOFILE)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _freeze_startup_objects(app: web.Application) -> None:
    """What start-up built (the projections replayed from the log: possibly millions of
    objects) lives as long as the process: keep it out of every later full collection."""
    gc.freeze()
