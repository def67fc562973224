"""``fastpop serve``: one process, or N worker processes under a supervisor
(``--workers N``); ``run`` chooses.

The supervisor (which stays root if started as root) creates every
listening socket with SO_REUSEPORT, one set per worker, so the kernel spreads
new connections over the workers; it forks the workers, each of which runs
the ordinary single-process server on its own sockets (and drops privileges
as usual), and it restarts a worker that dies, logging why.  Mailbox locks
(fastpop.store.locking) hold across workers: each opens the host's lock table
itself, and a killed worker's locks die with it.  Connection limits hold across
workers through a shared table (fastpop.limits), and so do password-guessing
penalties (fastpop.auth.penalty.SharedFailures).  SIGTERM/SIGINT are passed
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
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastpop.auth.authenticator import server_secret
from fastpop.config import Config
from fastpop.limits import connections_per_worker, raise_descriptor_limit
from fastpop.serve import server
from fastpop.serve.server import WorkerTables, listening_socket, refuse_mail_as_root
from fastpop.serve.validation import validate_all

if TYPE_CHECKING:
    from fastpop.serve.metrics import HTTPEndpoint

log = logging.getLogger("fastpop.workers")

RESTART_BACKOFF = 1.0  # seconds to wait before restarting a worker that died young
YOUNG = 5.0  # a worker that dies within this many seconds of its start died young
STOP_GRACE = 10.0  # seconds past shutdown_timeout before a worker that has not stopped is killed


class Supervisor:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload = reload
        # Made before forking: each worker writes its own rows, reads all of them.
        self.shared = WorkerTables.create(config)  # connections, LOGIN-DELAY, penalties across workers
        self.stop_deadline: float | None = None
        self.addresses = config.listen + config.proxy_listen + config.proxy_listen_tls  # server.start splits them
        self.tls_addresses = list(config.listen_tls)
        self.ports: dict[str, int] = {}  # address -> port actually bound (for port 0)
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
        self.stopping = False
        self.exit_code = 0
        # systemd (fastpop.serve.systemd): the supervisor notifies, and hands
        # inherited sockets to every worker instead of binding per worker.
        from fastpop.serve import systemd

        self.notifier = systemd.take_notifier()
        self.activated = systemd.activated_sockets()
        self.proxy_addresses = config.proxy_listen + config.proxy_listen_tls  # never inherited
        if self.activated is not None and self.activated.tls and config.tls_cert is None:
            raise OSError("socket activation: a socket named pop3s serves implicit TLS and needs a certificate")
        self.metrics_dir: str | None = None
        self.metrics_endpoint: HTTPEndpoint | None = None

    def _sockets(self) -> tuple[list[socket.socket], list[socket.socket]]:
        """One worker's listening sockets: POP3 (then the PROXY listeners') and
        implicit TLS.  Sockets from systemd are shared by every worker and kept
        open here; the others are bound anew for each worker (SO_REUSEPORT)."""
        activated = self.activated
        if activated is not None and activated.pop3:
            proxies = self.addresses[len(self.addresses) - len(self.proxy_addresses):]
            pop3 = activated.pop3 + self._bind(proxies)
        else:
            pop3 = self._bind(self.addresses)
        tls = activated.tls if activated is not None and activated.tls else self._bind(self.tls_addresses)
        return pop3, tls

    def _bind(self, addresses: list[str]) -> list[socket.socket]:
        socks = []
        for addr in addresses:
            sock = listening_socket(addr, self.ports.get(addr))
            self.ports.setdefault(addr, sock.getsockname()[1])
            socks.append(sock)
        return socks

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
                if self.metrics_endpoint is not None:
                    self.metrics_endpoint.server.socket.close()  # the supervisor's, not the worker's
                self.shared.use_row(index)
                server.run_worker(self.config, pop3, tls, lmtp=index == 0, reload=self.reload, shared=self.shared)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        for sock in pop3 + tls:
            if not self._inherited(sock):
                sock.close()  # the worker has them now
        self.workers[pid] = (index, time.monotonic())
        log.info("worker %d started (pid %d)", index, pid)

    def _inherited(self, sock: socket.socket) -> bool:
        return self.activated is not None and any(sock is s for s in self.activated.pop3 + self.activated.tls)

    def _signal(self, signum: int, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                self.notifier.stopping(f"Stopping ({signal.Signals(signum).name})")
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
        self._start_metrics()
        try:
            for index in range(self.config.workers):
                self._spawn(index)
            self._ready()
            return self._wait()
        finally:
            self._stop_ops()

    def _start_metrics(self) -> None:
        """fastpop.serve.metrics: the workers write their counts into a private
        directory; the supervisor serves the sum of them."""
        if not self.config.metrics_listen:
            return
        from fastpop.serve import metrics

        self.metrics_dir = metrics.prepare_environment(self.config)
        self.metrics_endpoint = metrics.HTTPEndpoint(self.config.metrics_listen, metrics.collector_registry())
        log.info("metrics on http://%s/metrics", self.metrics_endpoint.address)

    def _ready(self) -> None:
        """systemd: READY=1 (the listeners are open: the supervisor opened or
        inherited them) and WATCHDOG=1 pings while every worker runs."""
        import threading

        inherited = self.activated.pop3 + self.activated.tls if self.activated is not None else []
        addresses = [f"{a.rpartition(':')[0]}:{port}" for a, port in self.ports.items()]
        addresses += ["{}:{}".format(*s.getsockname()[:2]) for s in inherited if s.family != socket.AF_UNIX]
        self.notifier.ready(f"Listening on {', '.join(addresses)} with {self.config.workers} workers")
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        self._watchdog_stop = threading.Event()

        def ping() -> None:
            while not self._watchdog_stop.wait(interval):
                if len(self.workers) == self.config.workers and not self.stopping:
                    self.notifier.watchdog()

        self.notifier.watchdog()
        threading.Thread(target=ping, name="fastpop-watchdog", daemon=True).start()

    def _stop_ops(self) -> None:
        stop = getattr(self, "_watchdog_stop", None)
        if stop is not None:
            stop.set()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.metrics_dir is not None:
            from fastpop.serve.metrics import cleanup_environment

            cleanup_environment(self.metrics_dir)

    def _wait(self) -> int:
        while self.workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.workers:
                continue
            index, started = self.workers.pop(pid)
            self.shared.connections.clear_row(index)  # its connections died with it
            if self.metrics_dir is not None:
                from fastpop.serve.metrics import mark_process_dead

                mark_process_dead(pid)  # its live gauges go; its counters stay in the totals
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
    """The server: one process, or a supervisor and ``config.workers`` workers.
    ``reload`` re-reads the configuration on SIGHUP."""
    validate_all(config)
    refuse_mail_as_root(config)
    server_secret(config)  # now, before any fork: every worker inherits the same
    limit = raise_descriptor_limit()
    log.debug("descriptor limit %d: up to %d connections per process", limit, connections_per_worker(limit))
    if config.workers > 1:
        sys.stdout.flush()
        return Supervisor(config, reload).run()
    metrics_dir = None
    if config.metrics_listen:
        from fastpop.serve.metrics import cleanup_environment, prepare_environment

        metrics_dir = prepare_environment(config)
    try:
        server.run_worker(config, reload=reload)
    finally:
        if metrics_dir is not None:
            cleanup_environment(metrics_dir)
    return 0
