"""POP3 behind a load balancer: listeners that require a PROXY protocol header.

``[proxy] listen`` adds POP3 listeners (as Dovecot's ``haproxy = yes``) on
which every connection must come from ``[proxy] trusted_networks`` (as
Dovecot's ``haproxy_trusted_networks``) and start with a PROXY header, version
1 or 2 (parsed by ``fastpop.proxy_protocol``).  Until the header is complete
the session does not exist: no greeting, no connection counted, no command
read.  Then the client's address from the header replaces the proxy's in
everything the session decides and logs (``rip=``, trusted networks,
penalties, per-address connection caps, the OAuth validator's ``peer``), and
the session starts exactly as on a plain listener.  Bytes that came with the
header (a client that pipelines before the greeting) go to the command
parser.  A version 2 header whose SSL TLV says the client reached the proxy
over TLS makes the session secure (plaintext logins allowed, no STLS), as
Dovecot does.

Refused, logged and closed without a greeting: a connection from outside
the trusted networks, a malformed header, no complete header within
``[proxy] timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from fastpop.config import Config, parse_address
from fastpop.penalty import Networks
from fastpop.protocol import BUSY_CLOSING, POP3Protocol
from fastpop.proxy_protocol import ProxyHeaderError, parse

if TYPE_CHECKING:
    from fastpop.server import ServerContext

log = logging.getLogger("fastpop.proxy")


class ProxySettings:
    """What the PROXY listeners of one server share."""

    __slots__ = ("trusted", "timeout")

    def __init__(self, config: Config) -> None:
        self.trusted = Networks(config.proxy_trusted_networks)
        self.timeout = config.proxy_timeout


class ProxiedPOP3Protocol(POP3Protocol):
    """A POP3 session that starts once the PROXY header has been read."""

    __slots__ = ("_settings", "_header")

    def __init__(self, ctx: ServerContext, settings: ProxySettings) -> None:
        super().__init__(ctx)
        self._settings = settings
        self._header: bytearray | None = bytearray()  # None once the session has started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._ctx.sessions.add(self)  # a server stopping closes it too
        if not peer:  # reset before we could ask: a TCP-connect health check
            self._busy |= BUSY_CLOSING
            transport.close()
            return
        self._peer = peer[0]
        if self._peer not in self._settings.trusted:
            self._refuse("not a trusted proxy")
            return
        self._timer = self.loop.call_later(self._settings.timeout, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        header = self._header
        if header is None:
            POP3Protocol.data_received(self, data)
            return
        if self._busy & BUSY_CLOSING:
            return
        header += data
        try:
            parsed = parse(header)
        except ProxyHeaderError as exc:
            self._refuse(f"malformed PROXY header: {exc}", bytes(header[:32]))
            return
        if parsed is None:
            return  # more to come (bounded: parse refuses anything longer than a header)
        rest = bytes(header[parsed.length :])
        self._header = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proxy = self._peer
        if parsed.source is not None:
            self._peer = parsed.source[0]
        if parsed.tls:
            self._implicit_tls = True  # TLS ended at the proxy: the session counts as secure
        if log.isEnabledFor(logging.DEBUG):
            log.debug("proxy rip=%s port=%s via=%s v%d%s%s", self._peer, parsed.source[1] if parsed.source else "-",
                      proxy, parsed.version, " local" if parsed.local else "",
                      f" tls={parsed.tls_version or 'yes'}" if parsed.tls else "")
        self.start_session()
        if rest and not self._busy & BUSY_CLOSING:
            POP3Protocol.data_received(self, rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header and not self._busy & BUSY_CLOSING:  # a bare connect and close is a health check
            log.info("proxy connection from %s closed before a complete PROXY header (%d bytes)",
                     self._peer, len(self._header))
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._header is not None:
            self._busy |= BUSY_CLOSING
            if self.transport is not None:
                self.transport.close()
            return
        super().shutdown()

    def _header_timeout(self) -> None:
        self._timer = None
        if self._header is not None and self.transport is not None:
            self._refuse(f"no PROXY header within {self._settings.timeout:g} s", bytes(self._header[:32]))

    def _refuse(self, reason: str, seen: bytes | None = None) -> None:
        log.warning("refused proxy connection from %s: %s%s", self._peer, reason,
                    "" if seen is None else f" (received {seen!r})")
        self._end_reason = reason
        self._busy |= BUSY_CLOSING
        if self.transport is not None:
            self.transport.close()


async def start_listeners(ctx: ServerContext, sockets: list[socket.socket] | None = None) -> list[asyncio.AbstractServer]:
    """The PROXY listeners of ``[proxy] listen`` (or the given listening sockets, one per address)."""
    config = ctx.config
    settings = ProxySettings(config)
    servers = []
    for i, addr in enumerate(config.proxy_listen):
        if sockets is not None:
            where = {"sock": sockets[i]}
        else:
            host, port = parse_address(addr)
            where = {"host": host, "port": port, "reuse_address": True}
        servers.append(await ctx.loop.create_server(lambda: ProxiedPOP3Protocol(ctx, settings), backlog=4096, **where))
    return servers
