"""fastpop sessions in this process: a real ``POP3Protocol`` (or its counting
subclass ``MeteredProtocol``) served by a real ``ServerContext`` on a real
event loop (asyncio's or uvloop's, a new one per harness), over a temporary
passwd-file and Maildir tree.  The one thing not real is the socket:
``FakeTransport`` stands in for asyncio's transport, records what the session
writes and plays the peer (reads everything, reads N octets per loop turn, or
stops reading), with asyncio's flow control: ``pause_writing`` past the
high-water mark, ``resume_writing`` at the low one.

    h = Harness(tmp_path)
    user = h.add_user(messages=[b"Subject: hi\\r\\n\\r\\nHello.\\r\\n"])
    s = h.connect(peer="127.0.0.1")
    s.send(b"USER %s\\r\\nPASS secret\\r\\nSTAT\\r\\n" % user.name.encode())
    s.expect(b"+OK\\r\\n+OK Logged in.\\r\\n")
    ...
    h.close()

The API is synchronous: the loop runs only inside the harness's calls
(``send``, ``expect``, ``line``, ``wait_for``, ``sleep``...), each bounded by a
timeout.  Every call into the session happens inside the running loop, as
asyncio's own transports make them.  ``close()`` fails the test if the loop
reported an exception or fastpop logged an error (clear ``h.logged_errors``
after asserting an expected one).

Not covered: sendfile(2) (``get_extra_info("socket")`` is None, so RETR of a
large message takes the streamed path, as through TLS) and TLS itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpop.auth.passwd_file import UserRecord, read_records, write_records
from fastpop.auth.passwords import hash_password
from fastpop.auth.sasl import SCRAM_EXTRA, make_scram_keys
from fastpop.config import Config
from fastpop.delivery.local import store_message
from fastpop.serve.server import ServerContext, new_event_loop
from fastpop.serve.validation import validate_all
from fastpop.session.protocol import POP3Protocol
from fastpop.store.maildir import ensure_maildir

HIGH_WATER = 64 * 1024  # asyncio's and uvloop's default write buffer limits
POLL = 0.005  # seconds between looks at a condition nothing signals (a flag, a thread's work)
TIMEOUT = 2.0  # default bound of every wait
AS_ROOT = os.geteuid() == 0
_names = itertools.count(1)


class FakeTransport(asyncio.Transport):
    """What a session uses of an asyncio socket transport, and the peer on its other end.

    Session side (asyncio's API): ``write``, ``writelines``, ``close``,
    ``abort``, ``is_closing``, ``pause_reading``, ``resume_reading``,
    ``is_reading``, ``get_extra_info`` ("peername"; "socket" and "sslcontext"
    are None), ``get_write_buffer_size``, ``get_write_buffer_limits``,
    ``set_write_buffer_limits``.  As asyncio's transports do, ``write`` calls
    the protocol's ``pause_writing`` when the buffer passes the high-water
    mark, ``resume_writing`` is called from a loop callback once the peer has
    read it down to the low-water mark, data reaches ``data_received`` only
    while reading is on, and ``connection_lost`` comes from a loop callback
    after ``close`` (once the buffer is read) or ``abort``.

    Peer side (for the tests): ``peer_send``, ``peer_reads``, ``peer_stops_reading``,
    ``peer_close``; ``received`` (read by the peer), ``pending`` (written, not
    read yet: the write buffer), ``writes`` (each ``write`` call's bytes).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, peer: str,
                 high_water: int = HIGH_WATER, low_water: int | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        super().__init__({"peername": (peer, 50000, 0, 0) if ":" in peer else (peer, 50000)})
        self._loop = loop
        self._protocol = protocol
        self._on_change = on_change or (lambda: None)
        self.writes: list[bytes] = []
        self.pending = bytearray()
        self.received = bytearray()
        self.max_pending = 0  # the most the write buffer ever held
        self.peer_rate: int | None = None  # octets the peer reads per loop turn; None: all at once; 0: none
        self.inbound: list[bytes] = []  # sent by the peer, not yet given to data_received
        self.data_received_calls = 0
        self.reading = True
        self.writing_paused = False
        self.pause_reading_calls = self.resume_reading_calls = 0
        self.pause_writing_calls = self.resume_writing_calls = 0
        self.dropped_writes = 0  # writes after the connection was closed
        self.closing = self.aborted = self.lost = False
        self._drain_scheduled = self._deliver_scheduled = self._lost_scheduled = False
        self._high = self._low = 0
        self.set_write_buffer_limits(high=high_water, low=low_water)

    # ----------------------------------------------------------- the session's side

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self.lost or (self.closing and not self.pending):
            self.dropped_writes += 1  # asyncio drops them too (and warns)
            return
        data = bytes(data)
        self.writes.append(data)
        self.pending += data
        if self.peer_rate is None:  # a peer that reads everything: nothing stays buffered
            self._peer_read(len(self.pending))
        elif self.peer_rate > 0:
            self._schedule_drain()
        self.max_pending = max(self.max_pending, len(self.pending))
        if not self.writing_paused and len(self.pending) > self._high:
            self.writing_paused = True
            self.pause_writing_calls += 1
            self._protocol.pause_writing()
        self._on_change()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return len(self.pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        # asyncio's rules: high defaults to 64 KiB (4 x low when only low is given), low to high / 4
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if not self.writing_paused and len(self.pending) > high:
            self.writing_paused = True
            self.pause_writing_calls += 1
            self._protocol.pause_writing()

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self.reading = False
        self.pause_reading_calls += 1
        self._on_change()

    def resume_reading(self) -> None:
        if self.closing or self.reading:
            return
        self.reading = True
        self.resume_reading_calls += 1
        self._schedule_deliver()
        self._on_change()

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if not self.pending:
            self._schedule_lost()
        self._on_change()

    def abort(self) -> None:
        self.aborted = True
        self.closing = True
        self.pending.clear()
        self._schedule_lost()
        self._on_change()

    def is_closing(self) -> bool:
        return self.closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    # ----------------------------------------------------------- the peer's side

    def peer_send(self, data: bytes) -> None:
        """The peer sends ``data``: one ``data_received`` call, from a loop
        callback, once the session reads."""
        if self.closing:
            return
        self.inbound.append(bytes(data))
        self._schedule_deliver()

    def peer_reads(self, rate: int | None = None) -> None:
        """The peer reads ``rate`` octets per loop turn (None: whatever is there)."""
        self.peer_rate = rate
        if self.pending and rate != 0:
            self._schedule_drain()

    def peer_stops_reading(self) -> None:
        self.peer_rate = 0

    def peer_close(self) -> None:
        """The peer goes away: what it did not read is lost, the session learns from a callback."""
        self.inbound.clear()
        self.pending.clear()
        self.closing = True
        self._schedule_lost()

    def take(self, n: int | None = None) -> bytes:
        """Remove and return the first ``n`` octets the peer read (all: None)."""
        n = len(self.received) if n is None else n
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    # ----------------------------------------------------------- loop callbacks

    def _peer_read(self, n: int) -> None:
        if n > 0:
            self.received += self.pending[:n]
            del self.pending[:n]

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self.lost or self.peer_rate == 0:
            return
        self._peer_read(len(self.pending) if self.peer_rate is None else min(self.peer_rate, len(self.pending)))
        self._on_change()
        if self.writing_paused and len(self.pending) <= self._low:
            self.writing_paused = False
            self.resume_writing_calls += 1
            self._protocol.resume_writing()
        if self.pending:
            self._schedule_drain()
        elif self.closing:
            self._schedule_lost()

    def _schedule_deliver(self) -> None:
        if self.inbound and self.is_reading() and not self._deliver_scheduled:
            self._deliver_scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._deliver_scheduled = False
        if not self.is_reading() or not self.inbound:
            return
        data = self.inbound.pop(0)
        self.data_received_calls += 1
        self._protocol.data_received(data)
        self._on_change()
        self._schedule_deliver()  # the next chunk on the next turn, if still reading

    def _schedule_lost(self) -> None:
        if not self._lost_scheduled and not self.lost:
            self._lost_scheduled = True
            self._loop.call_soon(self._call_connection_lost)

    def _call_connection_lost(self) -> None:
        self.lost = True
        self.inbound.clear()
        self._protocol.connection_lost(None)
        self._on_change()


@dataclass
class User:
    name: str
    password: str
    maildir: Path

    def files(self) -> list[Path]:
        return sorted((self.maildir / "cur").iterdir()) + sorted((self.maildir / "new").iterdir())

    def contents(self) -> list[bytes]:
        return sorted(p.read_bytes() for p in self.files())


class _ErrorLog(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        self._into.append(record)


class Harness:
    """One fastpop "server" in this process: its Config, ServerContext and event loop.

    ``config`` overrides Config fields (``auth_failure_delay=0.2``); the
    context is made at the first ``connect`` (or ``ctx``), so ``h.config``
    may still be changed until then."""

    def __init__(self, root: Path, loop: str = "asyncio", **config: Any) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.passwd = self.root / "passwd"
        self.passwd.touch()
        self.mail = self.root / "mail"
        self.mail.mkdir(exist_ok=True)
        self.config = Config(
            listen=[],
            loop=loop,
            hostname="fastpop.test",
            allow_mail_as_root=AS_ROOT,
            passwd_file=str(self.passwd),
            mail_location=str(self.mail) + "/%u",
            mail_lock_table=str(self.root / "mailbox.locks"),
            auth_secret_file=str(self.root / "auth.key"),
            auth_failure_delay=0.05,
            workers=1,
        )
        for name, value in config.items():
            if not hasattr(self.config, name):
                raise TypeError(f"no Config field {name!r}")
            setattr(self.config, name, value)
        self.loop = new_event_loop(loop)
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.logged_errors: list[logging.LogRecord] = []
        self._log_handler = _ErrorLog(self.logged_errors)
        logging.getLogger("fastpop").addHandler(self._log_handler)
        self._ctx: ServerContext | None = None
        self.sessions: list[Session] = []
        self._waiter: asyncio.Future | None = None
        self._closed = False

    @property
    def ctx(self) -> ServerContext:
        if self._ctx is None:
            validate_all(self.config)
            self._ctx = ServerContext(self.config, self.loop)
        return self._ctx

    def counters(self):
        """The context's metrics counters (made on first use: sessions are then counted)."""
        from fastpop.session.metered import Counters

        ctx = self.ctx
        if ctx.metrics is None:
            ctx.metrics = Counters()
        return ctx.metrics

    # ----------------------------------------------------------- users and mail

    def add_user(self, name: str | None = None, password: str = "secret", messages: Iterable[bytes] = (),
                 scheme: str = "PLAIN", scram: bool = False, extra: dict[str, str] | None = None) -> User:
        """A passwd-file user (as ``fastpop user add`` writes it: ``scheme``,
        SCRAM keys with ``scram``) with a Maildir holding ``messages``."""
        name = name or f"user{next(_names)}"
        fields = dict(extra or {})
        if scram:
            fields[SCRAM_EXTRA] = make_scram_keys(password)
        records = read_records(str(self.passwd))
        records.append(UserRecord(name, hash_password(password, scheme), extra=fields))
        write_records(str(self.passwd), records)
        user = User(name, password, self.mail / name)
        ensure_maildir(str(user.maildir))
        for data in messages:
            self.deliver(user, data)
        return user

    def deliver(self, user: User, data: bytes) -> Path:
        """Deliver as fastpop's own local delivery does (CRLF line ends, into new/)."""
        return Path(store_message(str(user.maildir), data).path)

    # ----------------------------------------------------------- sessions

    def connect(self, peer: str = "127.0.0.1", metered: bool = False, protocol: type | None = None,
                high_water: int = HIGH_WATER, low_water: int | None = None) -> Session:
        """A new connection from ``peer``: the session is made and greets (``s.greeting``)."""
        ctx = self.ctx
        if protocol is None:
            protocol = POP3Protocol
            if metered:
                self.counters()
                protocol = ctx.session_class(POP3Protocol)
        proto = protocol(ctx)
        transport = FakeTransport(self.loop, proto, peer, high_water, low_water, on_change=self._wake)
        session = Session(self, proto, transport)
        self.sessions.append(session)
        self.call(proto.connection_made, transport)
        session.greeting = session.line()
        return session

    # ----------------------------------------------------------- running the loop

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` inside the running loop (as a transport calls the protocol)."""

        async def inside() -> Any:
            return fn(*args)

        return self.loop.run_until_complete(inside())

    def wait_for(self, condition: Callable[[], object], timeout: float = TIMEOUT, what: str = "") -> None:
        """Run the loop until ``condition()`` holds; AssertionError after ``timeout`` seconds."""
        loop = self.loop

        async def waiting() -> None:
            deadline = loop.time() + timeout
            while not condition():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}: "
                                         f"{self.describe()}")
                fut = self._waiter = loop.create_future()
                timer = loop.call_later(min(remaining, POLL), _resolve, fut)
                try:
                    await fut
                finally:
                    timer.cancel()
                    self._waiter = None

        loop.run_until_complete(waiting())

    def sleep(self, seconds: float) -> None:
        """Let the loop run for ``seconds``."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def turns(self, n: int = 1) -> None:
        """Let the loop run about ``n`` iterations (callbacks scheduled meanwhile run too)."""

        async def turning() -> None:
            for _ in range(n):
                await asyncio.sleep(0)

        self.loop.run_until_complete(turning())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            _resolve(waiter)

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.sessions) or "no sessions"

    def close(self) -> None:
        """End every session (abort), stop the loop's work, close the lock table and
        the loop; then fail if the loop reported an exception or fastpop logged an error."""
        if self._closed:
            return
        self._closed = True
        try:
            for s in self.sessions:
                if not s.transport.lost:
                    self.call(s.transport.abort)
            self.wait_for(lambda: all(s.transport.lost for s in self.sessions), what="every connection lost")
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            if self._ctx is not None:
                self._ctx.mailbox_locks.close()
            self.loop.close()
            logging.getLogger("fastpop").removeHandler(self._log_handler)
        assert not self.loop_errors, f"the event loop reported: {self.loop_errors}"
        assert not self.logged_errors, "fastpop logged errors: " + "; ".join(
            r.getMessage() for r in self.logged_errors)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Session:
    """One connection: the session (``protocol``), its transport, and the peer's verbs."""

    def __init__(self, harness: Harness, protocol: POP3Protocol, transport: FakeTransport) -> None:
        self.h = harness
        self.protocol = protocol
        self.transport = transport
        self.greeting = b""

    # ----------------------------------------------------------- sending

    def send(self, data: bytes | str) -> None:
        """The peer sends ``data`` (one ``data_received`` call); returns once the
        session took it, or once it stopped reading (the data then waits)."""
        t = self.transport
        t.peer_send(data.encode() if isinstance(data, str) else data)
        self.h.wait_for(lambda: not t.inbound or not t.is_reading(), what="the session to take the data")

    def cmd(self, text: str | bytes, timeout: float = TIMEOUT) -> bytes:
        """Send one command line, return one reply line."""
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.line(timeout)

    def login(self, user: User) -> None:
        self.send(f"USER {user.name}\r\nPASS {user.password}\r\n")
        self.expect(b"+OK\r\n+OK Logged in.\r\n")

    def stop_reading(self) -> None:
        self.transport.peer_stops_reading()

    def start_reading(self, rate: int | None = None) -> None:
        """The peer reads again: ``rate`` octets per loop turn, or all it can (None)."""
        self.h.call(self.transport.peer_reads, rate)

    def disconnect(self) -> None:
        """The peer closes the connection; returns once the session saw it."""
        self.h.call(self.transport.peer_close)
        self.h.wait_for(lambda: self.transport.lost, what="connection_lost")

    # ----------------------------------------------------------- reading

    def output(self) -> bytes:
        """Everything the peer read and the test did not take yet (no waiting)."""
        return self.transport.take()

    def expect(self, data: bytes, timeout: float = TIMEOUT) -> None:
        """The next octets read are exactly ``data``."""
        t = self.transport

        def arrived_or_differs() -> bool:
            n = min(len(t.received), len(data))
            return n == len(data) or t.received[:n] != data[:n] or t.lost

        self.h.wait_for(arrived_or_differs, timeout, f"{len(data)} octets")
        got = t.take(len(data))
        assert got == data, f"expected {data[:300]!r}, got {got[:300]!r}"

    def line(self, timeout: float = TIMEOUT) -> bytes:
        """One reply line, CRLF included."""
        t = self.transport
        self.h.wait_for(lambda: b"\r\n" in t.received, timeout, "a line")
        return t.take(t.received.index(b"\r\n") + 2)

    def body(self, timeout: float = TIMEOUT) -> bytes:
        """A multi-line reply's body, still dot-stuffed, its terminator removed."""
        t = self.transport

        def complete() -> bool:
            return t.received.startswith(b".\r\n") or b"\r\n.\r\n" in t.received

        self.h.wait_for(complete, timeout, "a multi-line body")
        if t.received.startswith(b".\r\n"):
            t.take(3)
            return b""
        end = t.received.index(b"\r\n.\r\n")
        out = t.take(end + 2)
        t.take(3)
        return out

    def wait_closed(self, timeout: float = TIMEOUT) -> None:
        self.h.wait_for(lambda: self.transport.lost, timeout, "the connection to close")

    # ----------------------------------------------------------- state

    @property
    def busy(self) -> int:
        return self.protocol._busy

    def describe(self) -> str:
        t = self.transport
        return (f"busy={self.protocol._busy:#x} state={self.protocol._state} reading={t.reading} "
                f"writing_paused={t.writing_paused} pending={len(t.pending)} inbound={len(t.inbound)} "
                f"closing={t.closing} lost={t.lost} received[-200:]={bytes(t.received[-200:])!r}")
