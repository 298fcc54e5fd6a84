"""TLS for the HTTP and WebSocket server (`[server] tls_cert`, `tls_key`, `tls_client_ca`).

One `ssl.SSLContext` serves every listening socket. On SIGHUP `reload` loads the files again into
that same context: new handshakes use the new certificate (and client CA), connections already
open (WebSockets included) are not touched. The files are checked on a scratch context first, so
a bad renewal (a key that does not match, a half-written file) is logged and the server keeps
serving with what it had.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import structlog
from cryptography import x509

from broker.config import ServerConfig

log = structlog.get_logger("broker.tls")
EXPIRY_WARNING_DAYS = 14


class TlsError(Exception):
    """A certificate, key or CA file cannot be used; the message names it and says why."""


def server_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None when `[server] tls_cert` is empty (plain HTTP)."""
    if not server.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, server)
    if server.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no connection
    return context


def reload(context: ssl.SSLContext, server: ServerConfig) -> bool:
    """Load the files again into the live `context` once they prove usable; False (logged)
    when they do not, the context then being left as it was."""
    try:
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), server)  # a dry run
        _load(context, server)
    except TlsError as exc:
        log.error("tls_reload_failed", reason=str(exc))
        return False
    log_certificate("tls_reloaded", server)
    return True


def log_certificate(event: str, server: ServerConfig) -> None:
    """Log `event` with the certificate's subject and expiry; warn when it expires within
    EXPIRY_WARNING_DAYS (a renewal that did not happen)."""
    fields: dict[str, object] = {"cert": server.tls_cert, "client_ca": server.tls_client_ca or None}
    try:
        cert = x509.load_pem_x509_certificate(Path(server.tls_cert).read_bytes())
    except (OSError, ValueError):
        log.info(event, **fields)
        return
    expires = cert.not_valid_after_utc
    days = (expires - datetime.now(UTC)).days
    fields.update(
        subject=cert.subject.rfc4514_string(), expires=expires.isoformat(), days_left=days
    )
    log.info(event, **fields)
    if days < EXPIRY_WARNING_DAYS:
        log.warning("tls_expires_soon", cert=server.tls_cert, days_left=days)


def _load(context: ssl.SSLContext, server: ServerConfig) -> None:
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key or None)
    except ssl.SSLError as exc:
        raise TlsError(
            f"cannot load the certificate {server.tls_cert} with the key "
            f"{server.tls_key or '(in the same file)'}: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename or server.tls_cert}: {exc.strerror}") from None
    if server.tls_client_ca:
        try:
            context.load_verify_locations(cafile=server.tls_client_ca)
        except ssl.SSLError as exc:
            raise TlsError(f"cannot load the client CA {server.tls_client_ca}: {exc}") from None
        except OSError as exc:
            raise TlsError(f"cannot read {server.tls_client_ca}: {exc.strerror}") from None
