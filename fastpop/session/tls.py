"""TLS: the server's SSL context, its reload, and upgrading a live connection.

One ``TLSManager`` per server holds the current ``ssl.SSLContext`` built from
the configured certificate chain and key (TLS 1.2 at least).  SIGHUP calls
``reload()``: a new context is built and, only if that succeeds, replaces the
old one; connections made from then on use it, sessions already encrypted
keep theirs, and nothing is dropped.  A certificate that fails to load is
logged and the old one stays in service.

STLS (RFC 2595) goes through ``upgrade()``: ``loop.start_tls`` on the
session's plain transport, bounded by the handshake timeout; the session's
part (suspending its command pull, discarding what the client sent before
the handshake) is in ``POP3Protocol.cmd_stls``.  The implicit-TLS listener
(RFC 8314, port 995) is the loop's own TLS server with ``listener_context``,
whose SNI callback (called on every handshake, with or without SNI) swaps
in the current context: a reload reaches it too.  (Not start_tls from
connection_made: the loop starts reading only after connection_made
returns, so a fast ClientHello could reach the session instead of TLS.)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fastpop.config import Config


class Session(Protocol):
    """What an upgrade needs from the session it secures (fastpop.session.protocol.POP3Protocol)."""

    loop: asyncio.AbstractEventLoop

    def tls_established(self, transport: asyncio.Transport) -> None: ...
    def tls_failed(self, exc: BaseException) -> None: ...

log = logging.getLogger("fastpop.tls")

MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def validate(config: Config) -> None:
    """The [tls] section's checks for fastpop.serve.validation (raises ValueError)."""
    if config.tls_min_version not in MIN_VERSIONS:
        raise ValueError(f"tls min_version must be one of {', '.join(MIN_VERSIONS)}")
    if config.tls_cert is not None:
        try:
            build_context(config.tls_cert, config.tls_key, config.tls_min_version)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"tls: cannot use certificate {config.tls_cert} / key {config.tls_key}: {exc}") from None


def build_context(cert: str, key: str | None, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context for ``cert`` (a chain, leaf first) and ``key``; raises on any problem."""
    try:
        minimum = MIN_VERSIONS[min_version]
    except KeyError:
        raise ValueError(f"tls min_version must be one of {', '.join(MIN_VERSIONS)}, not {min_version!r}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx


class TLSManager:
    def __init__(self, config: Config) -> None:
        assert config.tls_cert is not None
        self.cert = config.tls_cert
        self.key = config.tls_key
        self.min_version = config.tls_min_version
        self.handshake_timeout = config.tls_handshake_timeout
        self.context = build_context(self.cert, self.key, self.min_version)
        self.generation = 1
        self.listener_context = self.context
        self.listener_context.sni_callback = self._current

    def _current(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if self.context is not context:
            sslobj.context = self.context

    def reload(self) -> bool:
        """Re-read the certificate and key; keep the old context if they do not load."""
        try:
            context = build_context(self.cert, self.key, self.min_version)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        self.context = context
        self.generation += 1
        log.info("TLS certificate reloaded from %s (generation %d)", self.cert, self.generation)
        return True

    async def upgrade(self, session: Session, transport: asyncio.Transport) -> None:
        """Run the server side of a handshake on ``transport``, then hand the
        session its TLS transport (or the reason it failed)."""
        loop = session.loop
        started = loop.time()
        try:
            tls_transport = await loop.start_tls(
                # the session is an asyncio.Protocol (POP3Protocol); Session names only what is used here
                transport, session, self.context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError, RuntimeError, ValueError) as exc:
            transport.abort()
            session.tls_failed(exc)
            return
        if tls_transport is None or tls_transport.is_closing():
            # The connection went away during the handshake, or the loop
            # gave up on it: the timeout ends up here too, without an error.
            transport.abort()
            reason: OSError
            if loop.time() - started >= self.handshake_timeout * 0.99:
                reason = TimeoutError(f"no TLS handshake within {self.handshake_timeout:g} seconds")
            else:
                reason = ConnectionResetError("connection lost during the TLS handshake")
            session.tls_failed(reason)
            return
        session.tls_established(tls_transport)
