"""Starting and stopping the server: event loop, listeners, signals."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import pwd
import grp
import signal
import socket

from fastpop import __version__
from fastpop.auth import Authenticator
from fastpop.config import Config, parse_address
from fastpop.parser import PARSER_IMPL
from fastpop.protocol import POP3Protocol

log = logging.getLogger("fastpop")


class ServerContext:
    """What every session of one server shares."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.auth = Authenticator.from_config(config)
        self.sessions: set[POP3Protocol] = set()
        self.tls_servers: list[asyncio.AbstractServer] = []  # implicit-TLS listeners
        self._counter = itertools.count(1)
        self._stamp_prefix = f"<{os.getpid()}."
        self._stamp_suffix = f"@{config.hostname}>"
        self.capa_transaction = self._capa(authorized=True)
        self._init_security(config)

    def _init_security(self, config: Config) -> None:
        """TLS, SASL, penalties and limits (fastpop.tls, .sasl, .penalty, .oauth)."""
        from fastpop import sasl
        from fastpop.penalty import ConnectionLimiter, LastLogins, Networks, PenaltyBox

        self.tls = None
        if config.tls_cert is not None:
            from fastpop.tls import TLSManager

            self.tls = TLSManager(config)
        self.trusted = Networks(config.trusted_networks)
        self.penalty = PenaltyBox(
            config.auth_penalty_initial, config.auth_penalty_max, config.auth_penalty_half_life,
            per_user=config.auth_penalty_per_user,
        )
        self.connections = ConnectionLimiter(config.max_connections_per_ip)
        self.last_logins = LastLogins()
        self.secret = os.urandom(32)  # stable fake SCRAM salts for unknown users, per process
        self.oauth_validator = None
        if config.oauth_validator:
            from fastpop.oauth import load_validator

            self.oauth_validator = load_validator(config.oauth_validator)
        self.mechanisms = {name: sasl.MECHANISMS[name] for name in config.mechanisms()}
        # CAPA and the bare AUTH listing in AUTHORIZATION depend on whether
        # STLS is still to be offered and whether plaintext logins are allowed.
        self._capa_auth: dict[tuple[bool, bool], bytes] = {}
        self._auth_lists: dict[bool, bytes] = {}
        for plaintext_ok in (False, True):
            names = [n for n, m in self.mechanisms.items() if plaintext_ok or not m.plaintext]
            self._auth_lists[plaintext_ok] = ("".join(f"{n}\r\n" for n in ["+OK", *names]) + ".\r\n").encode("ascii")
            for stls in (False, True):
                self._capa_auth[stls, plaintext_ok] = self._capa(False, stls=stls, plaintext_ok=plaintext_ok, sasl=names)
        self.capa_authorization = self._capa_auth[self.tls is not None, True]

    def capa_for(self, stls: bool, plaintext_ok: bool) -> bytes:
        return self._capa_auth[stls and self.tls is not None, plaintext_ok]

    def auth_list(self, plaintext_ok: bool) -> bytes:
        return self._auth_lists[plaintext_ok]

    def reload(self) -> None:
        """SIGHUP: empty the auth cache and re-read the TLS certificate (the
        passwd-file reloads by itself)."""
        self.auth.flush_cache()  # SQL, LDAP: the next logins ask the database again
        if self.tls is None:
            log.info("SIGHUP: nothing to reload (no TLS configured)")
            return
        self.tls.reload()

    def new_timestamp(self) -> str:
        """APOP timestamp, unique per connection: <pid.counter.random@host>."""
        return f"{self._stamp_prefix}{next(self._counter)}.{random.getrandbits(40):x}{self._stamp_suffix}"

    def _capa(self, authorized: bool, stls: bool = False, plaintext_ok: bool = True,
              sasl: list[str] | None = None) -> bytes:
        config = self.config
        lines = ["+OK Capability list follows", "TOP", "UIDL"]
        if not authorized:
            if plaintext_ok:  # as Dovecot: no USER where it would be refused
                lines.append("USER")
            if stls:
                lines.append("STLS")
            if sasl:
                lines.append("SASL " + " ".join(sasl))
        lines += [
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            f"EXPIRE {config.expire.upper()}",
            f"LOGIN-DELAY {config.login_delay}",
        ]
        if not authorized:
            lines.append("UTF8")
        lines += [
            f"IMPLEMENTATION fastpop-{__version__}",
            ".",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("ascii")


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def start(
    config: Config,
    sockets: list[socket.socket] | None = None,
    tls_sockets: list[socket.socket] | None = None,
) -> tuple[ServerContext, list[asyncio.AbstractServer]]:
    """Open every listener (or serve the given listening sockets, one per
    configured address, as a worker does); returns the context and the servers."""
    loop = asyncio.get_running_loop()
    ctx = ServerContext(config, loop)
    servers = []
    for i, addr in enumerate(config.listen):
        if sockets is not None:
            where = {"sock": sockets[i]}
        else:
            host, port = parse_address(addr)
            where = {"host": host, "port": port, "reuse_address": True}
        server = await loop.create_server(lambda: POP3Protocol(ctx), backlog=4096, **where)
        servers.append(server)
    for i, addr in enumerate(config.listen_tls):
        if tls_sockets is not None:
            where = {"sock": tls_sockets[i]}
        else:
            host, port = parse_address(addr)
            where = {"host": host, "port": port, "reuse_address": True}
        server = await loop.create_server(
            lambda: POP3Protocol(ctx, implicit_tls=True), backlog=4096,
            ssl=ctx.tls.listener_context, ssl_handshake_timeout=config.tls_handshake_timeout, **where,
        )
        ctx.tls_servers.append(server)
    return ctx, servers


def bound_addresses(servers: list[asyncio.AbstractServer]) -> list[str]:
    out = []
    for server in servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return out


def drop_privileges(user: str | None, group: str | None) -> None:
    """After binding privileged ports: become ``user`` (and ``group``, else the user's)."""
    if user is None and group is None:
        return
    if os.getuid() != 0:
        raise PermissionError("--user/--group need the server to be started as root")
    entry = pwd.getpwnam(user) if user is not None else None
    gid = grp.getgrnam(group).gr_gid if group is not None else (entry.pw_gid if entry else os.getgid())
    os.setgroups([])
    os.setgid(gid)
    if entry is not None:
        os.setuid(entry.pw_uid)


async def serve(
    config: Config,
    sockets: list[socket.socket] | None = None,
    tls_sockets: list[socket.socket] | None = None,
    lmtp: bool = True,
) -> None:
    """Run until SIGTERM or SIGINT; then close sessions without applying deletions."""
    loop = asyncio.get_running_loop()
    ctx, servers = await start(config, sockets, tls_sockets)
    lmtp_service = None
    if config.lmtp_listen and lmtp:
        from fastpop import lmtp

        lmtp_service = await lmtp.start(config, ctx.auth)
    drop_privileges(config.user, config.group)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    loop.add_signal_handler(signal.SIGHUP, ctx.reload)
    if ctx.tls_servers:
        log.info("TLS listening on %s (implicit TLS)", ", ".join(bound_addresses(ctx.tls_servers)))
    if lmtp_service is not None:
        log.info("LMTP listening on %s", ", ".join(lmtp_service.addresses))
    log.info(
        "fastpop %s listening on %s (parser: %s, loop: %s, pid %d)",
        __version__,
        ", ".join(bound_addresses(servers)),
        PARSER_IMPL,
        config.loop,
        os.getpid(),
    )
    signum = await stop
    log.info("received %s, shutting down", signal.Signals(signum).name)
    for server in servers + ctx.tls_servers:
        server.close()
    if lmtp_service is not None:
        await lmtp_service.close()
    for session in list(ctx.sessions):
        session.shutdown()
    # Let the closes flush; sessions that do not finish are aborted by the loop's close.
    for _ in range(50):
        if not ctx.sessions:
            break
        await asyncio.sleep(0.02)
    for session in list(ctx.sessions):
        if session.transport is not None:
            session.transport.abort()
    await asyncio.sleep(0)
    await ctx.auth.close()  # the user database's connections
    log.info("stopped")


def run(config: Config) -> int:
    """The server: one process, or a supervisor and ``config.workers`` workers."""
    config.validate()
    if config.workers > 1:
        from fastpop import workers

        return workers.run(config)
    run_worker(config)
    return 0


def run_worker(
    config: Config,
    sockets: list[socket.socket] | None = None,
    tls_sockets: list[socket.socket] | None = None,
    lmtp: bool = True,
) -> None:
    loop = new_event_loop(config.loop)
    try:
        loop.run_until_complete(serve(config, sockets, tls_sockets, lmtp))
    finally:
        loop.close()
