"""Prometheus metrics: cheap counters in each process, exported over HTTP.

Nothing here runs unless ``[metrics] listen`` (``--metrics-listen``) is set:
without it the server uses the plain ``POP3Protocol`` and never imports this
module's exporter, so the cost of metrics off is nil.

With metrics on, the server's sessions are ``MeteredProtocol``: the same
session, dispatching through copies of the command tables whose entries
count the command and time it (``time.perf_counter`` deltas into fixed buckets
found with ``bisect``), and a few overridden hooks that count connections,
logins, failures and bytes.  All of that goes into plain ints and lists on a
``Counters`` object, one per process; prometheus-client is never called per
command.  ``Exporter.flush`` moves what accumulated since the last flush into
the prometheus-client metrics about once a second (``[metrics]
flush_interval``), at a scrape (single process) and at shutdown.

prometheus-client runs in multiprocess mode, always: ``prepare_environment``
makes a private directory for its mmap files and sets
``PROMETHEUS_MULTIPROC_DIR`` before prometheus-client is imported, so the
supervisor of ``--workers N`` (or the single process) serves the sum of every
worker over HTTP.  When a worker dies the supervisor marks it dead
(``multiprocess.mark_process_dead``), which drops its live gauges; its
counters stay in the totals.  The directory is removed at stop.

Metrics (all prefixed ``fastpop_``):

- ``connections_total``, ``connections`` (open now)
- ``sessions_total{end}`` (logged-in sessions that ended, by how), ``sessions`` (logged in now)
- ``logins_total{mechanism}``, ``login_failures_total{mechanism,reason}``
- ``commands_total{command}`` (answered), ``command_duration_seconds{command}`` (histogram:
  from dispatch until the command's reply is complete and the next command may
  run, so a failed PASS includes the failure delay and a streamed RETR the send)
- ``message_bytes_total{command}`` (RETR/TOP bodies as sent, dot-stuffed: the bulk
  of what POP3 sends; every reply's bytes would cost an override of the
  reply flush, a call per command burst, for little)
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from bisect import bisect_left
from typing import Callable

from fastpop import responses as R
from fastpop.commands import NUM_CODES, Command
from fastpop.protocol import (
    _AUTHORIZATION_TABLE,
    _TRANSACTION_TABLE,
    BUSY_AUTH,
    BUSY_SENDING,
    BUSY_TLS,
    CLOSED,
    POP3Protocol,
    _login_delay,
)

log = logging.getLogger("fastpop.metrics")

# Upper bounds (seconds) of the latency buckets; a last bucket takes the rest.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NBUCKETS = len(BUCKETS) + 1
FIRST_BUCKET = BUCKETS[0]  # most commands are answered within it: no bisect for them

COMMAND_NAMES = tuple(Command(code).name for code in range(NUM_CODES))

# A command still "runs" while one of these is set: the reply is not complete.
_WAITING = BUSY_AUTH | BUSY_SENDING | BUSY_TLS

# How a refused login is counted (the reason label), by the reply it got.
_FAILURE_KINDS = {
    R.ERR_AUTH_FAILED: "credentials",
    R.ERR_IN_USE: "in_use",
    R.ERR_MAILBOX_TEMP: "mailbox",
    R.ERR_MAILBOX_PERM: "mailbox",
    R.ERR_AUTH_UNAVAILABLE: "unavailable",
    R.ERR_LOGIN_DELAY: "login_delay",
}


class Counters:
    """One process's counts since the last flush: plain ints, lists and dicts."""

    __slots__ = ("connections", "open", "sessions", "logged_in", "logins", "failures",
                 "buckets", "sums", "message_bytes")

    def __init__(self) -> None:
        self.connections = 0  # accepted (delta)
        self.open = 0  # open now (absolute)
        self.logged_in = 0  # logged in now (absolute)
        self.sessions: dict[str, int] = {}  # end reason -> count (delta)
        self.logins: dict[str, int] = {}  # mechanism -> count (delta)
        self.failures: dict[tuple[str, str], int] = {}  # (mechanism, reason) -> count (delta)
        # per command code: answered commands by latency bucket (their sum is
        # the command count: every command is timed, at the latest when its
        # connection ends), and the sum of their latencies
        self.buckets = [[0] * NBUCKETS for _ in range(NUM_CODES)]
        self.sums = [0.0] * NUM_CODES
        self.message_bytes = [0, 0]  # TOP, RETR

    def observe(self, code: int, seconds: float) -> None:
        self.buckets[code][0 if seconds <= FIRST_BUCKET else bisect_left(BUCKETS, seconds)] += 1
        self.sums[code] += seconds


# ------------------------------------------------------------------ the session


def _metered(code: int, handler: Callable) -> Callable:
    """The table entry for one command: count it, time it (a perf_counter
    delta into a bucket found with bisect), and remember a login's mechanism."""
    clock = time.perf_counter
    buckets = BUCKETS
    first = FIRST_BUCKET
    mechanism = {Command.PASS: "USER", Command.APOP: "APOP"}.get(Command(code))

    def metered(self: MeteredProtocol, args: tuple[str, ...]) -> None:
        self._command = code
        self._command_start = start = clock()
        handler(self, args)
        if self._command == code and not self._busy & _WAITING:
            self._command = -1
            elapsed = clock() - start
            counters = self._metrics
            counters.buckets[code][0 if elapsed <= first else bisect_left(buckets, elapsed)] += 1
            counters.sums[code] += elapsed

    if code == Command.AUTH:
        def metered_auth(self: MeteredProtocol, args: tuple[str, ...]) -> None:
            if args:
                name = args[0].upper()  # only offered mechanisms become label values
                self._mechanism = name if name in self._ctx.mechanisms else "-"
            metered(self, args)

        return metered_auth
    if mechanism is not None:
        def metered_login(self: MeteredProtocol, args: tuple[str, ...]) -> None:
            self._mechanism = mechanism
            metered(self, args)

        return metered_login
    return metered


def _metered_table(table: tuple[Callable, ...]) -> tuple[Callable, ...]:
    return tuple(_metered(code, handler) for code, handler in enumerate(table))


_METERED_AUTHORIZATION = _metered_table(_AUTHORIZATION_TABLE)
_METERED_TRANSACTION = _metered_table(_TRANSACTION_TABLE)


def metered_class(base: type) -> type:
    """``base`` (POP3Protocol or a subclass: the PROXY listeners' sessions)
    counting into ``ctx.metrics``; ``metered(base)`` caches them."""

    class Metered(base):
        """The POP3 session, counting into ``ctx.metrics`` (a ``Counters``)."""

        __slots__ = ("_metrics", "_command", "_command_start", "_mechanism")

        # No __init__ of its own (a call less per connection): the fields are set
        # in connection_made, before any of them is read.

        def connection_made(self, transport) -> None:
            self._metrics = counters = self._ctx.metrics
            self._command = -1  # the code of a command whose reply is not complete yet
            self._mechanism = "-"
            self._table = _METERED_AUTHORIZATION
            counters.connections += 1
            counters.open += 1
            super().connection_made(transport)

        def connection_lost(self, exc) -> None:
            if self._state == CLOSED:
                return super().connection_lost(exc)
            counters = self._metrics
            counters.open -= 1
            if self._command >= 0:  # the connection ended before the reply did
                counters.observe(self._command, time.perf_counter() - self._command_start)
                self._command = -1
            if self._user is not None:
                counters.logged_in -= 1
            super().connection_lost(exc)
            if self._user is not None:
                reason = self._end_reason
                counters.sessions[reason] = counters.sessions.get(reason, 0) + 1

        def _unbusy(self, flag: int) -> None:
            if self._command >= 0 and not self._busy & ~flag & _WAITING:
                code, self._command = self._command, -1
                self._metrics.observe(code, time.perf_counter() - self._command_start)
            super()._unbusy(flag)

        def _count_sent(self, is_top: bool, size: int) -> None:
            self._metrics.message_bytes[0 if is_top else 1] += size
            super()._count_sent(is_top, size)

        # logins and their failures

        def _failed(self, kind: str) -> None:
            key = (self._mechanism, kind)
            failures = self._metrics.failures
            failures[key] = failures.get(key, 0) + 1

        def _auth_failed(self, reply: bytes, name, credentials, penalize: bool, reason: str) -> None:
            self._failed(_FAILURE_KINDS.get(reply, "credentials") if penalize else "malformed")
            super()._auth_failed(reply, name, credentials, penalize, reason)

        def _auth_resume(self) -> None:
            if self._auth is None and self._out and self._out[-1] is R.ERR_AUTH_UNAVAILABLE:
                self._failed("unavailable")
            super()._auth_resume()

        def _login_succeeded(self, user) -> None:
            ctx = self._ctx
            last = ctx.last_logins
            # (LastLogins holds only users with a LOGIN-DELAY: usually nobody, then nothing to ask)
            if last.active() and last.too_soon(user.name, _login_delay(user, ctx.config.login_delay)):
                self._failed("login_delay")
            super()._login_succeeded(user)

        def _finish_login(self, reply: bytes) -> None:
            if reply is R.OK_LOGGED_IN:
                logins = self._metrics.logins
                logins[self._mechanism] = logins.get(self._mechanism, 0) + 1
                self._metrics.logged_in += 1
            else:
                self._failed(_FAILURE_KINDS.get(reply, "other"))
            super()._finish_login(reply)

        def _enter_transaction(self, user, lock, mailbox) -> None:
            super()._enter_transaction(user, lock, mailbox)
            self._table = _METERED_TRANSACTION

    Metered.__name__ = Metered.__qualname__ = f"Metered{base.__name__}"
    return Metered


MeteredProtocol = metered_class(POP3Protocol)
_metered_classes: dict[type, type] = {POP3Protocol: MeteredProtocol}


def metered(base: type) -> type:
    cls = _metered_classes.get(base)
    if cls is None:
        cls = _metered_classes[base] = metered_class(base)
    return cls


# ------------------------------------------------------------------ export


def prepare_environment(config) -> str:
    """Make the private directory of the multiprocess files (owned by the
    user the server will run as) and point prometheus-client at it; call
    before anything imports prometheus_client."""
    path = tempfile.mkdtemp(prefix="fastpop-metrics-")
    if os.getuid() == 0 and (config.user is not None or config.group is not None):
        import grp
        import pwd

        entry = pwd.getpwnam(config.user) if config.user is not None else None
        uid = entry.pw_uid if entry is not None else -1
        gid = grp.getgrnam(config.group).gr_gid if config.group is not None else (entry.pw_gid if entry else -1)
        os.chown(path, uid, gid)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def cleanup_environment(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == path:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


class Exporter:
    """The prometheus-client metrics of one process, fed from a ``Counters``."""

    def __init__(self, counters: Counters) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from prometheus_client import values

        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or values.ValueClass is values.MutexValue:
            raise RuntimeError("metrics: prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
        self.counters = counters
        # A registry of their own: nothing registers in the global one, and
        # the values are read back from the multiprocess files, not from here.
        reg = CollectorRegistry()
        self.connections_total = Counter("fastpop_connections", "Connections accepted.", registry=reg)
        self.connections = Gauge("fastpop_connections_open", "Connections open now.",
                                 multiprocess_mode="livesum", registry=reg)
        self.sessions_total = Counter("fastpop_sessions", "Logged-in sessions that ended, by how they ended.",
                                      ["end"], registry=reg)
        self.sessions = Gauge("fastpop_sessions_open", "Logged-in sessions now.",
                              multiprocess_mode="livesum", registry=reg)
        self.logins = Counter("fastpop_logins", "Successful logins, by mechanism.", ["mechanism"], registry=reg)
        self.failures = Counter("fastpop_login_failures", "Refused logins, by mechanism and reason.",
                                ["mechanism", "reason"], registry=reg)
        self.commands = Counter("fastpop_commands", "Commands received, by command.", ["command"], registry=reg)
        self.durations = Histogram("fastpop_command_duration_seconds",
                                   "Time from a command's dispatch to the end of its reply.",
                                   ["command"], buckets=BUCKETS, registry=reg)
        self.message_bytes = Counter("fastpop_message_bytes", "Message bytes sent by RETR and TOP (dot-stuffed).",
                                     ["command"], registry=reg)
        self._lock = threading.Lock()
        self._last_open = self._last_logged_in = None
        # touch every metric once so that a scrape lists them from the start
        self.connections_total.inc(0)
        self.connections.set(0)
        self.sessions.set(0)

    def flush(self) -> None:
        """Move the counts gathered since the last flush into the metrics."""
        with self._lock:
            c = self.counters
            if c.connections:
                self.connections_total.inc(c.connections)
                c.connections = 0
            if c.open != self._last_open:
                self._last_open = c.open
                self.connections.set(c.open)
            if c.logged_in != self._last_logged_in:
                self._last_logged_in = c.logged_in
                self.sessions.set(c.logged_in)
            for table, metric in ((c.sessions, self.sessions_total), (c.logins, self.logins)):
                if table:
                    for key, n in list(table.items()):
                        metric.labels(key.replace(" ", "_")).inc(n)
                    table.clear()
            if c.failures:
                for (mechanism, reason), n in list(c.failures.items()):
                    self.failures.labels(mechanism, reason).inc(n)
                c.failures.clear()
            for i, name in enumerate(("TOP", "RETR")):
                if c.message_bytes[i]:
                    self.message_bytes.labels(name).inc(c.message_bytes[i])
                    c.message_bytes[i] = 0
            for code in range(NUM_CODES):
                counts = c.buckets[code]
                if any(counts):
                    self.commands.labels(COMMAND_NAMES[code]).inc(sum(counts))
                    _add_to_histogram(self.durations.labels(COMMAND_NAMES[code]), counts, c.sums[code])
                    c.buckets[code] = [0] * NBUCKETS
                    c.sums[code] = 0.0


def _add_to_histogram(child, counts: list[int], total: float) -> None:
    """Add bucket counts to a prometheus-client histogram child at once.

    prometheus-client only offers ``observe(value)``; its bucket values
    (``_buckets``, non-cumulative, one per bound, +Inf last) and ``_sum`` have
    been stable since its first multiprocess release.  Should they go, each
    count is replayed through ``observe`` at its bucket's bound instead.
    """
    buckets = getattr(child, "_buckets", None)
    total_value = getattr(child, "_sum", None)
    if buckets is not None and total_value is not None and len(buckets) == len(counts):
        for value, n in zip(buckets, counts):
            if n:
                value.inc(n)
        total_value.inc(total)
        return
    bounds = BUCKETS + (BUCKETS[-1] * 2,)  # pragma: no cover - older or newer prometheus-client
    for bound, n in zip(bounds, counts):  # pragma: no cover
        for _ in range(n):
            child.observe(bound)


def collector_registry(before_collect: Callable[[], None] | None = None):
    """A registry that reads every process's files (and first runs ``before_collect``)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()

    class _Collector:
        def __init__(self) -> None:
            self._inner = MultiProcessCollector(None)

        def collect(self):
            if before_collect is not None:
                try:
                    before_collect()
                except Exception:  # a scrape must not fail for a late flush
                    log.exception("metrics: flush before a scrape failed")
            return self._inner.collect()

    registry.register(_Collector())
    return registry


class HTTPEndpoint:
    """``GET /metrics`` (any path) on a thread of its own: prometheus-client's server."""

    def __init__(self, address: str, registry) -> None:
        from prometheus_client import start_http_server

        from fastpop.config import parse_address

        host, port = parse_address(address)
        self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = self.server.server_address[1]
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def mark_process_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


# ------------------------------------------------------------------ in a server


class _HTTPRequest(asyncio.Protocol):
    """One scrape on the event loop: HTTP/1.0-style, any path, then close."""

    def __init__(self, endpoint: LoopEndpoint) -> None:
        self.endpoint = endpoint
        self.buf = b""
        self.transport = None
        self.timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(10.0, transport.abort)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf and b"\n\n" not in self.buf:
            if len(self.buf) > 16384:
                self._reply(b"431 Request Header Fields Too Large", b"")
            return
        words = self.buf.split(b"\n", 1)[0].split()
        if len(words) < 2 or words[0] not in (b"GET", b"HEAD"):
            self._reply(b"405 Method Not Allowed", b"", extra=b"Allow: GET, HEAD\r\n")
            return
        try:
            body = self.endpoint.render()
        except Exception:
            log.exception("metrics: cannot render a scrape")
            self._reply(b"500 Internal Server Error", b"")
            return
        self._reply(b"200 OK", body if words[0] == b"GET" else b"", length=len(body))

    def _reply(self, status: bytes, body: bytes, extra: bytes = b"", length: int | None = None) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        head = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
                % (status, CONTENT_TYPE_LATEST.encode(), len(body) if length is None else length, extra))
        self.transport.write(head + body)
        self.transport.close()
        self.buf = b""

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()


class LoopEndpoint:
    """The endpoint of a single process, served by its event loop: no thread
    beside the sessions, and a scrape flushes the counts first."""

    def __init__(self, registry, before: Callable[[], None]) -> None:
        self.registry = registry
        self.before = before
        self.server = None
        self.address = ""

    async def start(self, loop, address: str) -> None:
        from fastpop.config import parse_address

        host, port = parse_address(address)
        self.server = await loop.create_server(lambda: _HTTPRequest(self), host, port, reuse_address=True)
        sock = self.server.sockets[0]
        bound_host, bound_port = sock.getsockname()[:2]
        self.address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        self.before()
        return generate_latest(self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class ProcessMetrics:
    """Metrics in one serving process (a worker, or the single process):
    the counters, the flush timer and, for the single process, the endpoint."""

    def __init__(self, ctx, loop) -> None:
        self.ctx = ctx
        self.loop = loop
        self.exporter = Exporter(ctx.metrics)
        self.interval = ctx.config.metrics_flush_interval
        self.endpoint: LoopEndpoint | None = None
        self._timer = loop.call_later(self.interval, self._tick)

    @classmethod
    async def start(cls, ctx, loop, serve_http: bool) -> ProcessMetrics:
        self = cls(ctx, loop)
        if serve_http:
            self.endpoint = LoopEndpoint(collector_registry(), self.exporter.flush)
            await self.endpoint.start(loop, ctx.config.metrics_listen)
            log.info("metrics on http://%s/metrics", self.endpoint.address)
        return self

    def _tick(self) -> None:
        self.exporter.flush()
        self._timer = self.loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        self._timer.cancel()
        self.exporter.flush()
        if self.endpoint is not None:
            self.endpoint.close()
