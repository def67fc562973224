"""Prometheus metrics: cheap counters in each process, exported over HTTP.

Nothing here runs unless ``[metrics] listen`` (``--metrics-listen``) is set:
without it the server uses the plain ``POP3Protocol`` and never imports this
module's exporter, so the cost of metrics off is nil.

With metrics on, the server's sessions are ``MeteredProtocol``
(fastpop.session.metered), counting into plain ints and lists on a ``Counters``
object, one per process; prometheus-client is never called per command.
``Exporter.flush`` moves what accumulated since the last flush into the
prometheus-client metrics about once a second (``[metrics] flush_interval``),
at a scrape (single process) and at shutdown.

prometheus-client runs in multiprocess mode, always: ``prepare_environment``
makes a private directory for its mmap files and sets
``PROMETHEUS_MULTIPROC_DIR`` before prometheus-client is imported, so the
supervisor of ``--workers N`` (or the single process) serves the sum of every
worker over HTTP.  When a worker dies the supervisor marks it dead
(``multiprocess.mark_process_dead``), which drops its live gauges; its
counters stay in the totals.  The directory is removed at stop, and one that a
server killed before its cleanup (SIGKILL) left is removed by a later start once
it is proved dead (``remove_stale``).

The endpoint (``HTTPEndpoint`` in the supervisor, ``LoopEndpoint`` in a single
process) answers GET and HEAD of any path, one request per connection.  It
holds at most ``MAX_CONNECTIONS`` connections (a new one closes the oldest),
gives a request ``REQUEST_TIMEOUT`` seconds and ``MAX_HEAD`` octets for its
head and ``REPLY_TIMEOUT`` seconds for its reply, and renders on one thread
of its own: never a thread per connection, never on a POP3 event loop.

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
import fcntl
import functools
import logging
import os
import re
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastpop.session.metered import BUCKETS, COMMAND_NAMES, NBUCKETS, Counters
from fastpop.wire.commands import NUM_CODES

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("fastpop.metrics")


# ------------------------------------------------------------------ export


# The multiprocess directory: <tmp>/fastpop-metrics-<pid>-<start time>-<random>,
# the pid and start time (/proc/PID/stat, clock ticks after boot) of the process
# that made it (the supervisor, or the single process).  It holds a shared flock on
# the directory for its life, inherited by its workers, so a later start can prove
# a directory left by a SIGKILL dead: its process gone (or the pid reused) and
# nobody holding the lock (no worker still draining).
DIR_PREFIX = "fastpop-metrics-"
_DIR_NAME = re.compile(r"fastpop-metrics-([0-9]{1,10})-([0-9]{1,20})-[A-Za-z0-9_]{1,32}")
_held: dict[str, int] = {}  # our directory -> its descriptor, holding the flock


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), None if there is
    none, or only its zombie (which holds no descriptor, so no lock)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rpartition(b")")[2].split()  # (the command name may hold spaces and parentheses)
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])  # field 22 of proc(5), counted after the name
    except (IndexError, ValueError):
        return None


def _dir_owner(config) -> tuple[int, int]:
    """(uid, gid) to give the directory: the user the server will run as; -1 keeps ours."""
    if os.getuid() == 0 and (config.user is not None or config.group is not None):
        import grp
        import pwd

        entry = pwd.getpwnam(config.user) if config.user is not None else None
        uid = entry.pw_uid if entry is not None else -1
        gid = grp.getgrnam(config.group).gr_gid if config.group is not None else (entry.pw_gid if entry else -1)
        return uid, gid
    return -1, -1


def remove_stale(tmp: str, owner: int) -> list[str]:
    """Remove the multiprocess directories in ``tmp`` that a fastpop killed
    without its cleanup (SIGKILL, a crash) left: only directories (never a
    link) owned by ``owner``, named by a process that is gone, that no
    process holds the lock of.  Anything else, another user's above all, is
    left alone.  Returns the names removed."""
    if start_time(os.getpid()) is None:
        return []  # no /proc: nothing can be proved dead
    removed: list[str] = []
    try:
        tmp_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return removed
    try:
        for name in os.listdir(tmp_fd):
            m = _DIR_NAME.fullmatch(name)
            if m is None or name in _held:
                continue
            pid, started = int(m.group(1)), int(m.group(2))
            if start_time(pid) == started:
                continue  # its maker runs (a server starting or serving); another start time: the pid reused
            try:
                if _remove_dead(tmp_fd, name, owner):
                    removed.append(name)
            except OSError as exc:
                log.warning("metrics: cannot remove stale directory %s/%s: %s", tmp, name, exc.strerror or exc)
    finally:
        os.close(tmp_fd)
    for name in removed:
        log.info("metrics: removed %s/%s, left by a fastpop that is gone", tmp, name)
    return removed


def _remove_dead(tmp_fd: int, name: str, owner: int) -> bool:
    try:  # never through a link; O_DIRECTORY: a FIFO or a file is refused, not opened
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tmp_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_uid != owner:
            return False  # not ours to judge: another user's (or planted to look like ours)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a worker of that server still runs (draining its sessions)
        for entry in os.listdir(fd):  # flat: prometheus-client's files; a subdirectory stays
            if not stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                os.unlink(entry, dir_fd=fd)
        here = os.stat(name, dir_fd=tmp_fd, follow_symlinks=False)
        if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
            return False  # renamed meanwhile: whatever is there now is not what was judged
        os.rmdir(name, dir_fd=tmp_fd)
        return True
    finally:
        os.close(fd)


def prepare_environment(config) -> str:
    """Make the private directory of the multiprocess files (owned by the
    user the server will run as) and point prometheus-client at it; call
    before anything imports prometheus_client.  Directories that servers
    killed before their cleanup left behind are removed first."""
    uid, gid = _dir_owner(config)
    tmp = tempfile.gettempdir()
    remove_stale(tmp, uid if uid >= 0 else os.geteuid())
    path = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-{start_time(os.getpid()) or 0}-", dir=tmp)
    # held by this process and, inherited over fork, by its workers; CLOEXEC: by nothing exec'd
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held[os.path.basename(path)] = fd
    if uid >= 0 or gid >= 0:
        os.chown(path, uid, gid)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def cleanup_environment(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(os.path.basename(path), None)
    if fd is not None:
        os.close(fd)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == path:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


class Exporter:
    """The prometheus-client metrics of one process, fed from a ``Counters``."""

    def __init__(self, counters: Counters) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            values,
        )

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
        self._last_open: int | None = None
        self._last_logged_in: int | None = None
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
        for value, n in zip(buckets, counts, strict=True):
            if n:
                value.inc(n)
        total_value.inc(total)
        return
    bounds = BUCKETS + (BUCKETS[-1] * 2,)  # pragma: no cover - older or newer prometheus-client
    for bound, n in zip(bounds, counts, strict=False):  # pragma: no cover
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


# ------------------------------------------------------------------ HTTP
#
# Both endpoints (the supervisor's thread and a single process's event loop)
# speak the same small HTTP: one request per connection, GET or HEAD of any
# path, then ``Connection: close``; and both hold the same bounds.

REQUEST_TIMEOUT = 5.0  # seconds from accept until the request's head is in
REPLY_TIMEOUT = 10.0  # seconds from then until the reply is sent
MAX_HEAD = 16384  # octets of request line and headers (431 beyond)
MAX_CONNECTIONS = 32  # open scrape connections: a new one closes the oldest

_STATUS = {
    "GET": b"200 OK",
    "HEAD": b"200 OK",
    "405": b"405 Method Not Allowed",
    "431": b"431 Request Header Fields Too Large",
    "500": b"500 Internal Server Error",
}


def _parse_request(buf: bytes) -> str | None:
    """What the request in ``buf`` asks: ``"GET"`` or ``"HEAD"`` (served, any
    path), ``"405"`` (another method, or not HTTP) or ``"431"`` (a head over
    MAX_HEAD); None while its head is incomplete."""
    ends = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
    if not ends:
        return "431" if len(buf) > MAX_HEAD else None
    if min(ends) > MAX_HEAD:
        return "431"
    words = buf.split(b"\n", 1)[0].split()
    if len(words) < 2 or words[0] not in (b"GET", b"HEAD"):
        return "405"
    return words[0].decode()


def _response(kind: str, body: bytes = b"") -> bytes:
    """The reply to a request ``_parse_request`` called ``kind`` (or "500"):
    ``body`` is the rendered metrics of a GET or HEAD."""
    from prometheus_client import CONTENT_TYPE_LATEST

    extra = b"Allow: GET, HEAD\r\n" if kind == "405" else b""
    head = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
            % (_STATUS[kind], CONTENT_TYPE_LATEST.encode(), len(body), extra))
    return head if kind == "HEAD" else head + body


class _Connection:
    __slots__ = ("buf", "deadline", "out", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.buf = b""
        self.out: memoryview | None = None  # the reply, once the request is in
        self.deadline = deadline


class _ScrapeServer:
    """The supervisor's endpoint: one thread polls the listener and at most
    MAX_CONNECTIONS connections, and renders too, once per round for every
    request that came in during it.  No thread per connection: a scrape that
    stalls costs a slot until its timeout, never a thread."""

    ROUND_ACCEPTS = 64  # accepts per round, so reads and timeouts get their turn

    def __init__(self, sock: socket.socket, render: Callable[[], bytes]) -> None:
        self.socket = sock
        self._render = render
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[socket.socket, _Connection] = {}  # in the order accepted
        self._selector = selectors.PollSelector()  # no descriptor of its own for a fork to inherit
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="fastpop-metrics", daemon=True)
        # A forked worker must not hold the endpoint's sockets: a connection it
        # held would stay open after the supervisor closes it.
        os.register_at_fork(after_in_child=functools.partial(_ScrapeServer._forked, weakref.ref(self)))

    @staticmethod
    def _forked(ref) -> None:
        self = ref()
        if self is not None:
            for sock in (self.socket, self._wake_r, self._wake_w, *self._conns):
                sock.close()
            self._conns = {}

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self.thread.join(5)
        self._wake_w.close()

    def _run(self) -> None:
        sel = self._selector
        sel.register(self.socket, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                conns = self._conns
                timeout = None
                if conns:
                    timeout = max(0.0, min(c.deadline for c in conns.values()) - time.monotonic())
                ready: list[tuple[_Connection, str]] = []
                for key, _mask in sel.select(timeout):
                    conn = key.data
                    if conn is None:
                        if key.fileobj is self.socket:
                            self._accept()
                        else:
                            self._drain(self._wake_r)
                    elif conn.sock in self._conns:  # not closed earlier in this round
                        if conn.out is None:
                            kind = self._read(conn)
                            if kind is not None:
                                ready.append((conn, kind))
                        else:
                            self._write(conn)
                if ready:
                    self._answer(ready)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline <= now]:
                    self._close(conn)
        except Exception:
            log.exception("metrics: the endpoint failed")
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()
            self.socket.close()
            self._wake_r.close()

    def _accept(self) -> None:
        for _ in range(self.ROUND_ACCEPTS):
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED, EMFILE: the next round tries again
                log.warning("metrics: accept: %s", exc)
                return
            sock.setblocking(False)
            if len(self._conns) >= MAX_CONNECTIONS:
                self._close(next(iter(self._conns.values())))
            conn = _Connection(sock, time.monotonic() + REQUEST_TIMEOUT)
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> str | None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return None
        conn.buf += data
        return _parse_request(conn.buf)

    def _answer(self, ready: list[tuple[_Connection, str]]) -> None:
        body: bytes | None = None
        failed = False
        for conn, kind in ready:
            if conn.sock not in self._conns:  # closed for a newer one in this round
                continue
            if kind in ("GET", "HEAD"):
                if body is None and not failed:
                    try:
                        body = self._render()
                    except Exception:
                        log.exception("metrics: cannot render a scrape")
                        failed = True
                if failed:
                    kind = "500"
            conn.buf = b""
            payload = body if kind in ("GET", "HEAD") else b""
            assert payload is not None, "rendered, or the request is answered 500"
            conn.out = memoryview(_response(kind, payload))
            conn.deadline = time.monotonic() + REPLY_TIMEOUT
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            self._write(conn)

    def _write(self, conn: _Connection) -> None:
        out = conn.out
        assert out is not None, "written only once its reply is made"
        try:
            sent = conn.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = out[sent:]
        if not conn.out:
            self._drain(conn.sock)  # unread input would turn the close into a reset
            self._close(conn)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        for _ in range(16):
            try:
                if not sock.recv(65536):
                    return
            except OSError:
                return

    def _close(self, conn: _Connection) -> None:
        if self._conns.pop(conn.sock, None) is not None:
            self._selector.unregister(conn.sock)
            conn.sock.close()


class HTTPEndpoint:
    """The supervisor's endpoint: ``GET /metrics`` (any path) served by a
    ``_ScrapeServer``, a thread of its own (the supervisor has no event loop)."""

    def __init__(self, address: str, registry) -> None:
        from prometheus_client import generate_latest

        from fastpop.net import listening_socket, parse_address

        host, _ = parse_address(address)
        sock = listening_socket(address, reuse_port=False, backlog=64)  # one supervisor, a few scrapers
        self.server = _ScrapeServer(sock, lambda: generate_latest(registry))
        self.thread = self.server.thread
        self.port = self.server.socket.getsockname()[1]
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.server.start()

    def close(self) -> None:
        self.server.close()


def mark_process_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


# ------------------------------------------------------------------ in a server


class _HTTPRequest(asyncio.Protocol):
    """One scrape of a single process's endpoint, on its event loop."""

    def __init__(self, endpoint: LoopEndpoint) -> None:
        self.endpoint = endpoint
        self.buf = b""
        self.kind: str | None = None  # what the request asks, once it is in
        # both set by connection_made, before the loop makes any other call
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.timer: asyncio.TimerHandle = None  # type: ignore[assignment]

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, transport.abort)
        self.endpoint.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.kind is not None:  # anything after the request is ignored
            return
        self.buf += data
        kind = _parse_request(self.buf)
        if kind is None:
            return
        self.kind, self.buf = kind, b""
        self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(REPLY_TIMEOUT, self.transport.abort)
        if kind in ("GET", "HEAD"):
            self.endpoint.scrape(self)
        else:
            self.reply(_response(kind))

    def rendered(self, body: bytes | None) -> None:
        """The render this scrape waited for is done (None: it failed)."""
        kind = self.kind
        assert kind is not None, "a scrape waits for a render only once its request is in"
        if not self.transport.is_closing():
            self.reply(_response("500") if body is None else _response(kind, body))

    def reply(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.endpoint.closed(self)


class LoopEndpoint:
    """The endpoint of a single process: its event loop accepts and reads the
    scrapes, flushes the counts (on the loop: the sessions change them without
    locks), and a thread of its own renders (reading the multiprocess files
    takes milliseconds the sessions should not wait).  Scrapes that come in
    while a render is in flight get its result: one render at a time."""

    def __init__(self, registry, before: Callable[[], None]) -> None:
        self.registry = registry
        self.before = before
        self.server: asyncio.Server | None = None
        self.address = ""
        self._open: dict[_HTTPRequest, None] = {}  # in the order accepted
        self._waiting: list[_HTTPRequest] | None = None  # the scrapes of the render in flight
        self._render: asyncio.Future | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self, loop, address: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from fastpop.net import parse_address

        host, port = parse_address(address)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpop-metrics")
        server = self.server = await loop.create_server(lambda: _HTTPRequest(self), host, port, reuse_address=True)
        sock = server.sockets[0]
        bound_host, bound_port = sock.getsockname()[:2]
        self.address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"

    def opened(self, request: _HTTPRequest) -> None:
        if len(self._open) >= MAX_CONNECTIONS:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()
        self._open[request] = None

    def closed(self, request: _HTTPRequest) -> None:
        self._open.pop(request, None)

    def scrape(self, request: _HTTPRequest) -> None:
        """Answer ``request`` with the next render: the one in flight, else a new one."""
        if self._waiting is not None:
            self._waiting.append(request)
            return
        if self._executor is None:  # closed
            request.transport.abort()
            return
        from prometheus_client import generate_latest

        try:
            self.before()
        except Exception:  # a scrape must not fail for a late flush
            log.exception("metrics: flush before a scrape failed")
        self._waiting = [request]
        self._render = asyncio.get_running_loop().run_in_executor(self._executor, generate_latest, self.registry)
        self._render.add_done_callback(self._rendered)

    def _rendered(self, future: asyncio.Future) -> None:
        waiting, self._waiting, self._render = self._waiting, None, None
        if future.cancelled() or waiting is None:
            return
        body = None
        if future.exception() is not None:
            log.error("metrics: cannot render a scrape", exc_info=future.exception())
        else:
            body = future.result()
        for request in waiting:
            request.rendered(body)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._render is not None:
            self._render.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for request in list(self._open):
            request.transport.abort()
        self._open.clear()


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
