"""nats-server's TLS arguments for a test certificate."""

from __future__ import annotations

from pathlib import Path

from tests.tlscerts import Issued


def tls_args(server: Issued, client_ca: Path | None = None) -> tuple[str, ...]:
    args = ("--tls", "--tlscert", str(server.cert), "--tlskey", str(server.key))
    if client_ca is not None:
        args += ("--tlsverify", "--tlscacert", str(client_ca))
    return args
