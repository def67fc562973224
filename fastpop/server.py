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
        assert config.passwd_file is not None
        self.config = config
        self.loop = loop
        self.auth = Authenticator(config.passwd_file, config.mail_location)
        self.sessions: set[POP3Protocol] = set()
        self._counter = itertools.count(1)
        self._stamp_prefix = f"<{os.getpid()}."
        self._stamp_suffix = f"@{config.hostname}>"
        self.capa_authorization = self._capa(authorized=False)
        self.capa_transaction = self._capa(authorized=True)

    def new_timestamp(self) -> str:
        """APOP timestamp, unique per connection: <pid.counter.random@host>."""
        return f"{self._stamp_prefix}{next(self._counter)}.{random.getrandbits(40):x}{self._stamp_suffix}"

    def _capa(self, authorized: bool) -> bytes:
        config = self.config
        lines = ["+OK Capability list follows", "TOP", "UIDL"]
        if not authorized:
            lines.append("USER")
        lines += [
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            f"EXPIRE {config.expire.upper()}",
            f"LOGIN-DELAY {config.login_delay}",
            f"IMPLEMENTATION fastpop-{__version__}",
            ".",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("ascii")


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def start(config: Config, ready: asyncio.Future | None = None) -> tuple[ServerContext, list[asyncio.AbstractServer]]:
    """Open every listener; returns the shared context and the servers."""
    loop = asyncio.get_running_loop()
    ctx = ServerContext(config, loop)
    servers = []
    for addr in config.listen:
        host, port = parse_address(addr)
        server = await loop.create_server(
            lambda: POP3Protocol(ctx), host, port, reuse_address=True, backlog=4096
        )
        servers.append(server)
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


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; then close sessions without applying deletions."""
    loop = asyncio.get_running_loop()
    ctx, servers = await start(config)
    lmtp_service = None
    if config.lmtp_listen:
        from fastpop import lmtp

        lmtp_service = await lmtp.start(config, ctx.auth)
    drop_privileges(config.user, config.group)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
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
    for server in servers:
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
    log.info("stopped")


def run(config: Config) -> None:
    config.validate()
    loop = new_event_loop(config.loop)
    try:
        loop.run_until_complete(serve(config))
    finally:
        loop.close()
