"""The POP3 session: one asyncio.Protocol per connection (RFC 1939, RFC 2449).

Input is framed by the command parser; ``_process`` pulls complete commands
one at a time and dispatches them through a per-state table, so a command
that must wait (a password check in a thread, a message streaming out under
flow control) simply stops the pull: pipelined commands stay buffered in the
parser and are answered in order afterwards.  Replies to a burst of
pipelined commands are gathered and written with one call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastpop import faults
from fastpop.net import address_key
from fastpop.session.login import Login, login_delay
from fastpop.session.retrieval import Retrieval
from fastpop.session.sending import MessageStream, SendfileStream
from fastpop.session.state import (
    AUTHORIZATION,
    BUSY_CLOSING,
    BUSY_SENDING,
    BUSY_TLS,
    BUSY_WRITE_PAUSED,
    BUSY_YIELD,
    CLOSED,
    UPDATE,
)
from fastpop.store.locking import MailboxLock, TableLock
from fastpop.store.maildir import Mailbox
from fastpop.wire import responses as R
from fastpop.wire.commands import NUM_CODES, Command
from fastpop.wire.parser import CommandParser

if TYPE_CHECKING:
    from fastpop.session.context import SessionContext

log = logging.getLogger("fastpop.session")

# Replies of pipelined commands are gathered and written together, but every
# reply counts: once FLUSH_BYTES octets of messages and listings, or
# FLUSH_REPLIES pieces of replies of any kind (a status line, a body, a
# terminator), are gathered, they are written out and the pull waits: for the
# client to read if the transport's buffer passed its high-water mark (64 KiB:
# pause_writing, and reading is paused too), else for the next loop iteration.
# 20,000 pipelined "RETR 1" must not build gigabytes of replies, nor 50,000
# pipelined "CAPA" (6 octets each, 186 back) megabytes, nor hold the event
# loop.  A piece that is not a message or a listing is short (CAPA, the
# longest, is under 300 octets), so counting pieces bounds them without
# measuring each: under 150 KiB between two writes.  (A batch of 100
# pipelined commands still gets its replies in one write.)
FLUSH_BYTES = 256 * 1024
FLUSH_REPLIES = 512
# A TLS transport's high-water marks, for what it has to send and what it
# has read (the low ones are a quarter): those of a plain transport.
TLS_HIGH_WATER = 64 * 1024


class POP3Protocol(Login, Retrieval, asyncio.Protocol):
    """One POP3 connection.  Login (fastpop.session.login) and RETR/TOP
    (fastpop.session.retrieval) are parts of it, in modules of their own.

    Extension points, for subclasses (fastpop.session.metered counts with
    them; fastpop.session.proxied starts the session after a PROXY header);
    tests/test_protocol_hooks.py checks every override matches the base:

    - ``_authorization_table``, ``_transaction_table``: the dispatch tables
      (tuples indexed by command code) of the two states;
    - ``_on_logged_in()``: a login succeeded (the mailbox is open);
    - ``_on_login_refused(kind)``: a login attempt ended refused; ``kind`` is
      ``credentials``, ``malformed``, ``unavailable``, ``login_delay``,
      ``in_use`` or ``mailbox``;
    - ``_count_sent(is_top, size)``: a RETR or TOP body was queued;
    - ``_unbusy(flag)``: a reason to suspend the command pull ended (the
      reply of the command that set it is complete);
    - ``start_session()``: greet the client once its address is known;
    - asyncio's ``connection_made`` and ``connection_lost``.
    """

    __slots__ = (
        "_ctx",
        "loop",
        "transport",
        "_parser",
        "_state",
        "_table",
        "_out",
        "_out_size",
        "_busy",
        "_in_process",
        "_reading_paused",
        "_last_activity",
        "_timer",
        "_timestamp",
        "_peer",
        "_user_name",
        "_user",
        "_auth_failures",
        "_bad_commands",
        "_lock",
        "_mailbox",
        "_deleted",
        "_deleted_count",
        "_deleted_size",
        "_stream",
        "_stream_is_top",
        "_top_count",
        "_top_bytes",
        "_retr_count",
        "_retr_bytes",
        "_end_reason",
        # TLS, SASL and defences
        "_implicit_tls",
        "_secure",
        "_trusted",
        "_addr_key",
        "_counted",
        "_tls_task",
        "_auth",
        "_auth_wants_line",
        "_auth_started",
        "_auth_failure",
    )

    def __init__(self, ctx: SessionContext, implicit_tls: bool = False) -> None:
        self._ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport | None = None
        self._parser = CommandParser()
        self._state = AUTHORIZATION
        self._table = self._authorization_table
        self._out: list[bytes] = []
        self._out_size = 0  # octets of messages and listings in _out
        self._busy = 0
        self._in_process = False
        self._reading_paused = False
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timestamp = ""
        self._peer = "-"
        self._user_name: str | None = None
        self._user = None
        self._auth_failures = 0
        self._bad_commands = 0
        self._lock: MailboxLock | TableLock | None = None
        self._mailbox: Mailbox | None = None
        self._deleted: bytearray | None = None
        self._deleted_count = 0
        self._deleted_size = 0
        self._stream: MessageStream | SendfileStream | None = None
        self._stream_is_top = False
        self._top_count = self._top_bytes = 0  # bodies sent, for the session's log line
        self._retr_count = self._retr_bytes = 0
        self._end_reason = "disconnected"
        self._implicit_tls = implicit_tls
        self._secure = False  # TLS is up
        self._trusted = False  # the peer is in the trusted networks
        self._addr_key = ""
        self._counted = False  # holds a slot of the per-address connection limit
        self._tls_task: asyncio.Task | None = None
        self._auth = None  # the running login exchange (a fastpop.auth.sasl generator)
        self._auth_wants_line = False  # it waits for a SASL continuation line
        self._auth_started = 0.0
        self._auth_failure = None  # an error challenge is out: the attempt already failed

    # ----------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = peer[0]
        self.start_session()

    def start_session(self) -> None:
        """Greet the client, once its address is known: from the socket, or
        from a PROXY header (fastpop.session.proxied calls this after reading it)."""
        transport = self.transport
        assert transport is not None
        ctx = self._ctx
        ctx.sessions.add(self)
        if ctx.apop:  # RFC 1939: the greeting's timestamp is what offers APOP
            self._timestamp = ctx.new_timestamp()
        self._last_activity = now = self.loop.time()
        self._timer = self.loop.call_at(now + ctx.config.timeout_authorization, self._on_timer)
        self._trusted = self._peer in ctx.trusted
        self._secure = self._implicit_tls  # the listener did the handshake before connection_made
        if self._implicit_tls:
            _bound_tls_buffers(transport)
        if not self._trusted:  # trusted networks: no per-address limit, no penalties
            self._addr_key = address_key(self._peer)
        refused = ctx.connections.acquire(self._addr_key or None)
        if refused is not None:
            if refused == "address":
                log.info("refused rip=%s: %d connections open from it", self._peer,
                         ctx.connections.count(self._addr_key))
                self._out.append(R.ERR_TOO_MANY_CONNECTIONS)
            else:
                ctx.log_full(refused)
                self._out.append(R.ERR_SERVER_FULL)
            self._close("too many connections")
            return
        self._counted = True
        if self._timestamp:
            transport.write(b"+OK fastpop ready. %s\r\n" % self._timestamp.encode("ascii"))
        else:
            transport.write(b"+OK fastpop ready.\r\n")

    def data_received(self, data: bytes) -> None:
        # Idle means no complete line, not no byte: a client trickling one
        # byte at a time (slowloris) must not keep its connection forever.
        if 10 in data:  # b"\n"; a bytes needle would raise and clear a TypeError inside CPython first
            self._last_activity = self.loop.time()
        self._parser.feed(data)
        if not self._busy:
            self._process()
        if self._busy and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self._busy |= BUSY_WRITE_PAUSED

    def resume_writing(self) -> None:
        if self._stream is not None:
            self._busy &= ~BUSY_WRITE_PAUSED
            self._stream.pump()
        else:
            self._unbusy(BUSY_WRITE_PAUSED)

    def touch(self) -> None:
        """Progress on a long send counts as activity for the idle timeout."""
        self._last_activity = self.loop.time()

    @property
    def writing_paused(self) -> bool:
        return bool(self._busy & BUSY_WRITE_PAUSED)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == CLOSED:
            return  # a failed TLS handshake may report the loss twice
        self._busy |= BUSY_CLOSING
        if self._auth is not None:
            self._auth.close()
            self._auth = None
        if self._counted:
            self._counted = False
            self._ctx.connections.release(self._addr_key or None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._release_mailbox()
        self._ctx.sessions.discard(self)
        self._log_end()
        self._state = CLOSED
        self.transport = None

    # ----------------------------------------------------------- command pull

    def _process(self) -> None:
        parser = self._parser
        out = self._out
        self._in_process = True
        try:
            while not self._busy:
                if self._auth_wants_line:  # a SASL exchange is reading the client's answer
                    line = parser.next_line()
                    if line is None:
                        break
                    self._auth_line(line)
                else:
                    cmd = parser.next_command()
                    if cmd is None:
                        break
                    self._table[cmd[0]](self, cmd[1])
                if self._out_size >= FLUSH_BYTES or len(out) >= FLUSH_REPLIES:
                    self._flush()  # may pause writing: the pull then waits for resume_writing
                    if not self._busy:
                        self._busy |= BUSY_YIELD
                        self.loop.call_soon(self._unbusy, BUSY_YIELD)
        finally:
            self._in_process = False
        self._flush()

    def _unbusy(self, flag: int) -> None:
        self._busy &= ~flag
        if self._busy or self._in_process:
            return  # the running pull (or a later event) carries on
        self._process()
        if not self._busy and self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _flush(self) -> None:
        out = self._out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self._out_size = 0

    def _close(self, reason: str) -> None:
        self._end_reason = reason
        self._busy |= BUSY_CLOSING
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _rearm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(self._last_activity + self._timeout(), self._on_timer)

    def _timeout(self) -> float:
        config = self._ctx.config
        return config.timeout_authorization if self._state == AUTHORIZATION else config.timeout_transaction

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        deadline = self._last_activity + self._timeout()
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._end_reason = "timeout"
        self._busy |= BUSY_CLOSING
        if self._busy & (BUSY_WRITE_PAUSED | BUSY_SENDING | BUSY_TLS):
            self.transport.abort()  # a reader that stopped reading: nothing more can be said
        else:
            self._out.append(R.ERR_TIMEOUT)
            self._close("timeout")

    def drain(self) -> bool:
        """Server stopping gracefully: a session not logged in (and not in the
        middle of a login) ends now; a logged-in one may still finish.
        Returns whether this session goes on."""
        if self._state == AUTHORIZATION and not self._busy:
            self.shutdown()
            return False
        return self.transport is not None

    def shutdown(self) -> None:
        """Server stopping: end the session without applying deletions."""
        if self.transport is None:
            return
        self._end_reason = "shutdown"
        if self._busy & (BUSY_WRITE_PAUSED | BUSY_SENDING | BUSY_TLS):
            self.transport.abort()
        else:
            self._out.append(R.ERR_SHUTDOWN)
            self._close("shutdown")

    # ----------------------------------------------------------- hooks (see the class docstring)

    def _on_logged_in(self) -> None:
        pass

    def _on_login_refused(self, kind: str) -> None:
        pass

    # ----------------------------------------------------------- helpers

    def _bad(self, reply: bytes) -> None:
        self._out.append(reply)
        self._bad_commands += 1
        if self._bad_commands >= self._ctx.config.max_bad_commands:
            self._out.append(R.ERR_TOO_MANY_BAD)
            self._close("too many bad commands")

    def _message_index(self, arg: str) -> int:
        """0-based index of a live message, or -1 after queueing the error."""
        if not (arg.isascii() and arg.isdigit()) or len(arg) > 10:
            self._out.append(R.ERR_BAD_NUMBER)
            return -1
        n = int(arg)
        mailbox = self._mailbox
        assert mailbox is not None and self._deleted is not None
        if n < 1 or n > len(mailbox):
            self._out.append(R.ERR_NO_MESSAGE)
            return -1
        if self._deleted[n - 1]:
            self._out.append(R.ERR_MESSAGE_DELETED)
            return -1
        return n - 1

    def cmd_quit_authorization(self, args: tuple[str, ...]) -> None:
        self._out.append(R.OK_LOGOUT)
        self._close("quit")

    def cmd_capa(self, args: tuple[str, ...]) -> None:
        if args:
            return self._bad(R.ERR_ARGS)
        ctx = self._ctx
        if self._state == AUTHORIZATION:
            self._out.append(ctx.capa_for(not self._secure, self._secure or self._trusted))
            return
        capa = ctx.capa_transaction
        default = ctx.config.login_delay
        delay = login_delay(self._user, default)
        if delay != default:  # RFC 2449: after login, the value that applies to this user
            capa = capa.replace(b"\r\nLOGIN-DELAY %d\r\n" % default, b"\r\nLOGIN-DELAY %d\r\n" % delay)
        self._out.append(capa)

    # ----------------------------------------------------------- STLS, UTF8

    def cmd_stls(self, args: tuple[str, ...]) -> None:
        """RFC 2595.  Everything the client sent after STLS and before the
        handshake is discarded (no plaintext command injection, CVE-2011-0411)."""
        if args:
            return self._bad(R.ERR_ARGS)
        if self._ctx.tls is None:
            self._out.append(R.ERR_TLS_UNAVAILABLE)
            return
        if self._secure:
            self._out.append(R.ERR_TLS_ACTIVE)
            return
        self._out.append(R.OK_STLS)
        self._flush()
        self._user_name = None  # nothing from before TLS counts
        self._start_tls()

    def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None and self._ctx.tls is not None
        self._busy |= BUSY_TLS  # the pull stops here
        self._parser.discard()
        if not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        self._tls_task = self.loop.create_task(self._ctx.tls.upgrade(self, transport))

    def tls_established(self, transport: asyncio.Transport) -> None:
        """Called by fastpop.session.tls when the STLS handshake is done."""
        self._tls_task = None
        if self._state == CLOSED or self._busy & BUSY_CLOSING:
            transport.abort()
            return
        self.transport = transport
        self._secure = True
        _bound_tls_buffers(transport)
        self._reading_paused = False  # start_tls resumed reading
        self._parser.discard()
        self._parser.utf8 = False
        self._last_activity = self.loop.time()
        if log.isEnabledFor(logging.DEBUG):
            sslobj = transport.get_extra_info("ssl_object")
            log.debug("tls rip=%s %s %s", self._peer, sslobj.version() if sslobj else "?",
                      (transport.get_extra_info("cipher") or ("?",))[0])
        self._unbusy(BUSY_TLS)

    def tls_failed(self, exc: BaseException) -> None:
        """Called by fastpop.session.tls when the STLS handshake failed or timed out."""
        self._tls_task = None
        log.info("TLS handshake failed rip=%s: %s", self._peer, exc or type(exc).__name__)
        if self._state == CLOSED:
            return  # the TLS layer reported the loss already
        self._end_reason = "tls failed"
        self.connection_lost(None)

    def cmd_utf8(self, args: tuple[str, ...]) -> None:
        """RFC 6856: UTF-8 user names and passwords (SASLprep'd) from here on."""
        if args:
            return self._bad(R.ERR_ARGS)
        self._parser.utf8 = True
        self._out.append(R.OK_UTF8)

    def cmd_noop(self, args: tuple[str, ...]) -> None:
        if args:
            return self._bad(R.ERR_ARGS)
        self._out.append(R.OK_NOOP)

    # ----------------------------------------------------------- TRANSACTION

    def cmd_stat(self, args: tuple[str, ...]) -> None:
        if args:
            return self._bad(R.ERR_ARGS)
        mailbox = self._mailbox
        assert mailbox is not None
        count = len(mailbox) - self._deleted_count
        self._out.append(b"+OK %d %d\r\n" % (count, mailbox.total_size - self._deleted_size))

    def cmd_list(self, args: tuple[str, ...]) -> None:
        mailbox = self._mailbox
        assert mailbox is not None and self._deleted is not None
        if len(args) > 1:
            return self._bad(R.ERR_ARGS)
        if args:
            i = self._message_index(args[0])
            if i >= 0:
                self._out.append(b"+OK %d %d\r\n" % (i + 1, mailbox.size(i)))
            return
        count = len(mailbox) - self._deleted_count
        size = mailbox.total_size - self._deleted_size
        lines = mailbox.index.list_lines(self._deleted)
        self._out += (b"+OK %d messages (%d octets)\r\n" % (count, size), lines, R.END)
        self._out_size += len(lines)

    def cmd_uidl(self, args: tuple[str, ...]) -> None:
        mailbox = self._mailbox
        assert mailbox is not None and self._deleted is not None
        if len(args) > 1:
            return self._bad(R.ERR_ARGS)
        if args:
            i = self._message_index(args[0])
            if i >= 0:
                self._out.append(b"+OK %d %s\r\n" % (i + 1, mailbox.uidl(i).encode("ascii")))
            return
        lines = mailbox.index.uidl_lines(self._deleted)
        self._out += (R.OK, lines, R.END)
        self._out_size += len(lines)

    def cmd_dele(self, args: tuple[str, ...]) -> None:
        if len(args) != 1:
            return self._bad(R.ERR_ARGS)
        i = self._message_index(args[0])
        if i < 0:
            return
        assert self._deleted is not None and self._mailbox is not None
        self._deleted[i] = 1
        self._deleted_count += 1
        self._deleted_size += self._mailbox.size(i)
        self._out.append(R.OK_DELETED)

    def cmd_rset(self, args: tuple[str, ...]) -> None:
        if args:
            return self._bad(R.ERR_ARGS)
        mailbox = self._mailbox
        assert mailbox is not None
        self._deleted = bytearray(len(mailbox))
        self._deleted_count = self._deleted_size = 0
        self._out.append(b"+OK %d messages (%d octets)\r\n" % (len(mailbox), mailbox.total_size))

    def cmd_quit_transaction(self, args: tuple[str, ...]) -> None:
        mailbox = self._mailbox
        assert mailbox is not None and self._deleted is not None
        self._state = UPDATE
        deleted = _marked(self._deleted, self._deleted_count)
        failed = mailbox.delete(deleted) if deleted else 0
        if faults.ACTIVE and deleted:
            faults.hit("update.before_reply")
        self._release_mailbox()
        self._out.append(R.ERR_NOT_ALL_DELETED if failed else (R.OK_LOGOUT_DELETED if deleted else R.OK_LOGOUT))
        self._close("quit")

    def _release_mailbox(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _log_end(self) -> None:
        if self._user is None:
            if self._auth_failures:
                log.info("disconnected rip=%s auth_failures=%d reason=%s", self._peer, self._auth_failures,
                         self._end_reason)
            return
        if not log.isEnabledFor(logging.INFO):
            return
        applied = self._state == UPDATE
        log.info(
            "session user=%s rip=%s top=%d/%d retr=%d/%d del=%d/%d size=%d end=%s",
            self._user.name,
            self._peer,
            self._top_count,
            self._top_bytes,
            self._retr_count,
            self._retr_bytes,
            self._deleted_count if applied else 0,
            self._deleted_size if applied else 0,
            self._mailbox.total_size if self._mailbox is not None else 0,
            self._end_reason,
        )


def _bound_tls_buffers(transport) -> None:
    """A TLS transport pauses the session at the high-water mark of a plain
    one (64 KiB), not at its own default (512 KiB of records, held for a
    client that does not read, on top of the socket transport's buffer), and
    stops reading the socket past 64 KiB of records the session has not
    taken (not 256 KiB)."""
    if transport.get_extra_info("sslcontext") is None:
        return  # TLS ended at a proxy: a plain socket
    transport.set_write_buffer_limits(high=TLS_HIGH_WATER)
    set_read_limits = getattr(transport, "set_read_buffer_limits", None)  # (not Python 3.10's asyncio)
    if set_read_limits is not None:
        set_read_limits(high=TLS_HIGH_WATER)


def _marked(flags: bytearray, count: int) -> list[int]:
    """Indexes of the set bytes, found at C speed (a mailbox may hold 100,000)."""
    out: list[int] = []
    i = flags.find(1)
    while i >= 0 and len(out) < count:
        out.append(i)
        i = flags.find(1, i + 1)
    return out


# ----------------------------------------------------------------- dispatch tables


def _error_handler(reply: bytes) -> Callable[[POP3Protocol, tuple[str, ...]], None]:
    def handler(self: POP3Protocol, args: tuple[str, ...]) -> None:
        self._bad(reply)

    return handler


def _table(handlers: dict[Command, Callable]) -> tuple[Callable, ...]:
    """A tuple indexed by command code; commands not listed are answered as
    unknown (never valid) or wrong-state (valid in another state)."""
    unknown = _error_handler(R.ERR_UNKNOWN)
    wrong_state = _error_handler(R.ERR_WRONG_STATE)
    table: list[Callable] = []
    for code in range(NUM_CODES):
        if code in handlers:
            table.append(handlers[Command(code)])
        elif code == Command.TOO_LONG:
            table.append(_error_handler(R.ERR_TOO_LONG))
        elif code == Command.INVALID:
            table.append(_error_handler(R.ERR_INVALID_CHARS))
        elif code in _IMPLEMENTED:
            table.append(wrong_state)
        else:
            table.append(unknown)
    return tuple(table)


P = POP3Protocol
_AUTHORIZATION = {
    Command.USER: P.cmd_user,
    Command.PASS: P.cmd_pass,
    Command.APOP: P.cmd_apop,
    Command.QUIT: P.cmd_quit_authorization,
    Command.CAPA: P.cmd_capa,
    Command.AUTH: P.cmd_auth,
    Command.STLS: P.cmd_stls,
    Command.UTF8: P.cmd_utf8,
}
_TRANSACTION = {
    Command.STAT: P.cmd_stat,
    Command.LIST: P.cmd_list,
    Command.RETR: P.cmd_retr,
    Command.DELE: P.cmd_dele,
    Command.NOOP: P.cmd_noop,
    Command.RSET: P.cmd_rset,
    Command.TOP: P.cmd_top,
    Command.UIDL: P.cmd_uidl,
    Command.CAPA: P.cmd_capa,
    Command.QUIT: P.cmd_quit_transaction,
}
_IMPLEMENTED = set(_AUTHORIZATION) | set(_TRANSACTION)
_AUTHORIZATION_TABLE = _table(_AUTHORIZATION)
_TRANSACTION_TABLE = _table(_TRANSACTION)
del P
POP3Protocol._authorization_table = _AUTHORIZATION_TABLE
POP3Protocol._transaction_table = _TRANSACTION_TABLE
