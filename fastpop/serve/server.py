"""Starting and stopping the server: event loop, listeners, signals."""

from __future__ import annotations

import asyncio
import functools
import grp
import itertools
import logging
import os
import pwd
import random
import resource
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

from fastpop import __version__
from fastpop.auth.authenticator import Authenticator, server_secret
from fastpop.auth.penalty import LastLogins, SharedFailures
from fastpop.config import Config
from fastpop.limits import (
    ConnectionTable,
    connections_per_worker,
)
from fastpop.net import listening_socket, parse_address
from fastpop.serve.listeners import ListenerLocks, bind_listener
from fastpop.serve.preload import preload
from fastpop.session.protocol import POP3Protocol
from fastpop.store import index, maildir, safefs
from fastpop.store.locking import mailbox_locks
from fastpop.wire.parser import PARSER_IMPL

if TYPE_CHECKING:
    from fastpop.proxy.routing import Router
    from fastpop.serve.control import WorkerControl
    from fastpop.session.metered import Counters
    from fastpop.session.tls import TLSManager

log = logging.getLogger("fastpop")


class Listener(Protocol):
    """What the server uses of a listener: an asyncio.Server, or a PROXY TLS
    listener (fastpop.session.proxied.ProxyTLSListener)."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...
    async def start_serving(self) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


class ServerContext:
    """What every session of one server shares."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 shared: WorkerTables | None = None) -> None:
        assert config.passwd_file is not None
        self.config = config
        self.loop = loop
        self.auth = Authenticator.from_config(config)
        # master users (fastpop.auth.sasl.master_login): their own passwd-file, read before privileges drop
        self.masters = (Authenticator(config.auth_master_passwd_file, config.mail_location)
                        if config.auth_master_passwd_file else None)
        self.sessions: set[POP3Protocol] = set()
        self.connections = shared.connections if shared is not None else connection_table(config)
        # opened here, before privileges are dropped, once per process (fastpop.store.locking)
        self.mailbox_locks = mailbox_locks(config.mail_lock, config.mail_lock_table)
        self._full_logged = 0.0
        self.tls_servers: list[asyncio.Server] = []  # implicit-TLS listeners
        self.proxy_servers: list[Listener] = []  # PROXY protocol listeners (fastpop.session.proxied)
        self._counter = itertools.count(1)
        self._stamp_prefix = f"<{os.getpid()}."
        self._stamp_suffix = f"@{config.hostname}>"
        self.capa_transaction = self._capa(authorized=True)
        self.metrics: Counters | None = None  # when metrics are on
        self.router: Router | None = None  # fastpop proxy (fastpop.proxy.routing)
        if config.backend_route:
            from fastpop.proxy.routing import Router

            self.router = Router(config)
            self.router.start(loop)
        # fastpop.serve.control: set by the control socket (or inherited from the supervisor)
        self.maintenance = False
        self.denied: frozenset[str] = frozenset()
        self._shared_failures = shared.failures if shared is not None else None  # the penalty counts of all workers
        # made-up SCRAM salts: read before privileges are dropped, kept across SIGHUP
        self.secret = server_secret(config)
        self._init_security(config, shared.last_logins if shared is not None else None)

    def _init_security(self, config: Config, last_logins: LastLogins | None = None,
                       tls: TLSManager | None = None) -> None:
        """TLS, SASL, penalties and limits (fastpop.session.tls, .sasl, .penalty, .oauth)."""
        from fastpop.auth import sasl
        from fastpop.auth.penalty import PenaltyBox
        from fastpop.net import Networks

        self.tls = None
        if config.tls_cert is not None and tls is not None:
            tls.configure(config)  # the manager the listeners' SNI callback asks; reload() reads the files
            self.tls = tls
        elif config.tls_cert is not None:
            from fastpop.session.tls import TLSManager

            self.tls = TLSManager(config)
        self.trusted = Networks(config.trusted_networks)
        self.cap_exempt = Networks(config.max_connections_per_ip_exempt)
        self.penalty = PenaltyBox(
            config.auth_penalty_initial, config.auth_penalty_max, config.auth_penalty_half_life,
            per_user=config.auth_penalty_per_user, shared=self._shared_failures,
        )
        self.last_logins = last_logins or LastLogins()  # a worker's: shared with the others
        # APOP only when configured (it needs clear-text passwords and is broken
        # without TLS): new greetings carry a timestamp, which is what offers it
        # (RFC 1939 4; RFC 2449 has no APOP capability, so CAPA is the same).
        self.apop = config.auth_apop
        self.oauth_validator = None
        if config.oauth_validator:
            from fastpop.auth.oauth import load_validator

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
                self._capa_auth[stls, plaintext_ok] = self._capa(False, stls=stls, plaintext_ok=plaintext_ok,
                                                                 sasl=names)
        self.capa_authorization = self._capa_auth[self.tls is not None, True]

    def capa_for(self, stls: bool, plaintext_ok: bool) -> bytes:
        return self._capa_auth[stls and self.tls is not None, plaintext_ok]

    def auth_list(self, plaintext_ok: bool) -> bytes:
        return self._auth_lists[plaintext_ok]

    def reload(self, config: Config | None = None) -> None:
        """SIGHUP: apply a re-read configuration (when given) to new logins and
        connections, re-read the passwd-file and the TLS certificate.  Open
        sessions keep their login; penalties and connection counts are kept."""
        old = self.config
        if config is not None:
            fixed = [name for name in RESTART_ONLY if getattr(config, name) != getattr(old, name)]
            if fixed:
                log.warning("SIGHUP: %s changed; that takes a restart (keeping the old value)", ", ".join(fixed))
                for name in fixed:
                    setattr(config, name, getattr(old, name))
            self.config = config
            penalty = self.penalty
            # the logins so far, the workers' shared rows, the TLS manager the listeners ask
            self._init_security(config, self.last_logins, self.tls)
            penalty.configure(config.auth_penalty_initial, config.auth_penalty_max, config.auth_penalty_half_life,
                              config.auth_penalty_per_user)
            self.penalty = penalty  # failure counts survive a reload
            self.capa_transaction = self._capa(authorized=True)
            self.connections.per_address = config.max_connections_per_ip
            self.connections.total = config.max_connections
            if self.router is not None:  # fastpop proxy: the backends as now configured, all thought up
                from fastpop.proxy.routing import Router

                self.router.close()
                self.router = Router(config)
                self.router.start(self.loop)
        try:
            self.auth.reload()  # the passwd-file re-read now; SQL/LDAP: the auth cache emptied
            if self.masters is not None:
                self.masters.reload()
        except (OSError, ValueError) as exc:
            log.error("SIGHUP: user database not re-read: %s", exc)
        if self.tls is not None:
            self.tls.reload()
            self.tls.watch(self.loop)  # (a new reload_interval)
        log.info("SIGHUP: configuration, passwd-file%s reloaded", " and certificate" if self.tls else "")

    def log_full(self, reason: str) -> None:
        """A connection refused for the server's own limits: log at most every 10 s."""
        now = self.loop.time()
        if now - self._full_logged >= 10.0:
            self._full_logged = now
            log.warning("refusing connections: %d open (%s limit)", self.connections.open_total(),
                        "max_connections" if reason == "total" else "descriptor")

    def session_class(self, base: type) -> type:
        """The class of the sessions a listener makes: ``base`` itself, or with
        metrics on its counting subclass (fastpop.serve.metrics)."""
        if self.router is not None:  # fastpop proxy: logins relayed to backends
            from fastpop.proxy.relay import routed

            base = routed(base)
        if self.metrics is None:
            return base
        from fastpop.session.metered import metered

        return metered(base)

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
            # RFC 2449: USER before login when users' values may differ (after it, the user's own)
            f"EXPIRE {config.expire.upper()}{' USER' if config.expire_per_user and not authorized else ''}",
            f"LOGIN-DELAY {config.login_delay}",
        ]
        if not authorized:
            lines.append("UTF8")
        lines += [
            f"IMPLEMENTATION fastpop-{__version__}",
            ".",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("ascii")


# Settings a running server cannot change (SIGHUP keeps the old value and says so).
RESTART_ONLY = ("listen", "listen_tls", "lmtp_listen", "loop", "workers", "user", "group",
                "proxy_listen", "proxy_listen_tls",
                "backend_route",  # the listeners' session class (fastpop proxy)
                "auth_secret_file",  # read once, before privileges are dropped and workers forked
                # the user database: LMTP and open pools hold the one built at start
                "passwd_file", "auth_master_passwd_file", "mail_location", "mail_lock", "mail_lock_table",
                "mail_index",  # checked and opened once, as the serving uid
                "mail_uidl", "deleted_flag",  # set once per process (fastpop.store.maildir.configure_*)
                "control_socket", "control_group", "control_deny_file",  # made and read before privileges drop
                *(f.name for f in fields(Config)
                                                 if f.name.startswith(("userdb_", "ldap_", "auth_cache_"))))


@dataclass
class WorkerTables:
    """What the workers of one server share, in memory made before the fork
    (fastpop.serve.workers): connection counts, LOGIN-DELAY's last logins and
    the password-guessing penalties; each worker writes its own row."""

    connections: ConnectionTable
    last_logins: LastLogins
    failures: SharedFailures

    @classmethod
    def create(cls, config: Config) -> WorkerTables:
        return cls(connection_table(config, config.workers), LastLogins(workers=config.workers),
                   SharedFailures(config.workers))

    def use_row(self, worker: int) -> None:
        """In worker ``worker``: write into its rows."""
        self.connections.use_row(worker)
        self.last_logins.use_row(worker)
        self.failures.use_row(worker)


def connection_table(config: Config, workers: int = 1) -> ConnectionTable:
    per_worker = connections_per_worker(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return ConnectionTable(config.max_connections_per_ip, config.max_connections, per_worker, workers)


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_quiet_accept_errors())
    return loop


def _quiet_accept_errors():
    """asyncio's loop logs a traceback for every failed accept while out of
    descriptors (thousands a second) and retries after 1 s; keep the retry,
    log one line every 10 s.  (uvloop's libuv closes what it cannot accept,
    silently, and goes on.)"""
    last = [0.0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            now = loop.time()
            if now - last[0] >= 10.0:
                last[0] = now
                log.error("accept failed: %s; pausing accepts for 1 s", exc)
            return
        if isinstance(exc, ValueError) and "Invalid file descriptor: -1" in str(exc):
            return  # asyncio's accept retry firing after the listener closed at shutdown
        loop.default_exception_handler(context)

    return handler


async def start(
    config: Config,
    sockets: list[socket.socket] | None = None,
    tls_sockets: list[socket.socket] | None = None,
    shared: WorkerTables | None = None,
) -> tuple[ServerContext, list[asyncio.Server]]:
    """Open every listener (or serve the given listening sockets, one per
    configured address, as a worker does); returns the context and the servers."""
    loop = asyncio.get_running_loop()
    ctx = ServerContext(config, loop, shared)
    if config.metrics_listen:  # metrics off: the plain protocol, nothing counted
        from fastpop.session.metered import Counters

        ctx.metrics = Counters()
    protocol = ctx.session_class(POP3Protocol)
    # a worker's sockets (or systemd's): POP3 ones first, then one per proxy address
    n_proxy = len(config.proxy_listen) + len(config.proxy_listen_tls)
    pop3_sockets = proxy_sockets = None
    if sockets is not None:
        pop3_sockets, proxy_sockets = sockets[:len(sockets) - n_proxy], sockets[len(sockets) - n_proxy:]
    # Bound now (as root, for ports below 1024), serving only once privileges
    # are dropped (serve() calls start_serving): no connection is ever served as root.
    servers = []
    for where in _where(config.listen, pop3_sockets):
        server = await loop.create_server(lambda: protocol(ctx), backlog=4096, start_serving=False, **where)
        servers.append(server)
    for where in _where(config.listen_tls, tls_sockets):
        assert ctx.tls is not None, "TLS listeners need a certificate (Config.validate, socket activation)"
        server = await loop.create_server(
            lambda: protocol(ctx, implicit_tls=True), backlog=4096, start_serving=False,
            ssl=ctx.tls.listener_context, ssl_handshake_timeout=config.tls_handshake_timeout, **where,
        )
        ctx.tls_servers.append(server)
    if config.proxy_listen or config.proxy_listen_tls:  # a worker's sockets: listen's, then the proxy ones

        ctx.proxy_servers = await start_proxy_listeners(ctx, proxy_sockets)
    return ctx, servers


def _where(addresses: list[str], sockets: list[socket.socket] | None) -> list[dict]:
    """create_server arguments: the given sockets (a worker's, or systemd's), else the addresses."""
    if sockets is not None:
        return [{"sock": sock} for sock in sockets]
    return [dict(zip(("host", "port"), parse_address(addr), strict=True), reuse_address=True) for addr in addresses]


def bound_addresses(servers: Sequence[Listener]) -> list[str]:
    out = []
    for server in servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return out


class RefusedAsRoot(Exception):
    """Started as root with nobody to become: fastpop would touch mail as root."""


def refuse_mail_as_root(config: Config) -> None:
    """Raise RefusedAsRoot when this process would serve mail as root.

    A user who can write their own Maildir decides what its names, links and
    files are; run as root, every mistake in reading them is a way to read or
    remove any file of the host (docs/security.md).  Dovecot refuses the same.
    """
    if os.geteuid() != 0 or config.user is not None:
        return
    if config.allow_mail_as_root:
        log.warning(
            "serving mail as root (allow_mail_as_root): safe only where no untrusted user "
            "can write a Maildir; set [server] user instead (docs/security.md)"
        )
        return
    raise RefusedAsRoot(
        "refusing to serve mail as root: set [server] user (or --user) to the owner of the "
        "Maildirs, e.g. vmail, or start fastpop as that user; --allow-mail-as-root "
        "([server] allow_mail_as_root = true) overrides this where only trusted users can "
        "write Maildirs (docs/security.md)"
    )


def drop_privileges(user: str | None, group: str | None) -> None:
    """After binding privileged ports: become ``user`` (and ``group``, else the user's)."""
    if user is None and group is None:
        return
    entry = pwd.getpwnam(user) if user is not None else None
    gid = grp.getgrnam(group).gr_gid if group is not None else (entry.pw_gid if entry else os.getgid())
    if os.getuid() != 0:
        # Already that user (systemd's User=, one config for both ways of starting): nothing to do
        if (entry is None or entry.pw_uid == os.getuid()) and gid == os.getgid():
            return
        raise PermissionError("--user/--group need the server to be started as root")
    os.setgroups([])
    os.setgid(gid)
    if entry is not None:
        os.setuid(entry.pw_uid)
        safefs.forget_euid()
        # as su(1) does: files a library looks for in $HOME (asyncpg's ~/.postgresql/
        # and ~/.pgpass) are the user's, not root's, which it could not read
        os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)


async def serve(
    config: Config,
    sockets: list[socket.socket] | None = None,
    tls_sockets: list[socket.socket] | None = None,
    lmtp: bool = True,
    reload: Callable[[], Config] | None = None,
    shared: WorkerTables | None = None,
    alive_fd: int | None = None,
    ready_fd: int | None = None,
    control: WorkerControl | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain (see ``drain``).  SIGHUP applies
    ``reload()``'s configuration (the config file read again).

    A worker gets ``alive_fd``, the read end of a pipe only its supervisor
    can write to: end of file there (the supervisor gone, however it ended)
    stops the worker as SIGTERM does.  It writes a byte to ``ready_fd`` once
    every one of its listeners accepts."""
    # systemd (fastpop.serve.systemd) and metrics (fastpop.serve.metrics): a single process
    # takes systemd's sockets and serves the metrics endpoint itself; a worker
    # leaves both to its supervisor.
    from fastpop.serve import systemd

    single = sockets is None
    notifier = systemd.take_notifier()
    # One generation per port: a single process claims what it binds itself; a
    # worker's claims are its supervisor's, inherited with its sockets.
    locks = ListenerLocks(config) if single else None
    try:
        inherited: list[socket.socket] = []
        if single:
            assert locks is not None
            activated = systemd.activated_sockets()
            if activated is not None:
                sockets, tls_sockets = activated.pop3 or None, activated.tls or None
                inherited = activated.pop3 + activated.tls
                if tls_sockets and config.tls_cert is None:
                    raise OSError("socket activation: a socket named pop3s serves implicit TLS and needs a certificate")
                if sockets is not None:  # the PROXY listeners are never inherited: bound here, after them
                    sockets = sockets + [bind_listener(locks, a) for a in config.proxy_listen + config.proxy_listen_tls]
            for addresses, given in ((config.listen, sockets), (config.listen_tls, tls_sockets),
                                     (config.proxy_listen + config.proxy_listen_tls, sockets)):
                if given is None:
                    locks.claim_addresses(addresses)  # a fixed port: before it is bound
        await _serve(config, sockets, tls_sockets, lmtp, reload, shared, notifier, locks, inherited,
                     alive_fd, ready_fd, control)
    finally:
        if locks is not None:
            locks.release()


async def _serve(config: Config, sockets: list[socket.socket] | None, tls_sockets: list[socket.socket] | None,
                 lmtp: bool, reload: Callable[[], Config] | None, shared: WorkerTables | None, notifier: Any,
                 locks: ListenerLocks | None, inherited: list[socket.socket], alive_fd: int | None,
                 ready_fd: int | None, control: WorkerControl | None) -> None:
    from fastpop.serve import control as control_mod

    loop = asyncio.get_running_loop()
    single = locks is not None
    ctx, servers = await start(config, sockets, tls_sockets, shared)
    if locks is not None:  # port 0 (and names that resolve to more): the addresses bound, before they accept
        own = {s.fileno() for s in inherited}
        for server in servers + ctx.tls_servers + ctx.proxy_servers:
            for sock in server.sockets:
                if sock.fileno() not in own:
                    locks.claim(sock.family, sock.getsockname(), _shown(sock))
    process_metrics = None
    if ctx.metrics is not None:
        from fastpop.serve.metrics import ProcessMetrics

        process_metrics = await ProcessMetrics.start(ctx, loop, serve_http=single)
    lmtp_service = None
    if config.lmtp_listen and lmtp:
        from fastpop.delivery import lmtp as lmtp_server

        lmtp_service = await lmtp_server.start(config, ctx.auth, ctx.connections,
                                               lambda: ctx.config)  # counted in max_connections
    control_socket = None
    if control is not None:  # a worker: the supervisor's state, and its channel
        ctx.maintenance, ctx.denied = control.state.maintenance, control.state.denied
    elif single:  # made and read before privileges drop
        ctx.denied = control_mod.load_denied(control_mod.deny_path(config))
        control_socket = control_mod.open_socket(config)
    preload(config)  # whatever a login, a reload or a delivery may need: the files may be unreadable in a moment
    ctx.auth.watch(loop)  # the passwd-file, by inotify: no stat per login (before the uid changes)
    try:
        drop_privileges(config.user, config.group)
        await _serve_as_user(ctx, servers, lmtp_service, reload, alive_fd, ready_fd, single, notifier,
                             process_metrics, control, control_socket)
    finally:
        if control_socket is not None:
            control_socket.close()


async def _serve_as_user(ctx: ServerContext, servers: list[asyncio.Server], lmtp_service: Any,
                         reload: Callable[[], Config] | None, alive_fd: int | None, ready_fd: int | None,
                         single: bool, notifier: Any, process_metrics: Any, control: WorkerControl | None,
                         control_socket: Any) -> None:
    """_serve once privileges are dropped: serve until told to stop, then drain."""
    from fastpop.serve import control as control_mod
    from fastpop.serve import systemd

    loop = asyncio.get_running_loop()
    config = ctx.config
    index.configure(config.mail_index)  # as the serving uid: the directory must be its own
    maildir.configure_uidl(config.mail_uidl)
    maildir.configure_deleted_flag(config.deleted_flag)
    if ctx.tls is not None:
        ctx.tls.warn_unreadable()  # renewals are read as the serving uid from here on
        ctx.tls.watch(loop)
    stop: asyncio.Queue[str] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.put_nowait, signal.Signals(sig).name)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(ctx, reload))
    if alive_fd is not None:
        watch_supervisor(loop, alive_fd, stop)
    # the control socket before the "listening" line: whoever waits for it may use it
    control_server = channel_task = None
    if control_socket is not None:
        control_server = await control_mod.serve_socket(ctx, control_socket, control_mod.deny_path(config))
        log.info("control socket %s", control_socket.path)
    elif control is not None:
        channel_task = loop.create_task(control_mod.serve_channel(ctx, control.channel, control.index))
    if stop.empty():  # (a worker whose supervisor died while it started never serves)
        # LMTP first: a client that reached POP3 finds LMTP open too
        if lmtp_service is not None:
            await lmtp_service.start_serving()
        for listener in ctx.proxy_servers[len(config.proxy_listen):]:  # the PROXY TLS ones accept by hand
            for sock in listener.sockets:
                sock.listen(4096)
        for server in servers + ctx.tls_servers + ctx.proxy_servers:
            await server.start_serving()  # (an event loop's server listens now)
        _log_listening(ctx, servers, lmtp_service, single)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"1")
        except OSError:
            pass  # the supervisor is gone: alive_fd says so too
        os.close(ready_fd)
    listening = f"Listening on {', '.join(bound_addresses(servers))}"
    notifier.ready(listening)
    watchdog = systemd.LoopWatchdog(notifier, loop, lambda: f"{listening}; connections: {len(ctx.sessions)}")
    why = await stop.get()  # a signal's name, or SUPERVISOR_GONE
    if alive_fd is not None:
        loop.remove_reader(alive_fd)  # draining now: the supervisor's end must not cut it short
    notifier.stopping(f"Stopping ({why})")
    for server in servers + ctx.tls_servers + ctx.proxy_servers:
        server.close()  # no new connections from here on
    deadline = ctx.config.shutdown_timeout
    if lmtp_service is not None:  # deliveries under way are answered, within the same deadline
        await asyncio.gather(lmtp_service.close(deadline), drain(ctx, deadline, stop, _event(why)))
    else:
        await drain(ctx, deadline, stop, _event(why))
    watchdog.close()
    if ctx.tls is not None:
        ctx.tls.close()
    if control_server is not None:
        control_server.close()
    if channel_task is not None:
        channel_task.cancel()
    if process_metrics is not None:
        process_metrics.close()  # the last counts, then the endpoint
    await ctx.auth.close()  # the user database's connections
    if ctx.router is not None:
        ctx.router.close()  # its health checks
    log.info("stopped")


def _log_listening(ctx: ServerContext, servers: list[asyncio.Server], lmtp_service: Any, single: bool) -> None:
    if ctx.tls_servers:
        log.info("TLS listening on %s (implicit TLS)", ", ".join(bound_addresses(ctx.tls_servers)))
    if ctx.proxy_servers:
        log_proxy_listening(ctx)
    if lmtp_service is not None:
        log.info("LMTP listening on %s", ", ".join(lmtp_service.addresses))
    if single:
        log.info("fastpop %s listening on %s (parser: %s, loop: %s, pid %d)", __version__,
                 ", ".join(bound_addresses(servers)), PARSER_IMPL, ctx.config.loop, os.getpid())
    else:  # the supervisor says "listening" once every worker is
        log.info("worker serving on %s (pid %d)", ", ".join(bound_addresses(servers)), os.getpid())


SUPERVISOR_GONE = "supervisor gone"


def _event(why: str) -> str:
    return f"received {why}" if why.startswith("SIG") else why


def watch_supervisor(loop: asyncio.AbstractEventLoop, alive_fd: int, stop: asyncio.Queue[str]) -> None:
    """End of file on ``alive_fd`` (its one writer, the supervisor, is gone): put
    SUPERVISOR_GONE in ``stop``, once.  Nothing else is ever written there."""

    def readable() -> None:
        try:
            data = os.read(alive_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return
        loop.remove_reader(alive_fd)
        log.warning("the supervisor is gone: stopping as on SIGTERM")
        stop.put_nowait(SUPERVISOR_GONE)

    os.set_blocking(alive_fd, False)
    loop.add_reader(alive_fd, readable)
    readable()  # gone already?


def _reload(ctx: ServerContext, reload: Callable[[], Config] | None) -> None:
    try:
        config = reload() if reload is not None else None
    except (OSError, ValueError) as exc:
        log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
        config = None  # the passwd-file and certificate are still re-read
    ctx.reload(config)


async def drain(ctx: ServerContext, deadline: float, signals: asyncio.Queue, why: str) -> None:
    """Graceful stop (``why``: "received SIGTERM", ...): sessions not logged
    in end now; logged-in ones may finish (QUIT applies their deletions) for
    up to ``deadline`` seconds or until a second signal; then the rest are
    closed with [SYS/TEMP] and nothing deleted, which releases every mailbox lock."""
    going_on = sum(session.drain() for session in list(ctx.sessions))
    if going_on and deadline > 0:
        log.info("%s: %d sessions have up to %g s to finish", why, going_on, deadline)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        second = asyncio.ensure_future(signals.get())
        try:
            while ctx.sessions and not second.done() and loop.time() < end:
                await asyncio.wait([second], timeout=min(0.05, max(0.0, end - loop.time())))
        finally:
            second.cancel()
    else:
        log.info("%s, shutting down", why)
    if ctx.sessions:
        log.info("closing %d sessions that did not finish (nothing deleted)", len(ctx.sessions))
    for session in list(ctx.sessions):
        session.shutdown()
    # Let the closes flush; sessions that do not finish are aborted.
    for _ in range(50):
        if not ctx.sessions:
            break
        await asyncio.sleep(0.02)
    for session in list(ctx.sessions):
        if session.transport is not None:
            session.transport.abort()
    await asyncio.sleep(0)


def run_worker(
    config: Config,
    sockets: list[socket.socket] | None = None,
    tls_sockets: list[socket.socket] | None = None,
    lmtp: bool = True,
    reload: Callable[[], Config] | None = None,
    shared: WorkerTables | None = None,
    alive_fd: int | None = None,
    ready_fd: int | None = None,
    control: WorkerControl | None = None,
) -> None:
    loop = new_event_loop(config.loop)
    try:
        loop.run_until_complete(serve(config, sockets, tls_sockets, lmtp, reload, shared, alive_fd, ready_fd,
                                      control))
    finally:
        loop.close()


def _shown(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


async def start_proxy_listeners(ctx: ServerContext, sockets: list[socket.socket] | None = None) -> list[Listener]:
    """The listeners of ``[proxy] listen`` and ``[proxy] listen_tls`` (or the
    given listening sockets, one per address, in that order): fastpop.session.proxied."""
    from fastpop.session.proxied import (
        ProxiedPOP3Protocol,
        ProxySettings,
        ProxyTLSListener,
    )

    config = ctx.config
    settings = ProxySettings(config)
    servers: list[Listener] = []
    for i, addr in enumerate(config.proxy_listen):
        where: dict[str, Any]
        if sockets is not None:
            where = {"sock": sockets[i]}
        else:
            host, port = parse_address(addr)
            where = {"host": host, "port": port, "reuse_address": True}
        session = ctx.session_class(ProxiedPOP3Protocol)  # metrics on: a counting subclass
        servers.append(await ctx.loop.create_server(functools.partial(session, ctx, settings), backlog=4096,
                                                    start_serving=False, **where))  # (server.serve starts them)
    for i, addr in enumerate(config.proxy_listen_tls, len(config.proxy_listen)):
        sock = sockets[i] if sockets is not None else listening_socket(addr, reuse_port=False)
        servers.append(ProxyTLSListener(ctx, settings, sock))
    return servers


def log_proxy_listening(ctx: ServerContext) -> None:
    config = ctx.config
    plain = len(config.proxy_listen)
    proxies = ", ".join(config.proxy_trusted_networks)
    if plain:
        log.info("PROXY protocol listening on %s (proxies: %s)", ", ".join(bound_addresses(ctx.proxy_servers[:plain])),
                 proxies)
    if ctx.proxy_servers[plain:]:
        log.info("PROXY protocol listening on %s (implicit TLS; proxies: %s)",
                 ", ".join(bound_addresses(ctx.proxy_servers[plain:])), proxies)
