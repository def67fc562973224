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

Lifecycle.  Each address is claimed before it is bound
(fastpop.serve.listeners.ListenerLocks), and the claim is inherited by every
worker: a second fastpop on a port this generation (or what is left of it)
serves refuses to start.  Worker 0 (LMTP's) starts first, the others once
it serves; each writes a byte to its readiness pipe once all its listeners
accept, and only when every worker has does the supervisor log that it
listens and tell systemd READY=1 (a worker that dies or hangs before that
stops the start, exit status 1).  Workers never outlive the supervisor: each
watches a pipe whose write end only the supervisor holds, and its end of file
(the supervisor gone, SIGKILL included) stops the worker as SIGTERM would:
no new connections, logged-in sessions get ``shutdown_timeout`` to finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastpop import __version__
from fastpop.auth.authenticator import server_secret
from fastpop.config import Config
from fastpop.limits import connections_per_worker, raise_descriptor_limit
from fastpop.serve import server
from fastpop.serve.listeners import ListenerLocks, bind_listener
from fastpop.serve.preload import preload
from fastpop.serve.server import WorkerTables, refuse_mail_as_root
from fastpop.serve.validation import validate_all
from fastpop.wire.parser import PARSER_IMPL

if TYPE_CHECKING:
    from fastpop.serve.control import SupervisorControl
    from fastpop.serve.metrics import HTTPEndpoint

log = logging.getLogger("fastpop.workers")

RESTART_BACKOFF = 1.0  # seconds to wait before restarting a worker that died young
YOUNG = 5.0  # a worker that dies within this many seconds of its start died young
STOP_GRACE = 10.0  # seconds past shutdown_timeout before a worker that has not stopped is killed
START_TIMEOUT = 60.0  # seconds a starting worker has to open its listeners
FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # passed on to the workers


class StartFailed(OSError):
    """A worker died, or did not open its listeners, while the server started."""


class Supervisor:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload = reload
        # Made before forking: each worker writes its own rows, reads all of them.
        self.shared = WorkerTables.create(config)  # connections, LOGIN-DELAY, penalties across workers
        self.stop_deadline: float | None = None
        self.addresses = config.listen + config.proxy_listen + config.proxy_listen_tls  # server.start splits them
        self.tls_addresses = list(config.listen_tls)
        self.ports: dict[tuple[str, int], int] = {}  # (kind, index) -> port actually bound (for port 0)
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
        self.locks = ListenerLocks(config)  # inherited by every worker: see fastpop.serve.listeners
        # Only the supervisor holds the write end: its end of file tells the workers it is gone.
        self.alive_r, self.alive_w = -1, -1
        self.starting: dict[int, int] = {}  # pid -> read end of its readiness pipe, until it is ready
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
        self.control: SupervisorControl | None = None  # the control socket (fastpop.serve.control)

    def _sockets(self) -> tuple[list[socket.socket], list[socket.socket]]:
        """One worker's listening sockets: POP3 (then the PROXY listeners') and
        implicit TLS.  Sockets from systemd are shared by every worker and kept
        open here; the others are bound anew for each worker (SO_REUSEPORT)."""
        activated = self.activated
        if activated is not None and activated.pop3:
            pop3 = activated.pop3 + self._bind("pop3", self.addresses, len(self.addresses) - len(self.proxy_addresses))
        else:
            pop3 = self._bind("pop3", self.addresses)
        tls = activated.tls if activated is not None and activated.tls else self._bind("tls", self.tls_addresses)
        return pop3, tls

    def _bind(self, kind: str, addresses: list[str], first: int = 0) -> list[socket.socket]:
        socks = []
        try:
            for i in range(first, len(addresses)):
                sock = bind_listener(self.locks, addresses[i], self.ports.get((kind, i)))
                self.ports.setdefault((kind, i), sock.getsockname()[1])
                socks.append(sock)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _spawn(self, index: int, wait_ready: bool = False) -> None:
        """Start worker ``index`` (unless the server is stopping).  SIGTERM, SIGINT
        and SIGHUP wait until it is in ``workers``: else one arriving during the
        fork would be passed on to every worker but this one."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            if self.stopping:
                return
            self._fork(index, wait_ready)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _fork(self, index: int, wait_ready: bool) -> None:
        # The control thread's state and channels change under its lock: held
        # across the fork, a new worker has both the state and its channel.
        control = self.control
        with control.lock if control is not None else contextlib.nullcontext():
            self._fork_locked(index, wait_ready)

    def _fork_locked(self, index: int, wait_ready: bool) -> None:
        pop3, tls = self._sockets()
        worker_control = self.control.channel_for(index) if self.control is not None else None
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC) if wait_ready else (-1, -1)
        try:
            pid = os.fork()
        except BaseException:
            for fd in (ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)
            if worker_control is not None:
                worker_control.channel.close()
            raise
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (*FORWARDED, signal.SIGALRM):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
                # the supervisor's ends: never the worker's (the alive pipe must see its writer go)
                for fd in (self.alive_w, ready_r, *self.starting.values()):
                    if fd >= 0:
                        os.close(fd)
                if self.metrics_endpoint is not None:
                    self.metrics_endpoint.server.socket.close()  # the supervisor's, not the worker's
                if self.control is not None:
                    self.control.in_worker()  # the supervisor's socket and ends of the channels
                self.shared.use_row(index)
                server.run_worker(self.config, pop3, tls, lmtp=index == 0, reload=self.reload, shared=self.shared,
                                  alive_fd=self.alive_r, ready_fd=ready_w if ready_w >= 0 else None,
                                  control=worker_control)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        for sock in pop3 + tls:
            if not self._inherited(sock):
                sock.close()  # the worker has them now
        if worker_control is not None:
            worker_control.channel.close()  # the worker's end
        if ready_w >= 0:
            os.close(ready_w)
            self.starting[pid] = ready_r
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
        for sig in FORWARDED:
            signal.signal(sig, self._signal)
        signal.signal(signal.SIGALRM, self._overdue)
        log.info("supervisor pid %d starting %d workers", os.getpid(), self.config.workers)
        self.alive_r, self.alive_w = os.pipe2(os.O_CLOEXEC)
        try:
            self._claim()
            self._start_metrics()
            self._open_control()
            preload(self.config)  # once, before the forks (each worker checks again before its drop)
            self._spawn(0, wait_ready=True)  # LMTP's: it serves before any POP3 listener accepts
            self._wait_ready()
            for index in range(1, self.config.workers):
                self._spawn(index, wait_ready=True)
            self._wait_ready()
            if not self.stopping:
                if self.control is not None:  # before "listening": whoever waits for that line may use it
                    self.control.start()
                    log.info("control socket %s", self.control.control.path)
                self._listening()
                self._ready()
            return self._wait()
        except BaseException:
            self._stop_workers()
            raise
        finally:
            for fd in self.starting.values():
                os.close(fd)
            self.starting.clear()
            self._stop_ops()
            if self.control is not None:
                self.control.close()
            self.locks.release()  # (every worker is gone by now)
            os.close(self.alive_r)
            os.close(self.alive_w)

    def _claim(self) -> None:
        """The addresses with a fixed port, before anything else is opened: where
        another generation serves, that is what the refusal says (port 0 is
        claimed as it is bound, in _bind)."""
        activated = self.activated
        pop3 = self.proxy_addresses if activated is not None and activated.pop3 else self.addresses
        tls = [] if activated is not None and activated.tls else self.tls_addresses
        self.locks.claim_addresses(pop3 + tls)

    def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until every starting worker says it serves; StartFailed if one dies
        or does not say so in ``timeout`` seconds (unless the server is stopping)."""
        deadline = time.monotonic() + timeout
        while self.starting and not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                late = ", ".join(f"worker {self.workers[pid][0]} (pid {pid})" for pid in self.starting)
                raise StartFailed(f"{late} did not open its listeners within {timeout:g} s")
            readable, _, _ = select.select(list(self.starting.values()), [], [], min(left, 0.5))
            for pid, fd in list(self.starting.items()):
                if fd not in readable:
                    continue
                got = os.read(fd, 1)
                os.close(fd)
                del self.starting[pid]
                if not got and not self.stopping:
                    index = self.workers[pid][0]
                    raise StartFailed(f"worker {index} (pid {pid}) {self._ended(pid)} before its listeners were "
                                      "open (its log lines say why)")

    def _ended(self, pid: int) -> str:
        """How a worker that closed its readiness pipe ended (reaped here)."""
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return "ended"
        self.workers.pop(pid, None)
        return self._how(status)

    @staticmethod
    def _how(status: int) -> str:
        return (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                else f"exited with status {os.WEXITSTATUS(status)}")

    def _stop_workers(self) -> None:
        """A start that failed: SIGTERM every worker, wait for them (killed if overdue)."""
        self.stopping = True
        self.exit_code = 1
        if not self.workers:
            return
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.config.shutdown_timeout + STOP_GRACE
            signal.setitimer(signal.ITIMER_REAL, self.config.shutdown_timeout + STOP_GRACE)
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._wait()

    def _listening(self) -> None:
        """The log line that says the server listens: every worker does now."""
        log.info("fastpop %s listening on %s (parser: %s, loop: %s, %d workers, supervisor pid %d)",
                 __version__, ", ".join(self._addresses("pop3")), PARSER_IMPL, self.config.loop,
                 self.config.workers, os.getpid())

    def _addresses(self, kind: str) -> list[str]:
        """The addresses of ``kind`` (pop3, proxy, tls) listened on: configured
        ones with the ports bound, and inherited ones."""
        plain = len(self.config.listen)
        configured = self.tls_addresses if kind == "tls" else self.addresses
        out = [f"{configured[i].rpartition(':')[0]}:{port}" for (k, i), port in sorted(self.ports.items())
               if k == ("tls" if kind == "tls" else "pop3") and (kind == "tls" or (i < plain) == (kind == "pop3"))]
        activated = self.activated
        if activated is not None and kind != "proxy":
            out += ["{}:{}".format(*s.getsockname()[:2]) for s in (activated.pop3 if kind == "pop3" else activated.tls)
                    if s.family != socket.AF_UNIX]
        return out

    def _open_control(self) -> None:
        """The control socket and the saved deny list, before any worker (as
        the user the supervisor runs as: it keeps its privileges)."""
        from fastpop.serve import control

        denied = control.load_denied(control.deny_path(self.config))
        sock = control.open_socket(self.config)
        if sock is not None:
            self.control = control.SupervisorControl(sock, control.deny_path(self.config),
                                                     control.ControlState(denied=denied))

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
        """systemd: READY=1 (every worker's listeners accept) and WATCHDOG=1
        pings while every worker runs."""
        import threading

        addresses = self._addresses("pop3") + self._addresses("proxy") + self._addresses("tls")
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
            why = self._how(status)
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
