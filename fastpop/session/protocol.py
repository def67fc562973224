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
import errno
import logging
import os
from stat import S_ISREG
from typing import TYPE_CHECKING, Callable

from fastpop import faults
from fastpop.auth import sasl
from fastpop.auth.authenticator import AuthUnavailable, valid_username
from fastpop.net import address_key
from fastpop.session.sending import (
    SMALL_MESSAGE,
    MessageStream,
    SendfileStream,
    open_stream,
    render_small,
)
from fastpop.store.locking import MailboxLock, MailboxLocked, TableLock
from fastpop.store.maildir import Mailbox, ensure_maildir, is_permanent
from fastpop.store.safefs import served_uid
from fastpop.wire import responses as R
from fastpop.wire.commands import NUM_CODES, Command
from fastpop.wire.parser import CommandParser
from fastpop.wire.stuffing import pop3_size, pop3_size_of

if TYPE_CHECKING:
    from fastpop.session.context import SessionContext

log = logging.getLogger("fastpop.session")

AUTHORIZATION, TRANSACTION, UPDATE, CLOSED = range(4)

# Reasons the command pull is suspended (bit flags).
BUSY_AUTH = 1  # a login is being checked
BUSY_SENDING = 2  # a message is streaming out
BUSY_WRITE_PAUSED = 4  # the transport's write buffer is full
BUSY_CLOSING = 8  # the connection is ending
BUSY_TLS = 16  # the STLS handshake is running
BUSY_YIELD = 32  # a burst of pipelined commands gives other sessions a turn

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

MAX_TOP_LINES = 2**31 - 1


class POP3Protocol(asyncio.Protocol):
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
        "_counts",
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
        self._table = _AUTHORIZATION_TABLE
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
        # top count, top bytes, retr count, retr bytes
        self._counts = [0, 0, 0, 0]
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
                log.info("refused rip=%s: %d connections open from it", self._peer, ctx.connections.count(self._addr_key))
                self._out.append(R.ERR_TOO_MANY_CONNECTIONS)
            else:
                ctx.log_full(refused)
                self._out.append(R.ERR_SERVER_FULL)
            self._close("too many connections")
            return
        self._counted = True
        if self._timestamp:
            transport.write(b"+OK fastpop ready. %s\r\n" % self._timestamp.encode("ascii"))  # type: ignore[attr-defined]
        else:
            transport.write(b"+OK fastpop ready.\r\n")  # type: ignore[attr-defined]

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

    # ----------------------------------------------------------- AUTHORIZATION

    def cmd_user(self, args: tuple[str, ...]) -> None:
        if len(args) != 1:
            return self._bad(R.ERR_ARGS)
        if not (self._secure or self._trusted):
            self._out.append(R.ERR_PLAINTEXT_DISALLOWED)
            return
        if not valid_username(args[0]):
            self._user_name = None
            return self._bad(R.ERR_AUTH_INVALID_USER)
        self._user_name = args[0]
        self._out.append(R.OK_USER)

    def cmd_pass(self, args: tuple[str, ...]) -> None:
        name = self._user_name
        if name is None:
            return self._bad(R.ERR_NO_USER)
        if len(args) != 1:
            return self._bad(R.ERR_ARGS)
        if not (self._secure or self._trusted):
            self._user_name = None
            self._out.append(R.ERR_PLAINTEXT_DISALLOWED)
            return
        self._user_name = None
        self._run_auth(sasl.password_login(_Services(self), name, args[0]))

    def cmd_apop(self, args: tuple[str, ...]) -> None:
        if not self._timestamp:  # APOP off ([auth] apop): the greeting offered none
            return self._bad(R.ERR_UNKNOWN)
        if len(args) != 2:
            return self._bad(R.ERR_ARGS)
        name, digest = args
        self._user_name = None
        self._run_auth(sasl.apop_login(_Services(self), name, digest))

    def cmd_auth(self, args: tuple[str, ...]) -> None:
        """RFC 5034 AUTH; bare AUTH lists the mechanisms (fetchmail, Thunderbird)."""
        plaintext_ok = self._secure or self._trusted
        if not args:
            self._out.append(self._ctx.auth_list(plaintext_ok))
            return
        if len(args) > 2:
            return self._bad(R.ERR_ARGS)
        mechanism = self._ctx.mechanisms.get(args[0].upper())
        if mechanism is None:
            self._out.append(R.ERR_AUTH_MECHANISM)
            return
        if mechanism.plaintext and not plaintext_ok:
            self._out.append(R.ERR_PLAINTEXT_DISALLOWED)
            return
        self._user_name = None
        initial = None
        if len(args) == 2:
            initial = sasl.decode_response(args[1].encode("utf-8", "surrogatepass"))
            if initial is None:
                self._auth_started = self.loop.time()
                self._auth_failed(R.ERR_AUTH_BASE64, None, None, False, "initial response not base64")
                return
        self._run_auth(mechanism.start(_Services(self), initial))

    # The login exchange: a generator from fastpop.auth.sasl, driven here.

    def _run_auth(self, exchange) -> None:
        self._auth = exchange
        self._auth_started = self.loop.time()
        self._busy |= BUSY_AUTH
        self._auth_step(None, None)

    def _auth_step(self, value, exc: BaseException | None) -> None:
        """Resume the exchange with a value (or an exception) until it needs
        the client, a timer or a future, or ends."""
        while True:
            exchange = self._auth
            if exchange is None or self.transport is None or self._busy & BUSY_CLOSING:
                return  # the client left meanwhile
            try:
                step = exchange.send(value) if exc is None else exchange.throw(exc)
            except StopIteration as stop:
                self._auth = None
                self._auth_finished(stop.value)
                return
            except Exception as error:
                self._auth = None
                if not isinstance(error, AuthUnavailable):
                    log.error("authentication failed with an error rip=%s: %r", self._peer, error)
                self._out.append(R.ERR_AUTH_UNAVAILABLE)
                self._auth_resume()
                return
            value = exc = None
            kind = type(step)
            if kind is sasl.Challenge:
                self._auth_failure = step.failed
                self._out.append(sasl.encode_challenge(step.data))
                self._auth_wants_line = True
                self._auth_resume()  # the pull reads the answer
                return
            if kind is sasl.Gate:
                # Credentials are about to be checked: the failure penalty
                # waits here, on a timer, before anything is looked at.
                delay = 0.0 if self._trusted else self._ctx.penalty.delay(self._addr_key, step.user)
                self._auth_started = self.loop.time() + delay
                if delay > 0:
                    self.loop.call_later(delay, self._auth_step, None, None)
                    return
                continue
            if kind is sasl.Hold:
                delay = self._auth_started + step.seconds - self.loop.time()
                if delay > 0:
                    self.loop.call_later(delay, self._auth_step, None, None)
                    return
                continue
            future = step.future
            if not future.done():
                future.add_done_callback(self._auth_future_done)
                return
            if future.cancelled():
                exc = asyncio.CancelledError()
            else:
                exc = future.exception()
                value = None if exc is not None else future.result()

    def _auth_future_done(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._auth_step(None, asyncio.CancelledError())
        elif future.exception() is not None:
            self._auth_step(None, future.exception())
        else:
            self._auth_step(future.result(), None)

    def _auth_resume(self) -> None:
        if not self._in_process:
            self._flush()
        self._unbusy(BUSY_AUTH)

    def _auth_line(self, line: tuple[bool, bytes]) -> None:
        """A SASL continuation line (RFC 5034): base64, or "*" to cancel."""
        self._auth_wants_line = False
        ok, data = line
        failure, self._auth_failure = self._auth_failure, None
        if failure is not None:  # any answer to an error challenge (even "*") ends a failed attempt
            self._auth_abort()
            self._auth_finished(failure)
            return
        if not ok:
            self._auth_abort()
            self._auth_failed(R.ERR_AUTH_RESPONSE_TOO_LONG, None, None, False, "response too long")
            return
        if data == b"*":
            self._auth_abort()
            self._bad(R.ERR_AUTH_CANCELLED)
            return
        decoded = sasl.decode_response(data)
        if decoded is None:
            self._auth_abort()
            self._auth_failed(R.ERR_AUTH_BASE64, None, None, False, "response not base64")
            return
        self._busy |= BUSY_AUTH
        self._auth_step(decoded, None)

    def _auth_abort(self) -> None:
        if self._auth is not None:
            self._auth.close()
            self._auth = None

    def _auth_finished(self, outcome: sasl.Outcome) -> None:
        if outcome.record is None:
            self._auth_failed(R.ERR_AUTH_FAILED, outcome.user, outcome.credentials, not outcome.malformed,
                              outcome.reason)
            return
        self._login_succeeded(outcome.record)

    def _auth_failed(self, reply: bytes, name: str | None, credentials: bytes | None, penalize: bool,
                     reason: str) -> None:
        self._auth_failures += 1
        valid = name is not None and valid_username(name)
        if penalize and not self._trusted:  # per-user accounting only for names that can exist
            self._ctx.penalty.failed(self._addr_key, name if valid else None, credentials)
        # a name from SASL can be anything (16 KiB, newlines): logged as it is only if valid
        shown = name if valid else ("-" if name is None else repr(name[:64]))
        log.info("auth failed user=%s rip=%s reason=%s", shown, self._peer, reason or "-")
        # Answer every failure at the same moment after the attempt, so
        # timing tells nothing about whether the user exists.
        self._busy |= BUSY_AUTH
        delay = self._auth_started + self._ctx.config.auth_failure_delay - self.loop.time()
        self.loop.call_later(max(0.0, delay), self._login_failed, reply)

    def _login_succeeded(self, user) -> None:
        ctx = self._ctx
        if not self._trusted:
            ctx.penalty.succeeded(self._addr_key, user.name)
        delay = _login_delay(user, ctx.config.login_delay)
        if ctx.last_logins.too_soon(user.name, delay):
            log.info("login refused user=%s rip=%s: LOGIN-DELAY %d", user.name, self._peer, delay)
            self._out.append(R.ERR_LOGIN_DELAY)
            self._flush()
            self._unbusy(BUSY_AUTH)
            return
        self._open_mailbox(user)  # answers through _finish_login

    def _login_failed(self, reply: bytes = R.ERR_AUTH_FAILED) -> None:
        if self.transport is None or self._busy & BUSY_CLOSING:
            return
        self._out.append(reply)
        if self._auth_failures >= self._ctx.config.auth_max_attempts:
            self._close("too many auth failures")
            return
        self._flush()
        self._unbusy(BUSY_AUTH)

    def _open_mailbox(self, user) -> None:
        """Lock and open the user's mailbox, then answer the login.  A mailbox
        whose index must be rebuilt is opened in a thread, so a huge or
        changed mailbox never stalls other sessions."""
        try:
            path = self._ctx.auth.maildir_for(user)
        except ValueError as exc:
            log.error("no mail location for user=%s: %s", user.name, exc)
            return self._finish_login(R.ERR_MAILBOX_PERM)
        owner = served_uid(user.uid)
        try:
            try:
                lock = self._ctx.mailbox_locks.acquire(path)
            except FileNotFoundError:  # first login: create the Maildir
                ensure_maildir(path, owner)
                lock = self._ctx.mailbox_locks.acquire(path)
        except MailboxLocked:
            return self._finish_login(R.ERR_IN_USE)
        except OSError as exc:
            log.error("cannot lock mailbox user=%s path=%s: %s", user.name, path, exc)
            return self._finish_login(R.ERR_MAILBOX_PERM if is_permanent(exc) else R.ERR_MAILBOX_TEMP)
        try:
            mailbox = Mailbox.open_current(path, owner)
        except OSError:
            mailbox = None  # let the full open report it
        if mailbox is not None:
            return self._enter_transaction(user, lock, mailbox)
        fut = self.loop.run_in_executor(None, Mailbox.open, path, owner)
        fut.add_done_callback(lambda f: self._mailbox_opened(user, lock, path, f))

    def _mailbox_opened(self, user, lock: MailboxLock | TableLock, path: str, fut: asyncio.Future) -> None:
        if self.transport is None or self._busy & BUSY_CLOSING:
            lock.release()  # the client left meanwhile
            return
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is not None:
            lock.release()
            log.error("cannot open mailbox user=%s path=%s: %s", user.name, path, exc)
            return self._finish_login(R.ERR_MAILBOX_PERM if is_permanent(exc) else R.ERR_MAILBOX_TEMP)
        self._enter_transaction(user, lock, fut.result())

    def _enter_transaction(self, user, lock: MailboxLock | TableLock, mailbox: Mailbox) -> None:
        self._user = user
        self._lock = lock
        self._mailbox = mailbox
        self._deleted = bytearray(len(mailbox))
        self._state = TRANSACTION
        self._table = _TRANSACTION_TABLE
        config = self._ctx.config
        if config.timeout_transaction < config.timeout_authorization:
            self._rearm_timer()  # else the running timer, firing early, re-arms itself (_on_timer)
        log.debug("login user=%s rip=%s messages=%d", user.name, self._peer, len(mailbox))
        self._finish_login(R.OK_LOGGED_IN)

    def _finish_login(self, reply: bytes) -> None:
        if reply is R.OK_LOGGED_IN:  # LOGIN-DELAY counts from here
            self._ctx.last_logins.record(self._user.name, _login_delay(self._user, self._ctx.config.login_delay))
        self._out.append(reply)
        self._flush()
        self._unbusy(BUSY_AUTH)

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
        delay = _login_delay(self._user, default)
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

    def cmd_retr(self, args: tuple[str, ...]) -> None:
        if len(args) != 1:
            return self._bad(R.ERR_ARGS)
        i = self._message_index(args[0])
        if i >= 0:
            self._send_message(i, None)

    def cmd_top(self, args: tuple[str, ...]) -> None:
        if len(args) != 2:
            return self._bad(R.ERR_ARGS)
        i = self._message_index(args[0])
        if i < 0:
            return
        lines = args[1]
        if not (lines.isascii() and lines.isdigit()):
            self._out.append(R.ERR_BAD_LINES)
            return
        self._send_message(i, min(int(lines), MAX_TOP_LINES))

    def _send_message(self, index: int, top_lines: int | None) -> None:
        mailbox = self._mailbox
        assert mailbox is not None
        path, pop3_size, size = mailbox.message_file(index)
        try:
            try:
                fd = mailbox.open_message(path)
            except FileNotFoundError:
                renamed = mailbox.find_renamed(index)
                if renamed is None:
                    log.warning("message vanished user=%s file=%s", self._user.name, path)
                    self._out.append(R.ERR_MESSAGE_GONE)
                    return
                fd = mailbox.open_message(renamed)
                path = renamed
        except OSError as exc:
            return self._unreadable("open", path, exc)
        indexed_size = size
        try:
            # The index knows the file's size: a small message is one read,
            # no fstat.  A file whose size is not what was indexed (changed
            # since, which Maildir files never should) is judged as it is now.
            small = size <= SMALL_MESSAGE
            if small:
                data = os.read(fd, size + 1)  # +1: see a file that grew
            if not small or len(data) != size:
                st = os.fstat(fd)
                if not S_ISREG(st.st_mode):  # a FIFO or directory put in its place since
                    raise OSError(errno.EINVAL, "not a regular file", path)
                size = st.st_size
                small = size <= SMALL_MESSAGE
                os.lseek(fd, 0, os.SEEK_SET)
                if small:
                    data = os.read(fd, size + 1)  # +1: read to EOF even if the file grew
        except OSError as exc:
            os.close(fd)
            return self._unreadable("read", path, exc)
        if top_lines is None and (small and len(data) != indexed_size or not small and size != indexed_size):
            # Sent as it is now, so the octet count must be of what is sent, not LIST's
            pop3_size = self._changed_size(fd, path, data if small else None, indexed_size, size)
            if pop3_size < 0:
                return
        status = R.OK_TOP if top_lines is not None else b"+OK %d octets\r\n" % pop3_size
        if small:
            os.close(fd)
            body = render_small(data, top_lines)
            self._out += (status, body, R.END)
            self._out_size += len(body)
            self._count_sent(top_lines is not None, len(body))  # (metrics override it)
            return
        try:
            stream = open_stream(
                self, fd, size, top_lines, size == pop3_size and self._can_sendfile()
            )
        except (OSError, ValueError) as exc:
            os.close(fd)
            return self._unreadable("read", path, exc)
        self._out.append(status)
        self._flush()
        self._stream = stream
        self._stream_is_top = top_lines is not None
        self._busy |= BUSY_SENDING
        stream.pump()

    def _changed_size(self, fd: int, path: str, data: bytes | None, indexed_size: int, size: int) -> int:
        """The RETR size of a message file whose size is no longer the indexed one; -1 (fd
        closed, -ERR queued) if it cannot be read."""
        try:
            sent = pop3_size_of(data) if data is not None else pop3_size(fd)  # (the file being sent)
        except OSError as exc:
            os.close(fd)
            self._unreadable("read", path, exc)
            return -1
        log.warning("message changed since it was indexed user=%s file=%s indexed_size=%d size=%d",
                    self._user.name, path, indexed_size, size)
        return sent

    def _unreadable(self, what: str, path: str, exc: Exception) -> None:
        """A message that cannot be opened or read: logged, and [SYS/PERM] when only an
        administrator can mend it (permissions), as at login; else [SYS/TEMP]."""
        log.error("cannot %s message user=%s file=%s: %s", what, self._user.name, path, exc)
        self._out.append(R.ERR_MESSAGE_PERM if is_permanent(exc) else R.ERR_MESSAGE_TEMP)

    def _can_sendfile(self) -> bool:
        """sendfile(2) needs the plain socket: not through TLS, not when disabled."""
        transport = self.transport
        return (
            self._ctx.config.sendfile
            and transport is not None
            and transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("socket") is not None
        )

    def _count_sent(self, is_top: bool, size: int) -> None:
        counts = self._counts
        base = 0 if is_top else 2
        counts[base] += 1
        counts[base + 1] += size

    def stream_done(self, sent: int) -> None:
        """Called by MessageStream when the last byte has been queued."""
        self._stream = None
        self._count_sent(self._stream_is_top, sent)
        self._unbusy(BUSY_SENDING)

    def abort_stream(self) -> None:
        """Called by MessageStream when it cannot finish: the session cannot go on."""
        self._stream = None
        self._end_reason = "read error"
        if self.transport is not None:
            self.transport.abort()

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
                log.info("disconnected rip=%s auth_failures=%d reason=%s", self._peer, self._auth_failures, self._end_reason)
            return
        if not log.isEnabledFor(logging.INFO):
            return
        top_n, top_b, retr_n, retr_b = self._counts
        applied = self._state == UPDATE
        log.info(
            "session user=%s rip=%s top=%d/%d retr=%d/%d del=%d/%d size=%d end=%s",
            self._user.name,
            self._peer,
            top_n,
            top_b,
            retr_n,
            retr_b,
            self._deleted_count if applied else 0,
            self._deleted_size if applied else 0,
            self._mailbox.total_size if self._mailbox is not None else 0,
            self._end_reason,
        )


class _Services:
    """What fastpop.auth.sasl's exchanges may ask of the server, for one session."""

    __slots__ = ("_session",)

    def __init__(self, session: POP3Protocol) -> None:
        self._session = session

    @property
    def secret(self) -> bytes:
        return self._session._ctx.secret

    def lookup(self, name: str):
        session = self._session
        auth = session._ctx.auth
        if not auth.is_async:  # the passwd-file answers at once: no task
            return auth.lookup(name)
        return sasl.Pending(session.loop.create_task(auth.lookup_async(name, session._peer)))

    def valid_username(self, name: str) -> bool:
        return valid_username(name)

    def verify_password(self, name: str, password: str):
        """The user record (None: wrong), or a Pending when the check runs
        elsewhere (a slow hash in a thread, a user database on a task)."""
        session = self._session
        auth = session._ctx.auth
        if auth.is_async:  # SQL, LDAP: through the auth cache, on a task
            return sasl.Pending(session.loop.create_task(auth.verify_password_async(name, password, session._peer)))
        answered: list = []
        future = None

        def done(record) -> None:
            if future is None:  # called at once: a cheap hash, no future needed
                answered.append(record)
            elif not future.done():
                future.set_result(record)

        auth.verify_password(name, password, done)
        if answered:
            return answered[0]
        future = session.loop.create_future()  # done() runs later, from the event loop
        return sasl.Pending(future)

    def verify_apop(self, name: str, digest: str):
        session = self._session
        auth = session._ctx.auth
        if auth.is_async:
            return sasl.Pending(session.loop.create_task(
                auth.verify_apop_async(name, session._timestamp, digest, session._peer)))
        return auth.verify_apop(name, session._timestamp, digest)

    def scram_keys(self, record):
        session = self._session
        keys = session._ctx.auth.scram_keys(record, session._ctx.secret)
        if callable(keys):  # derived from a clear-text password: PBKDF2 in a thread
            return sasl.Pending(session.loop.run_in_executor(None, keys))
        return keys

    def validate_token(self, token: str, user: str | None, mechanism: str) -> sasl.Pending:
        from fastpop.auth.oauth import TokenRequest, run_validator

        session = self._session
        ctx = session._ctx
        request = TokenRequest(token, user, mechanism, session._peer, ctx.config)
        return sasl.Pending(run_validator(ctx.oauth_validator, request, session.loop))


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


def _login_delay(user, default: int) -> int:
    """LOGIN-DELAY seconds for a user: the login_delay extra field, else the default."""
    value = user.extra.get("login_delay") if user.extra else None
    if value is not None and value.isdigit():
        return int(value)
    return default


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
