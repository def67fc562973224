"""The POP3 client side of the load generator: one asyncio.Protocol per connection.

A session is driven by a scenario, a generator that yields commands and is
sent their results (see ``scenarios.py``); this module frames the replies.
It is a plain state machine over ``data_received`` (no StreamReader, no
future per command): a reply is a status line, a multi-line listing (CAPA,
LIST, UIDL), or a message (RETR), which is checked against the
``X-Fastpop-Bench-Sha256`` header, its announced size, its termination and
its dot-stuffing.  A message that arrives whole in one read (the usual case:
one command at a time) is checked in place (``Session._whole_message``);
any other goes through ``MessageReader``, which hashes it as it streams in,
so a large message never sits in memory whole, and which has the last word
whenever the in-place check does not accept a message.

The client costs CPU on the machine it measures (on a small machine it
shares the cores with the server), so the hot path avoids per-line Python
work, per-command objects and bytes method calls where an index will do;
see ``tests/test_bench_client.py`` for what it must still catch.

Latency is measured per command from the moment its line is written to the
moment its reply is complete (``time.monotonic_ns``: CLOCK_MONOTONIC, the
same clock in every process); the whole session from its *intended* start,
so an open-loop run shows stalls instead of hiding them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Protocol, cast

from fastpop import _compiled
from fastpop.bench._wire_py import CHECKSUM_NAME

# The in-place RETR check (see Session._whole_message), compiled unless absent
# or disabled (fastpop._compiled chooses).
_impl = _compiled.load("fastpop.bench._wire")
if TYPE_CHECKING:
    from array import array

    from fastpop.bench._wire_py import announced_size, verify_whole, whole_retr
else:
    announced_size, verify_whole, whole_retr = _impl.announced_size, _impl.verify_whole, _impl.whole_retr


class Worker(Protocol):
    """What a session needs from the client process running it (fastpop.bench.load.Worker)."""

    loop: asyncio.AbstractEventLoop
    timeout: float
    unverified: int
    ws: int  # ns: the measuring window's start
    we: int  # and end
    lat: list[array[int]]  # per label: latencies in µs, within the window
    commands: int
    win_commands: int
    ssl_context: ssl.SSLContext | None
    server_hostname: str

    def record(self, label: int, ns: int, now: int) -> None: ...
    def error(self, kind: str, detail: str) -> None: ...
    def session_finished(self, s: Session, ok: bool) -> None: ...
    def hold(self, s: Session) -> None: ...


class SessionUser(Protocol):
    """A session's user as its errors name it: (name, password) (fastpop.bench.scenarios.User)."""

    def __getitem__(self, i: int) -> str: ...


CHECKSUM_HEADER = CHECKSUM_NAME.lower()

# Latency labels: one histogram each.
LABELS = (
    "connect", "greeting", "STLS", "TLS", "CAPA", "USER", "PASS", "AUTH",
    "STAT", "LIST", "UIDL", "RETR", "DELE", "NOOP", "QUIT", "session",
)
(L_CONNECT, L_GREETING, L_STLS, L_TLS, L_CAPA, L_USER, L_PASS, L_AUTH,
 L_STAT, L_LIST, L_UIDL, L_RETR, L_DELE, L_NOOP, L_QUIT, L_SESSION) = range(len(LABELS))

# What a command's reply looks like.
SINGLE, MULTI, MESSAGE, HOLD = range(4)

MAX_LINE = 8192  # RFC 2449 allows 512 octets per reply line; be generous
_now = time.monotonic_ns

Command = tuple  # (line: bytes | None, label: int, kind: int)
Scenario = Generator[Command, object, None]


class SessionError(Exception):
    """Ends a session with an error of a kind (``protocol``, ``integrity``, ...)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def cmd(text: bytes, label: int, kind: int = SINGLE) -> Command:
    return (text, label, kind)


def auth_plain_line(user: str, password: str) -> bytes:
    """``AUTH PLAIN`` with the RFC 4616 initial response (RFC 5034)."""
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    return b"AUTH PLAIN " + token + b"\r\n"


class MessageReader:
    """Consumes a RETR reply's body up to the terminating "." line and checks it.

    ``X-Fastpop-Bench-Sha256`` is the SHA-256 of the message body exactly as
    a correct server sends it: dot-stuffed (RFC 1939), up to the terminating
    line.  So the reader hashes the bytes off the wire, with no unstuffing
    copy, and any stuffing mistake (a dot missing or one too many) fails the
    check as surely as a flipped bit.  The size the server announced ("+OK
    n octets") is checked against the unstuffed size: wire bytes less one per
    stuffed line.

    ``feed`` returns the index just past the terminator within the data it
    was given, or -1 if more is needed.  Large messages are hashed as they
    stream in, in whole lines, and never held whole.
    """

    __slots__ = ("_acc", "_scan", "_in_headers", "_hasher", "size", "expected", "fresh")

    FLUSH = 256 * 1024

    def __init__(self) -> None:
        self._acc = bytearray()
        self._scan = 0
        self._in_headers = True
        self._hasher = hashlib.sha256()
        self.size = 0
        self.expected: bytes | None = None
        self.fresh = True  # nothing fed yet

    def feed(self, data: bytes) -> int:
        self.fresh = False
        acc = self._acc
        if not acc and self._in_headers:  # the start of the message
            if data.endswith(b"\r\n.\r\n") and len(data) > 5:
                end = len(data) - 3  # in lock-step, the whole reply in one piece (the usual case)
            elif data.startswith(b".\r\n"):
                return 3
            else:
                end = data.find(b"\r\n.\r\n")
                if end >= 0:
                    end += 2
            if end >= 0:
                self._lines(data[:end])
                return end + 3
        before = len(acc)
        acc += data
        if acc.startswith(b".\r\n"):
            end = 0
        else:
            end = acc.find(b"\r\n.\r\n", self._scan)
            if end >= 0:
                end += 2
        if end >= 0:
            self._lines(bytes(acc[:end]))
            consumed = end + 3 - before  # index in ``data`` just past ".\r\n"
            del acc[:]
            return consumed
        if len(acc) >= self.FLUSH:
            cut = acc.rfind(b"\r\n") + 2
            if cut > 1:
                self._lines(bytes(acc[:cut]))
                del acc[:cut]
        self._scan = max(0, len(acc) - 4)
        return -1

    def _lines(self, region: bytes) -> None:
        """Whole lines of the wire form, starting at a line start."""
        if not region:
            return
        stuffed = region.count(b"\n..") + (region[:2] == b"..")
        self.size += len(region) - stuffed
        if not self._in_headers:
            self._hasher.update(region)
            return
        end = region.find(b"\r\n\r\n")
        if end < 0:
            if region.startswith(b"\r\n"):
                end = -2  # no header at all
            else:
                self._checksum(region)  # (headers longer than a piece only matter for the checksum line)
                return
        self._in_headers = False
        self._checksum(region[: end + 2])
        self._hasher.update(memoryview(region)[end + 4 :])

    def _checksum(self, head: bytes) -> None:
        i = head.find(CHECKSUM_NAME)
        if i < 0:
            head = head.lower()
            i = head.find(CHECKSUM_HEADER)
        if i >= 0 and (i == 0 or head[i - 1] == 10):
            j = head.find(b"\r\n", i)
            self.expected = head[i + len(CHECKSUM_HEADER) : j if j >= 0 else None].strip().lower()

    def verify(self, announced: int) -> str | None:
        """None if the message is intact, else what is wrong."""
        if announced >= 0 and announced != self.size:
            return f"RETR announced {announced} octets, delivered {self.size}"
        if self.expected is None:
            return None  # not a seeded message: counted as unverified
        digest = self._hasher.hexdigest().encode()
        if digest != self.expected:
            return f"body SHA-256 {digest[:16].decode()}... != header {self.expected[:16].decode(errors='replace')}..."
        return None


def _unstuff_lines(block: bytes) -> list[bytes]:
    """A listing's lines (the block ends with CRLF, the terminator cut off), dot-unstuffed."""
    if not block:
        return []
    lines = block.split(b"\r\n")
    lines.pop()  # after the last CRLF
    if block[0] == 46 or b"\n." in block:
        return [line[1:] if line.startswith(b".") else line for line in lines]
    return lines


class Session(asyncio.Protocol):
    """One POP3 connection running one scenario.

    The hot path works on offsets into the data as it came off the socket:
    a reply in lock-step is usually exactly one read, so a status line is
    found with one ``find``, and a whole RETR reply is verified in place by
    ``_whole_message`` without slicing it line by line or building a
    ``MessageReader``.  Anything unusual (a reply split over reads, a
    message without the checksum header, a checksum or size that does not
    match) goes through ``MessageReader``, the reference implementation, so
    the verdict and its wording are the same on both paths.
    """

    __slots__ = (
        "w", "transport", "gen", "user", "intended", "start", "done", "_buf", "_kind", "_label",
        "sent", "_status", "_lines", "_reader", "_announced", "finished", "messages",
        "octets", "held", "result", "task", "connect_expired",
    )

    def __init__(self, worker: Worker, gen: Scenario, user: SessionUser, intended: int) -> None:
        self.w = worker
        self.gen = gen
        self.user = user
        self.intended = intended  # ns: when this session should have started
        self.start = _now()
        self.transport: asyncio.Transport | None = None
        self.done = worker.loop.create_future()
        self._buf = b""
        self._kind = SINGLE
        self._label = L_CONNECT
        self.sent = self.start
        self._status = b""
        self._lines: list[bytes] | None = None
        self._reader: MessageReader | None = None
        self._announced = -1
        self.finished = False
        self.messages = 0
        self.octets = 0
        self.held = False
        self.result = 0
        self.task: asyncio.Task | None = None  # the task connecting (the worker's sweep cancels it on timeout)
        self.connect_expired = False
        gen.send(None)  # to the first yield: waiting for the greeting

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # start_tls hands the protocol a new transport
            return
        # a stream protocol is handed a Transport (BaseTransport is the interface's declared type)
        stream = cast(asyncio.Transport, transport)
        if self.finished:  # gave up on this connect already
            stream.abort()
            return
        now = _now()
        self.transport = stream
        self.w.record(L_CONNECT, now - self.start, now)
        self.sent = now
        self._label = L_GREETING
        self._kind = SINGLE

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            what = LABELS[self._label]
            detail = f"connection closed by server while waiting for {what} reply"
            if exc is not None:
                detail += f" ({exc})"
            self._fail("closed", detail, abort=False)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost reports it

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        n = len(data)
        try:
            if self._kind == MESSAGE and self._reader is None and not self.held:
                # in lock-step a RETR reply is one read, whole: checked in one call
                size = whole_retr(data)
                if size >= 0:
                    self._message_ok(size)
                    return
            while pos < n and not self.finished:
                reader = self._reader
                if reader is not None:  # in a RETR reply, its status line already read
                    if pos:
                        data = data[pos:]
                        n -= pos
                        pos = 0
                    if reader.fresh and n > 5 and data.endswith(b"\r\n.\r\n"):
                        # the whole message in this piece (the status line came in the one before)
                        self._reader = None
                        if self._whole_message(data, 0, n - 5, self._announced):
                            return
                        self._reader = reader
                    used = reader.feed(data)
                    if used < 0:
                        return
                    pos = used
                    self._message_done()
                elif self._lines is not None:  # in a listing, its status line already read
                    end = data.find(b"\r\n.\r\n", pos)
                    if data.startswith(b".\r\n", pos):
                        end = pos - 2
                    elif end < 0:
                        self._keep(data[pos:])
                        return
                    block = data[pos : end + 2]
                    pos = end + 5
                    self._lines += _unstuff_lines(block)
                    lines, self._lines = self._lines, None
                    self._reply(lines)
                else:  # a status line
                    i = data.find(b"\r\n", pos)
                    if i < 0:
                        self._keep(data[pos:])
                        return
                    if self.held:
                        raise SessionError("protocol", f"unexpected line while idle: {data[pos:i][:60]!r}")
                    if not data.startswith(b"+OK", pos):
                        self._not_ok(data[pos:i])
                    kind = self._kind
                    if kind == SINGLE:
                        line = data[pos:i]
                        pos = i + 2
                        self._reply(line)
                    elif kind == MESSAGE:
                        announced = announced_size(data[pos:i])
                        # a whole reply after another in this piece: verify it in place (at pos 0,
                        # whole_retr above has tried exactly this already)
                        if pos and n - 5 > i and data.endswith(b"\r\n.\r\n") and self._whole_message(data, i + 2, n - 5,
                                                                                                     announced):
                            return
                        self._reader = MessageReader()
                        self._announced = announced
                        pos = i + 2
                    else:  # MULTI
                        j = data.find(b"\r\n.\r\n", i)
                        if j >= 0:  # the whole listing in this piece
                            block = data[i + 2 : j + 2]
                            pos = j + 5
                            self._reply(_unstuff_lines(block))
                        else:
                            self._lines = []
                            self._status = data[pos:i]
                            pos = i + 2
        except SessionError as exc:
            self._fail(exc.kind, exc.detail)

    def _keep(self, data: bytes) -> None:
        if len(data) > MAX_LINE and self._lines is None:
            raise SessionError("protocol", f"{LABELS[self._label]}: reply line longer than {MAX_LINE} octets")
        if len(data) > 64 * 1024 * 1024:
            raise SessionError("protocol", f"{LABELS[self._label]}: listing larger than 64 MiB")
        self._buf = data

    # ------------------------------------------------------------ replies

    def _not_ok(self, line: bytes) -> None:
        """A status line that is not +OK: always an error."""
        if line.startswith(b"-ERR"):
            label = LABELS[self._label]
            raise SessionError(f"err:{label}", f"{label}: {line[:200].decode(errors='replace')}")
        if self._label == L_AUTH and line.startswith(b"+"):
            raise SessionError("protocol", "AUTH PLAIN: the server asked for a continuation after an initial response")
        raise SessionError("protocol", f"{LABELS[self._label]}: not a POP3 reply: {line[:60]!r}")

    def _whole_message(self, data: bytes, m: int, j: int, announced: int) -> bool:
        """True when ``verify_whole`` (see ``_wire_py``) accepts the message that lies
        whole in ``data[m : j + 2]``, the terminator at ``j`` (the reply is then handled);
        False when it cannot say, and the caller runs ``MessageReader`` over the same
        bytes, which gives the verdict."""
        size = verify_whole(data, m, j, announced)
        if size < 0:
            return False
        self._message_ok(size)
        return True

    def _message_ok(self, size: int) -> None:
        self.messages += 1
        self.octets += size
        self._reply(size)

    def _message_done(self) -> None:
        reader = self._reader
        assert reader is not None
        self._reader = None
        problem = reader.verify(self._announced)
        if problem is not None:
            raise SessionError("integrity", f"RETR ({self.user[0]}): {problem}")
        if reader.expected is None:
            self.w.unverified += 1
        self.messages += 1
        self.octets += reader.size
        self._reply(reader.size)

    def _reply(self, result: object) -> None:
        """A complete reply to the current command: record it, run the scenario on, send the next command."""
        now = _now()
        w = self.w
        if now >= w.ws:
            w.lat[self._label].append((now - self.sent) // 1000)
            if now <= w.we:
                w.win_commands += 1
        w.commands += 1
        self._next(result)

    def _next(self, result: object) -> None:
        try:
            command = self.gen.send(result)
        except StopIteration as stop:
            self.result = stop.value or 0
            self._finish()
            return
        self._send(command)

    def _send(self, command: Command) -> None:
        line, label, kind = command
        self._label = label
        self._kind = kind
        if kind == HOLD or label == L_TLS:
            self._special(kind)
            return
        self.sent = _now()
        assert self.transport is not None
        self.transport.write(line)

    def _special(self, kind: int) -> None:
        if kind == HOLD:
            self.held = True
            self.w.hold(self)
        else:  # the STLS reply came: upgrade, then go on
            self._upgrade()

    def resume(self) -> None:
        """End a HOLD (the worker calls this)."""
        if self.held and not self.finished:
            self.held = False
            try:
                self._next(None)
            except SessionError as exc:
                self._fail(exc.kind, exc.detail)

    def _upgrade(self) -> None:
        self.w.loop.create_task(self._start_tls())

    async def _start_tls(self) -> None:
        w = self.w
        started = _now()
        assert self.transport is not None, "STLS was answered on this transport"
        assert w.ssl_context is not None, "a scenario sends STLS only with --tls starttls, which makes the context"
        try:
            transport = await w.loop.start_tls(
                self.transport, self, w.ssl_context, server_hostname=w.server_hostname,
                ssl_handshake_timeout=w.timeout,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            self._fail("tls", f"STLS handshake: {exc}")
            return
        if self.finished:
            return
        self.transport = transport
        now = _now()
        w.record(L_TLS, now - started, now)
        try:
            self._next(None)
        except SessionError as exc:
            self._fail(exc.kind, exc.detail)

    # ------------------------------------------------------------ the end

    def _finish(self) -> None:
        self.finished = True
        if self.transport is not None:
            self.transport.close()
        self.w.session_finished(self, True)
        if not self.done.done():
            self.done.set_result(True)

    def _fail(self, kind: str, detail: str, abort: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self.w.error(kind, detail)
        if abort and self.transport is not None:
            self.transport.abort()
        self.w.session_finished(self, False)
        if not self.done.done():
            self.done.set_result(False)

    def timed_out(self) -> None:
        self._fail("timeout", f"no {LABELS[self._label]} reply within {self.w.timeout:g} s")
