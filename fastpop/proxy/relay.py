"""A routed session: log in at the proxy, then relay to the user's backend.

``routed(base)`` makes a subclass of a session class (POP3Protocol, or the
PROXY-listener ones of fastpop.session.proxied) whose successful login does
not open a Maildir: it connects to the user's backend
(fastpop.proxy.routing), sends a PROXY v2 header naming the client, logs in
there (``AUTH PLAIN`` or ``USER``/``PASS``), sends the backend's ``+OK`` to the
client and from then on relays bytes both ways.
Every failure before that (wrong password, penalties, the failure delay, the
``auth failed rip=... user=...`` log line) is the server's own path, so a
wrong password never reaches a backend and fail2ban reads the proxy's log
as a server's.

The relay does no per-byte work: each chunk read on one side is written to
the other as is.  Flow control: when one side's write buffer passes its
high-water mark (64 KiB), reading the other side stops until it drains
(``pause_writing``/``resume_writing`` -> ``pause_reading``/``resume_reading``),
so a client that reads slowly holds at most a transport buffer per
direction in the proxy, however large the message.

The login at the backend: with ``[backends] master_user``, the proxy's own
master login for the user (AUTH PLAIN with the user as authzid, or
``USER alice*proxy``), whatever the client logged in with, so SCRAM,
APOP and OAuth relay too; a client's own master login (``alice*admin``) is
relayed as given, so the backend applies and logs that master.  Without a
master_user, the user's own name and password, so only the mechanisms that
give the proxy the password can be relayed (fastpop.config refuses the
others): USER/PASS, PLAIN and LOGIN.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from typing import TYPE_CHECKING, Any

from fastpop.proxy.routing import Backend, NoBackend, Router
from fastpop.session.state import BUSY_AUTH, BUSY_CLOSING, TRANSACTION
from fastpop.wire.proxy_protocol import (
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_SSL,
    PROXY,
    V2_SIGNATURE,
    build_v2,
    tlv,
)

if TYPE_CHECKING:
    from fastpop.auth import sasl
    from fastpop.auth.passwd_file import UserRecord

log = logging.getLogger("fastpop.proxy")

ERR_BACKEND = b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later.\r\n"
ERR_NOT_RELAYABLE = b"-ERR [SYS/PERM] This login method cannot be used here; use USER/PASS or AUTH PLAIN.\r\n"
# a backend's refusals of the proxy's master login that are the user's to see; any other (its [AUTH]:
# the master unknown there, or its password wrong) is the operator's, and the client gets [SYS/TEMP]
USER_REFUSALS = (b"-ERR [IN-USE]", b"-ERR [LOGIN-DELAY]", b"-ERR [SYS/")
MAX_BACKEND_LINE = 1024  # a greeting or a login reply longer than this is no POP3 server's


class BackendLink(asyncio.Protocol):
    """The proxy's connection to a backend: the login, then one relay direction."""

    __slots__ = ("session", "transport", "backend", "_buf", "_login", "_replies", "done", "relaying")

    def __init__(self, session: Any, backend: Backend, header: bytes, login: bytes, replies: int) -> None:
        self.session = session
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self._buf = header  # (the header goes out first, in connection_made)
        self._login = login
        self._replies = replies  # +OK lines the login takes (USER, PASS: 2)
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.relaying = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self._buf)
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        if self.relaying:
            client = self.session.transport
            if client is not None:
                client.write(data)
            return
        buf = self._buf + data
        while not self.done.done():
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_BACKEND_LINE:
                    self._fail(f"reply longer than {MAX_BACKEND_LINE} bytes")
                break
            line, buf = buf[: end + 1], buf[end + 1 :]
            if not line.startswith(b"+OK"):
                self._fail(f"refused: {line[:120].rstrip()!r}", line if line.startswith(b"-ERR") else None)
                break
            if self._login:  # the greeting: log in now
                assert self.transport is not None
                self.transport.write(self._login)
                self._login = b""
                continue
            self._replies -= 1
            if self._replies == 0:
                self.done.set_result(line)
        self._buf = buf

    def _fail(self, reason: str, reply: bytes | None = None) -> None:
        if not self.done.done():
            self.done.set_exception(BackendRefused(reason, reply))

    def leftover(self) -> bytes:
        """What the backend sent after its login reply (nothing, from a POP3 server)."""
        rest, self._buf = self._buf, b""
        return rest

    # the backend -> client direction's flow control: the backend's socket is read
    # only while the client's write buffer has room (the session pauses us)
    def pause_writing(self) -> None:  # the backend reads slower than the client sends
        client = self.session.transport
        if client is not None:
            client.pause_reading()

    def resume_writing(self) -> None:
        client = self.session.transport
        if client is not None:
            client.resume_reading()

    def eof_received(self) -> bool:
        return False  # close: POP3 has no half-closed use

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done.done():
            self._fail(f"connection closed{': ' + str(exc) if exc else ''}")
        elif self.relaying:
            self.session._backend_gone()


class BackendRefused(Exception):
    def __init__(self, reason: str, reply: bytes | None) -> None:
        super().__init__(reason)
        self.reply = reply


def _header(session: Any) -> bytes:
    """PROXY v2 naming the client; the SSL TLV when the proxy allowed its
    plaintext login (TLS, or a trusted network), so the backend allows it too.
    (fastpop.wire.proxy_protocol.build_v2's format, with inet_pton instead of
    ipaddress: this runs on every login.)"""
    peer = session._peer
    transport = session.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    port = peername[1] if peername and len(peername) >= 2 and isinstance(peername[1], int) else 0
    tlvs = b""
    if session._secure or session._trusted:
        sub = b""
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is not None and ssl_object.version():
            sub = tlv(PP2_SUBTYPE_SSL_VERSION, ssl_object.version().encode("ascii"))
        tlvs = tlv(PP2_TYPE_SSL, bytes((PP2_CLIENT_SSL,)) + bytes(4) + sub)
    try:
        if ":" in peer:
            family, address = 0x21, socket.inet_pton(socket.AF_INET6, peer) + bytes(16)
        else:
            family, address = 0x11, socket.inet_pton(socket.AF_INET, peer) + bytes(4)
    except OSError:  # not an IP address: the proxy's own
        return build_v2(None, None, local=True)
    body = address + port.to_bytes(2, "big") + bytes(2) + tlvs  # destination: the unspecified address, port 0
    return V2_SIGNATURE + bytes((0x20 | PROXY, family)) + len(body).to_bytes(2, "big") + body


def _login_lines(how: str, name: str, password: str, user: str = "", separator: str = "*") -> tuple[bytes, int]:
    """The login at the backend, and the +OK lines it takes.  With ``user``,
    ``name`` is a master logging in as that user: AUTH PLAIN's authzid
    (RFC 4616), or ``USER user*name``."""
    if how == "user":
        if user:
            name = user + separator + name
        return (b"USER " + name.encode("utf-8", "surrogatepass") + b"\r\nPASS "
                + password.encode("utf-8", "surrogatepass") + b"\r\n"), 2
    plain = (user.encode("utf-8", "surrogatepass") + b"\0" + name.encode("utf-8", "surrogatepass") + b"\0"
             + password.encode("utf-8", "surrogatepass"))
    return b"AUTH PLAIN " + base64.b64encode(plain) + b"\r\n", 1


_classes: dict[type, type] = {}


def routed(base: Any) -> Any:
    """The routed subclass of a session class (made once per class)."""
    cls = _classes.get(base)
    if cls is not None:
        return cls

    class Routed(base):
        if not TYPE_CHECKING:  # slots at run time; the checker sees the base's fields as Any
            __slots__ = ("_link", "_tail", "_connecting", "_route")
        else:  # the core's fields this class sets
            _timer: asyncio.TimerHandle | None
            _reading_paused: bool
            _user: UserRecord | None
            _master: str | None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._link: BackendLink | None = None  # set once relaying
            self._tail = b""
            self._connecting: asyncio.Task | None = None
            self._route = ""

        # ------------------------------------------------- before the relay: the server's session

        def data_received(self, data: bytes) -> None:
            link = self._link
            if link is not None:
                if link.transport is not None:
                    link.transport.write(data)
                return
            tail = self._tail + data
            base.data_received(self, data)
            # what the parser still holds is always the end of what came: keep exactly that,
            # to hand commands pipelined behind the login to the backend (bounded as the parser is)
            held = self._parser.buffered
            self._tail = tail[len(tail) - held:] if held else b""

        def _auth_finished(self, outcome: sasl.Outcome) -> None:
            record = outcome.record
            ctx = self._ctx
            if record is None or (ctx.denied and record.name in ctx.denied):
                base._auth_finished(self, outcome)  # the server's failure path: delay, penalty, log line
                return
            if self._restricted(outcome):  # allow_nets, nopop3, nologin: refused as the server refuses
                return
            router: Router = ctx.router
            master = self._master  # (set by _restricted) the client's own master login: relayed as given
            relay_master = router.master if master is None else None
            if relay_master is None and outcome.credentials is None:
                # SCRAM, APOP, OAuth: no password to log in with (fastpop.config offers them only with a
                # master_user; a session greeted before a SIGHUP took it away may still try APOP)
                log.warning("login not relayable user=%s rip=%s", outcome.user, self._peer)
                self._answer(ERR_NOT_RELAYABLE, "unavailable")
                return
            if not self._trusted:  # a master's success clears the master's count
                ctx.penalty.succeeded(self._addr_key, record.name if master is None
                                      else ctx.config.auth_master_separator + master)
            if relay_master is not None:  # the proxy's master, for the user
                login = _login_lines(router.login, relay_master[0], relay_master[1], record.name, router.separator)
                shown = f"{record.name} master={relay_master[0]}"
            else:  # the name as given (a master login's user*master) and its password
                assert outcome.credentials is not None
                name, _, password = outcome.credentials.decode("utf-8", "surrogatepass").partition("\0")
                login = _login_lines(router.login, name, password)
                shown = name
            try:
                backend = router.pick(record.name, record)
            except NoBackend as exc:
                log.warning("backend unavailable user=%s rip=%s: %s", record.name, self._peer, exc)
                self._answer(ERR_BACKEND, "unavailable")
                return
            self._connecting = self.loop.create_task(
                self._connect(router, backend, login, shown, record, relay_master is not None))

        async def _connect(self, router: Router, backend: Backend, lines: tuple[bytes, int], name: str,
                           record: UserRecord, as_master: bool) -> None:
            """Connect, log in as ``lines`` say, relay; ``name`` is who logs in, for the log lines."""
            login, replies = lines
            if self._parser.utf8:  # the client said UTF8 (RFC 6856): the backend's session must too
                login, replies = b"UTF8\r\n" + login, replies + 1
            header = _header(self) if router.proxy_header else b""
            link = BackendLink(self, backend, header, login, replies)
            started = self.loop.time()
            try:
                await asyncio.wait_for(
                    self.loop.create_connection(lambda: link, backend.host, backend.port), router.timeout)
                reply = await asyncio.wait_for(link.done, max(0.0, started + router.timeout - self.loop.time()))
            except (OSError, asyncio.TimeoutError, BackendRefused) as exc:
                if link.transport is not None:
                    link.transport.abort()
                if isinstance(exc, BackendRefused) and exc.reply is not None and as_master \
                        and not exc.reply.startswith(USER_REFUSALS):
                    # (its log says why: most often a master it does not have, or another password)
                    log.error("backend %s refused the proxy's master login user=%s rip=%s: %s", backend, name,
                              self._peer, exc)
                    self._answer(ERR_BACKEND, "backend")
                    return
                if isinstance(exc, BackendRefused) and exc.reply is not None:
                    # the backend answered the login (IN-USE, LOGIN-DELAY, a password it does not share)
                    log.warning("backend %s refused login user=%s rip=%s: %s", backend, name, self._peer, exc)
                    self._answer(exc.reply[:MAX_BACKEND_LINE].rstrip(b"\r\n") + b"\r\n", "backend")
                    return
                why = (f"no answer within {router.timeout:g} s" if isinstance(exc, asyncio.TimeoutError)
                       else (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__))
                log.warning("backend %s unavailable user=%s rip=%s: %s", backend, name, self._peer, why)
                router.failed(backend, why)
                self._answer(ERR_BACKEND, "unavailable")
                return
            except asyncio.CancelledError:  # the client left meanwhile
                if link.transport is not None:
                    link.transport.abort()
                raise
            finally:
                self._connecting = None
            self._relay(link, reply, name, backend, record)

        def _answer(self, reply: bytes, refused: str) -> None:
            if self.transport is None or self._busy & BUSY_CLOSING:
                return
            self._on_login_refused(refused)
            self._out.append(reply)
            self._flush()
            self._unbusy(BUSY_AUTH)

        def _relay(self, link: BackendLink, reply: bytes, name: str, backend: Backend, record: UserRecord) -> None:
            client = self.transport
            if client is None or self._busy & BUSY_CLOSING:
                if link.transport is not None:
                    link.transport.abort()
                return
            if link.transport is None:  # closed right after its +OK
                log.warning("backend %s closed after the login user=%s rip=%s", backend, name, self._peer)
                self._answer(ERR_BACKEND, "unavailable")
                return
            buffered = self._parser.buffered
            pipelined = self._tail[len(self._tail) - buffered:] if buffered else b""
            self._tail = b""
            self._parser.discard()
            if len(pipelined) != buffered:  # (cannot happen: data_received keeps what the parser holds)
                link.transport.abort()
                log.error("pipelined commands lost user=%s rip=%s", name, self._peer)
                self._out.append(ERR_BACKEND)
                self._close("pipelined commands lost")
                return
            # the session's own machinery stops here: no more commands, no idle timer
            # (the backend has its own), BUSY_AUTH kept so nothing resumes the pull
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._state = TRANSACTION  # a draining server lets it finish, as a logged-in session
            master = f" master={self._master}" if self._master is not None else ""  # always on the record
            self._route = f"user={record.name}{master} rip={self._peer} backend={backend}"
            self._link = link
            link.relaying = True
            client.write(reply)
            rest = link.leftover()
            if rest:
                client.write(rest)
            if pipelined:
                link.transport.write(pipelined)
            log.info("proxy login %s", self._route)
            self._user = record  # logged in, for the metrics (fastpop.session.metered); cleared before the end
            self._on_logged_in()
            if self._reading_paused:
                self._reading_paused = False
                client.resume_reading()

        # ------------------------------------------------- the relay: client side

        def pause_writing(self) -> None:  # the client reads slower than the backend sends
            link = self._link
            if link is None:
                return base.pause_writing(self)
            if link.transport is not None:
                link.transport.pause_reading()

        def resume_writing(self) -> None:
            link = self._link
            if link is None:
                return base.resume_writing(self)
            if link.transport is not None:
                link.transport.resume_reading()

        def _backend_gone(self) -> None:
            if self.transport is not None:
                self._end_reason = "backend closed"
                self.transport.close()  # after what is buffered for the client

        def shutdown(self, reason: str = "shutdown") -> None:  # (or fastpop kick: "kicked")
            link = self._link
            if link is None:
                return base.shutdown(self, reason)
            self._end_reason = reason
            if link.transport is not None:
                link.transport.abort()
            if self.transport is not None:
                self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._connecting is not None:
                self._connecting.cancel()
                self._connecting = None
            link = self._link
            if link is not None:
                if link.transport is not None:
                    link.transport.close()  # after what the client sent (its QUIT)
                log.info("proxy session %s end=%s", self._route, self._end_reason)
                self._user = None  # the core's session line is a mailbox's: this one is said above
            base.connection_lost(self, exc)

    Routed.__name__ = Routed.__qualname__ = f"Routed{base.__name__}"
    _classes[base] = Routed
    return Routed
