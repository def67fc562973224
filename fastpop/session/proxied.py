"""POP3 behind a load balancer: listeners that require a PROXY protocol header.

``[proxy] listen`` adds POP3 listeners (as Dovecot's ``haproxy = yes``) on
which every connection must come from ``[proxy] trusted_networks`` (as
Dovecot's ``haproxy_trusted_networks``) and start with a PROXY header, version
1 or 2 (parsed by ``fastpop.wire.proxy_protocol``).  Until the header is complete
the session does not exist: no greeting, no connection counted, no command
read.  Then the client's address from the header replaces the proxy's in
everything the session decides and logs (``rip=``, trusted networks,
penalties, per-address connection caps, the OAuth validator's ``peer``), and
the session starts exactly as on a plain listener.  Bytes that came with the
header (a client that pipelines before the greeting) go to the command
parser.  A version 2 header whose SSL TLV says the client reached the proxy
over TLS makes the session secure (plaintext logins allowed, no STLS), as
Dovecot does.

``[proxy] listen_tls`` adds the same for implicit TLS passed through the
proxy: the header in clear, then the client's TLS handshake
(``ProxyTLSListener``, which reads the header off the socket before the loop
gets it, so the handshake's bytes are never taken with it).

Refused, logged and closed without a greeting: a connection from outside
the trusted networks, a malformed header, no complete header within
``[proxy] timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from fastpop.config import Config
from fastpop.net import Networks
from fastpop.session.protocol import POP3Protocol
from fastpop.session.state import BUSY_CLOSING
from fastpop.wire.proxy_protocol import (
    MAX_V2_HEADER,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)

if TYPE_CHECKING:
    from fastpop.session.context import SessionContext

log = logging.getLogger("fastpop.proxy")


def _log_header(parsed: ProxyHeader, proxy: str, client: str) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("proxy rip=%s port=%s via=%s v%d%s%s", client, parsed.source[1] if parsed.source else "-",
                  proxy, parsed.version, " local" if parsed.local else "",
                  f" tls={parsed.tls_version or 'yes'}" if parsed.tls else "")


class ProxySettings:
    """What the PROXY listeners of one server share."""

    __slots__ = ("trusted", "timeout")

    def __init__(self, config: Config) -> None:
        self.trusted = Networks(config.proxy_trusted_networks)
        self.timeout = config.proxy_timeout


class ProxiedPOP3Protocol(POP3Protocol):
    """A POP3 session that starts once the PROXY header has been read."""

    __slots__ = ("_settings", "_header")

    def __init__(self, ctx: SessionContext, settings: ProxySettings) -> None:
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
        self._header_read(parsed)
        self.start_session()
        rest = bytes(header[parsed.length :])
        if rest and not self._busy & BUSY_CLOSING:
            POP3Protocol.data_received(self, rest)

    def _header_read(self, parsed: ProxyHeader) -> None:
        """The header is complete: the client's address replaces the proxy's."""
        self._header = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proxy = self._peer
        if parsed.source is not None:
            self._peer = parsed.source[0]
        if parsed.tls:
            self._implicit_tls = True  # TLS ended at the proxy: the session counts as secure
        _log_header(parsed, proxy, self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header and not self._busy & BUSY_CLOSING:  # a bare connect and close is a health check
            log.info("proxy connection from %s closed before a complete PROXY header (%d bytes)",
                     self._peer, len(self._header))
        super().connection_lost(exc)

    def shutdown(self, reason: str = "shutdown") -> None:
        if self._header is not None:
            self._busy |= BUSY_CLOSING
            if self.transport is not None:
                self.transport.close()
            return
        super().shutdown(reason)

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


class _TLSSession(POP3Protocol):
    """An implicit-TLS session whose client address came from a PROXY header."""

    __slots__ = ("_client",)

    def __init__(self, ctx: SessionContext, client: str) -> None:
        super().__init__(ctx, implicit_tls=True)
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._peer = self._client
        self.start_session()


class ProxyTLSListener:
    """Implicit TLS behind a proxy that passes TLS through: the PROXY header
    comes first, in clear, then the client's TLS handshake.

    No transport may read the connection before the header is gone: it
    would take the first bytes of the handshake along with it (and uvloop
    starts reading as soon as connection_made returns).  So this listener
    accepts by itself, peeks at each connection's header (MSG_PEEK), takes
    exactly its length off the socket, and only then hands the socket to the
    loop (connect_accepted_socket) for the TLS handshake and the session.
    It offers what the server uses of an asyncio.Server: ``sockets``,
    ``start_serving()`` (accepting starts there, once privileges are
    dropped), ``close()``, ``wait_closed()``.
    """

    def __init__(self, ctx: SessionContext, settings: ProxySettings, sock: socket.socket) -> None:
        self._ctx = ctx
        self._loop = ctx.loop
        self._settings = settings
        self._sock = sock
        self.sockets = [sock]
        self._pending: set[_PendingHeader] = set()
        self._handshakes: set[asyncio.Task] = set()
        self._closed = False
        self._serving = False
        sock.setblocking(False)

    async def start_serving(self) -> None:
        if not self._closed and not self._serving:
            self._serving = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def is_serving(self) -> bool:
        return self._serving and not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for pending in list(self._pending):
            pending.drop()
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        return None

    def _accept(self) -> None:
        for _ in range(128):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory: stop accepting for a moment
                log.error("accept failed on a PROXY listener: %s; retrying in 0.1 s", exc)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(0.1, self._resume)
                return
            conn.setblocking(False)
            if addr[0] not in self._settings.trusted:
                log.warning("refused proxy connection from %s: not a trusted proxy", addr[0])
                conn.close()
                continue
            _PendingHeader(self, conn, addr[0])

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _start_tls(self, sock: socket.socket, client: str) -> None:
        task = self._loop.create_task(self._handshake(sock, client))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, client: str) -> None:
        ctx = self._ctx
        assert ctx.tls is not None
        try:
            await self._loop.connect_accepted_socket(
                lambda: ctx.session_class(_TLSSession)(ctx, client), sock, ssl=ctx.tls.listener_context,
                ssl_handshake_timeout=ctx.config.tls_handshake_timeout,
            )
        except asyncio.CancelledError:
            sock.close()
            raise
        except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError, RuntimeError, ValueError) as exc:
            log.info("TLS handshake failed rip=%s: %s", client, exc or type(exc).__name__)


class _PendingHeader:
    """One accepted connection whose PROXY header is still being read."""

    __slots__ = ("_listener", "_sock", "_proxy", "_timer", "_retry", "_seen")

    def __init__(self, listener: ProxyTLSListener, sock: socket.socket, proxy: str) -> None:
        self._listener = listener
        self._sock = sock
        self._proxy = proxy
        self._seen = b""
        self._retry: asyncio.TimerHandle | None = None
        loop = listener._loop
        self._timer: asyncio.TimerHandle | None = loop.call_later(listener._settings.timeout, self._timeout)
        listener._pending.add(self)
        loop.add_reader(sock.fileno(), self._peek)

    def _peek(self) -> None:
        try:
            data = self._sock.recv(MAX_V2_HEADER, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._refuse(f"cannot read the PROXY header: {exc}")
            return
        if not data:
            if self._seen:
                self._refuse("closed before a complete PROXY header", self._seen)
            else:
                self.drop()  # a bare connect and close is a health check
            return
        try:
            parsed = parse(data)
        except ProxyHeaderError as exc:
            self._refuse(f"malformed PROXY header: {exc}", data)
            return
        loop = self._listener._loop
        if parsed is None:
            # Incomplete (rare: it is sent at once).  The descriptor stays
            # readable while the bytes are unread: look again a little later.
            self._seen = data
            loop.remove_reader(self._sock.fileno())
            self._retry = loop.call_later(0.02, self._peek_again)
            return
        try:
            consumed = self._sock.recv(parsed.length)  # exactly the header, which is in the buffer
        except OSError as exc:
            consumed = repr(exc).encode()
        if consumed != data[: parsed.length]:
            self._refuse("cannot read the PROXY header", consumed)
            return
        self._stop()
        client = parsed.source[0] if parsed.source is not None else self._proxy
        _log_header(parsed, self._proxy, client)
        self._listener._start_tls(self._sock, client)

    def _peek_again(self) -> None:
        self._retry = None
        self._listener._loop.add_reader(self._sock.fileno(), self._peek)

    def _timeout(self) -> None:
        self._timer = None
        self._refuse(f"no PROXY header within {self._listener._settings.timeout:g} s", self._seen)

    def _refuse(self, reason: str, seen: bytes | None = None) -> None:
        log.warning("refused proxy connection from %s: %s%s", self._proxy, reason,
                    "" if seen is None else f" (received {seen[:32]!r})")
        self.drop()

    def _stop(self) -> None:
        listener = self._listener
        listener._pending.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            listener._loop.remove_reader(self._sock.fileno())

    def drop(self) -> None:
        self._stop()
        self._sock.close()
