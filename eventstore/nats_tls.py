"""TLS to NATS: `[store] url = "tls://…"` with `tls_ca` (the CA that signed the server's
certificate; default the system's) and `tls_cert`/`tls_key` (a client certificate, for servers
that verify clients). A `tls://` URL, or any of these set, means TLS or no connection: a server
that does not offer TLS is refused instead of being talked to in plain text."""

from __future__ import annotations

import ssl
from typing import Any

from eventstore.base import StoreConfig, StoreError, StoreUnavailable


def client_context(config: StoreConfig) -> ssl.SSLContext | None:
    """The context for NATS connections, or None when TLS is not asked for."""
    if not (config.url.startswith("tls://") or config.tls_ca or config.tls_cert):
        return None
    if config.tls_key and not config.tls_cert:
        raise StoreError("[store] tls_key needs tls_cert")
    try:
        context = ssl.create_default_context(cafile=config.tls_ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise StoreError(f"cannot load the NATS CA {config.tls_ca}: {exc}") from None
    if config.tls_cert:
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key or None)
        except (ssl.SSLError, OSError) as exc:
            raise StoreError(
                f"cannot load the NATS client certificate {config.tls_cert}: {exc}"
            ) from None
    return context


def require_tls(nc: Any, url: str) -> None:
    """After connecting with a TLS context: the server must have switched to TLS."""
    if not nc._server_info.get("tls_required"):
        raise StoreUnavailable(f"NATS at {url} does not offer TLS: refusing plain text")
