"""``fastpop serve --workers N``: N worker processes under a supervisor.

The supervisor (which stays root if started as root) creates every
listening socket with SO_REUSEPORT, one set per worker, so the kernel spreads
new connections over the workers; it forks the workers, each of which runs
the ordinary single-process server on its own sockets (and drops privileges
as usual), and it restarts a worker that dies, logging why.  Mailbox locks
are lock files naming their owner (fastpop.locking): they hold across
workers, and a killed worker's are taken over.  Connection limits hold across
workers through a shared table (fastpop.limits).  SIGTERM/SIGINT are passed
on and waited for (a worker still running ``shutdown_timeout`` + 10 s later is
killed); SIGHUP is passed on (each worker re-reads the configuration, the
passwd-file and certificates).  LMTP listeners run in worker 0 only: a Unix
socket cannot be bound twice.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Callable

from fastpop.config import Config, parse_address
from fastpop.server import connection_table

log = logging.getLogger("fastpop.workers")

RESTART_BACKOFF = 1.0  # seconds to wait before restarting a worker that died young
YOUNG = 5.0  # a worker that dies within this many seconds of its start died young
STOP_GRACE = 10.0  # seconds past shutdown_timeout before a worker that has not stopped is killed


def listening_socket(addr: str, port: int | None = None) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT for ``addr`` (port override for port 0)."""
    host, addr_port = parse_address(addr)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, addr_port if port is None else port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload = reload
        # Shared before forking: every worker counts its connections in its row.
        self.connections = connection_table(config, config.workers)
        self.stop_deadline: float | None = None
        self.addresses = config.listen + config.proxy_listen + config.proxy_listen_tls  # server.start splits them
        self.tls_addresses = list(config.listen_tls)
        self.ports: dict[str, int] = {}  # address -> port actually bound (for port 0)
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
        self.stopping = False
        self.exit_code = 0

    def _sockets(self) -> tuple[list[socket.socket], list[socket.socket]]:
        out = []
        for addrs in (self.addresses, self.tls_addresses):
            socks = []
            for addr in addrs:
                sock = listening_socket(addr, self.ports.get(addr))
                self.ports.setdefault(addr, sock.getsockname()[1])
                socks.append(sock)
            out.append(socks)
        return out[0], out[1]

    def _spawn(self, index: int) -> None:
        pop3, tls = self._sockets()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                from fastpop import server

                self.connections.use_row(index)
                server.run_worker(self.config, pop3, tls, lmtp=index == 0, reload=self.reload,
                                  connections=self.connections)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        for sock in pop3 + tls:
            sock.close()  # the worker has them now
        self.workers[pid] = (index, time.monotonic())
        log.info("worker %d started (pid %d)", index, pid)

    def _signal(self, signum: int, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            if self.stop_deadline is None:  # workers drain; kill any that outlive their deadline
                self.stop_deadline = time.monotonic() + self.config.shutdown_timeout + STOP_GRACE
                signal.setitimer(signal.ITIMER_REAL, self.config.shutdown_timeout + STOP_GRACE)
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        # The first worker's sockets fix the ports (port 0 becomes a real one);
        # the supervisor keeps none open, so only workers accept.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        signal.signal(signal.SIGALRM, self._overdue)
        log.info("supervisor pid %d starting %d workers", os.getpid(), self.config.workers)
        for index in range(self.config.workers):
            self._spawn(index)
        while self.workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.workers:
                continue
            index, started = self.workers.pop(pid)
            self.connections.clear_row(index)  # its connections died with it
            if self.stopping:
                continue
            why = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                   else f"exited with status {os.WEXITSTATUS(status)}")
            log.error("worker %d (pid %d) %s; starting a new one", index, pid, why)
            if time.monotonic() - started < YOUNG:
                time.sleep(RESTART_BACKOFF)  # do not spin on a worker that cannot start
            if not self.stopping:
                try:
                    self._spawn(index)
                except OSError as exc:
                    log.error("cannot restart worker %d: %s", index, exc)
                    self.exit_code = 1
        log.info("all workers stopped")
        return self.exit_code


    def _overdue(self, signum: int, frame) -> None:
        for pid, (index, _) in list(self.workers.items()):
            log.error("worker %d (pid %d) still running %g s after SIGTERM; killing it",
                      index, pid, self.config.shutdown_timeout + STOP_GRACE)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(config: Config, reload: Callable[[], Config] | None = None) -> int:
    sys.stdout.flush()
    return Supervisor(config, reload).run()
