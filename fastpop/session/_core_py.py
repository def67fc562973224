"""The session's core: the state of one POP3 connection and the paths every
session takes, written once and built twice.

This file is the pure-Python twin.  setup.py compiles the same file, with
Cython's pure Python mode, into the extension ``fastpop.session._core``
(whose ``_core.pyx`` only names this file):
``_core.pxd`` beside it (named after the compiled module, which is how
Cython finds it) makes ``SessionCore`` a cdef class with typed fields, and
says which methods are C calls and which locals are C variables.  Nothing
here imports Cython, so the twin runs without it; fastpop._compiled chooses
the build, and the two cannot drift apart.

``SessionCore`` holds every field of a session and does: the asyncio
callbacks (connection_made and _lost, data_received, flow control), the
command pull and the dispatch through the state's table, the reply buffer
and its bounds, the busy flags, the idle timer, USER and PASS (driving the
fastpop.auth.sasl exchange, then LOGIN-DELAY and the mailbox opened and
locked), and the common commands: CAPA, NOOP, QUIT, STAT, LIST, UIDL, DELE,
RSET, and RETR and TOP of a small message as indexed.  ``POP3Protocol``
(fastpop.session.protocol) derives from it with the parts in Python:
Login's rarer paths (APOP, AUTH, SASL lines, failures), Retrieval (large,
renamed, changed or unreadable messages, client workarounds), STLS.  Hooks (``_unbusy``, ``_on_logged_in``,
``_on_login_refused``, ``start_session``...) are reached through the
instance, so a subclass's override in Python takes effect in both builds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import TYPE_CHECKING

from fastpop import faults, logline
from fastpop.auth.authenticator import valid_username
from fastpop.auth.sasl import Challenge, Gate, Hold, encode_challenge, password_login
from fastpop.errors import AuthUnavailable
from fastpop.net import address_key
from fastpop.session.login import Services, login_delay
from fastpop.session.pools import update_pool
from fastpop.session.sending import SMALL_MESSAGE, render_small
from fastpop.session.state import (
    AUTHORIZATION,
    BUSY_AUTH,
    BUSY_CLOSING,
    BUSY_SENDING,
    BUSY_TLS,
    BUSY_UPDATING,
    BUSY_WRITE_PAUSED,
    BUSY_YIELD,
    CLOSED,
    FLUSH_BYTES,
    FLUSH_REPLIES,
    MAX_TOP_LINES,
    PRELOGIN_TIMEOUTS,
    TRANSACTION,
    UPDATE,
)
from fastpop.session.tls import bound_tls_buffers
from fastpop.session.update import apply_update, marked
from fastpop.store import expire
from fastpop.store.locking import MailboxLocked
from fastpop.store.maildir import Mailbox, ensure_maildir, is_permanent
from fastpop.store.safefs import served_uid
from fastpop.wire import responses as R
from fastpop.wire.parser import CommandParser

if TYPE_CHECKING:
    from fastpop.auth import sasl
    from fastpop.auth.passwd_file import UserRecord
    from fastpop.session.context import SessionContext
    from fastpop.session.sending import MessageStream, SendfileStream
    from fastpop.store.locking import MailboxLock, TableLock

log = logging.getLogger("fastpop.session")
# LIST and UIDL of a mailbox of more messages are formatted in a thread (Retrieval._list_in_thread)
LISTING_IN_LOOP_MOST = 16384


class SessionCore:
    """The fields of a session and its common paths (see the module's docstring)."""

    # Slots in the pure-Python build; compiled, the fields are the cdef class's (_core.pxd).
    __slots__ = (
        "_ctx", "loop", "transport", "_parser", "_state", "_table", "_out", "_out_size", "_busy", "_in_process",
        "_reading_paused", "_last_activity", "_timer", "_timestamp", "_peer", "_user_name", "_user",
        "_auth_failures", "_bad_commands", "_lock", "_mailbox", "_deleted", "_deleted_count", "_deleted_size",
        "_stream", "_stream_is_top", "_top_count", "_top_bytes", "_retr_count", "_retr_bytes", "_end_reason",
        # TLS, SASL and defences
        "_implicit_tls", "_secure", "_trusted", "_addr_key", "_counted", "_tls_task", "_auth", "_auth_wants_line",
        "_auth_started", "_auth_failure", "_auth_mech",
        "_last_retr",  # RFC 1460's LAST
        "_since",  # fastpop who (fastpop.serve.control): loop time of the connection, then of the login
        # ISP limits and master users
        "_cap_exempt", "_master", "_proxy_master"
    )

    # What the paths below use of POP3Protocol (its dispatch tables, Login's
    # methods) is marked "(POP3Protocol's)": this class only ever runs as its base.

    def __init__(self, ctx: SessionContext, implicit_tls: bool = False) -> None:
        self._ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport | None = None
        self._parser = CommandParser()
        self._state = AUTHORIZATION
        self._table = self._authorization_table  # type: ignore[attr-defined]  # (POP3Protocol's)
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
        self._user: UserRecord | None = None
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
        self._auth: sasl.Step | None = None  # the running login exchange (a fastpop.auth.sasl generator)
        self._auth_wants_line = False  # it waits for a SASL continuation line
        self._auth_started = 0.0
        self._since = 0.0
        self._auth_failure: sasl.Outcome | None = None  # an error challenge is out: the attempt already failed
        self._auth_mech = "-"  # the running or last login's mechanism, for the auth failure log line
        self._last_retr = 0  # the highest message number RETR sent since login or RSET (LAST)
        self._cap_exempt = False  # counted without the per-address cap (max_connections_per_ip_exempt)
        self._master: str | None = None  # the master user who logged in as the user
        self._proxy_master = False  # that master is a proxy's, for the user: the user's own login (proxy_master)

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
        self._last_activity = self._since = now = self.loop.time()
        self._timer = self.loop.call_at(now + ctx.config.timeout_authorization, self._on_timer)
        self._trusted = self._peer in ctx.trusted
        self._secure = self._implicit_tls  # the listener did the handshake before connection_made
        if self._implicit_tls:
            bound_tls_buffers(transport)
        if not self._trusted:  # trusted networks: no per-address limit, no penalties
            self._addr_key = address_key(self._peer)
            # exempt networks (carrier-grade NAT, webmail): no cap, still penalties
            self._cap_exempt = self._peer in ctx.cap_exempt
        refused = ctx.connections.acquire(None if self._cap_exempt else self._addr_key or None)
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
            self._ctx.connections.release(None if self._cap_exempt else self._addr_key or None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if not (self._state == UPDATE and self._busy & BUSY_UPDATING):  # (else the update's thread releases it)
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
                    self._auth_line(line)  # type: ignore[attr-defined]  # (POP3Protocol's)
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
        if self._state == AUTHORIZATION:  # and a total one: activity cannot keep a session unlogged for ever
            deadline = min(deadline, self._since + PRELOGIN_TIMEOUTS * self._ctx.config.timeout_authorization)
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

    def shutdown(self, reason: str = "shutdown") -> None:
        """Server stopping (or ``fastpop kick``: reason "kicked"): end the
        session without applying deletions."""
        if self.transport is None:
            return
        self._end_reason = reason
        if self._busy & (BUSY_WRITE_PAUSED | BUSY_SENDING | BUSY_TLS):
            self.transport.abort()
        else:
            self._out.append(R.ERR_SHUTDOWN if reason == "shutdown" else R.ERR_KICKED)
            self._close(reason)

    # ----------------------------------------------------------- hooks (see POP3Protocol's docstring)

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

    # ----------------------------------------------------------- AUTHORIZATION

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
        mailbox = self._mailbox
        if mailbox is not None:  # the same for EXPIRE (0 is shown as 0: deleted at QUIT)
            shown = ctx.config.expire.upper()
            own = expire.capa_value(mailbox.expire_days)
            if own != shown:
                capa = capa.replace(b"\r\nEXPIRE %s\r\n" % shown.encode(), b"\r\nEXPIRE %s\r\n" % own.encode())
        self._out.append(capa)

    def cmd_noop(self, args: tuple[str, ...]) -> None:
        if args:
            return self._bad(R.ERR_ARGS)
        self._out.append(R.OK_NOOP)

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
        self._auth_mech = "USER"
        self._run_auth(password_login(Services(self), name, args[0]))

    # The login exchange: a generator from fastpop.auth.sasl, driven here.

    def _run_auth(self, exchange: sasl.Step) -> None:
        if self._ctx.maintenance:  # fastpop maintenance on: sessions finish, nobody new logs in
            exchange.close()
            log.info("login refused rip=%s reason=maintenance", self._peer)
            self._on_login_refused("unavailable")
            self._out.append(R.ERR_MAINTENANCE)
            return
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
                self._on_login_refused("unavailable")
                # counted: neither delayed nor a failure, it must not be retried for ever on one connection
                self._bad(R.ERR_AUTH_UNAVAILABLE)
                self._auth_resume()
                return
            value = exc = None
            if type(step) is Challenge:
                self._auth_failure = step.failed
                self._out.append(encode_challenge(step.data))
                self._auth_wants_line = True
                self._auth_resume()  # the pull reads the answer
                return
            if type(step) is Gate:
                # Credentials are about to be checked: the failure penalty
                # waits here, on a timer, before anything is looked at.
                delay = 0.0 if self._trusted else self._ctx.penalty.delay(self._addr_key, step.user)
                self._auth_started = self.loop.time() + delay
                if delay > 0:
                    self.loop.call_later(delay, self._auth_step, None, None)
                    return
                continue
            if type(step) is Hold:
                delay = self._auth_started + step.seconds - self.loop.time()
                if delay > 0:
                    self.loop.call_later(delay, self._auth_step, None, None)
                    return
                continue
            future = step.future
            if not future.done():
                future.add_done_callback(self._auth_future_done)  # type: ignore[attr-defined]  # (POP3Protocol's)
                return
            if future.cancelled():
                exc = asyncio.CancelledError()
            else:
                exc = future.exception()
                value = None if exc is not None else future.result()

    def _auth_resume(self) -> None:
        if not self._in_process:
            self._flush()
        self._unbusy(BUSY_AUTH)

    def _auth_finished(self, outcome: sasl.Outcome) -> None:
        record = outcome.record
        if record is not None and self._ctx.denied and record.name in self._ctx.denied:
            # fastpop deny: to the client, a failure like any other (same reply, delay, penalty)
            self._auth_failed(  # type: ignore[attr-defined]  # (POP3Protocol's)
                R.ERR_AUTH_FAILED, record.name, outcome.credentials, True, "denied"
            )
            return
        if record is None:
            self._auth_failed(  # type: ignore[attr-defined]  # (POP3Protocol's)
                R.ERR_AUTH_FAILED, outcome.user, outcome.credentials, not outcome.malformed, outcome.reason
            )
            return
        if self._restricted(outcome):  # type: ignore[attr-defined]  # (POP3Protocol's): allow_nets, nopop3...
            return
        self._login_succeeded(record)

    def _login_succeeded(self, user: UserRecord) -> None:
        ctx = self._ctx
        master = self._master
        if not self._trusted:  # (a master's success clears the master's count, not the user's)
            ctx.penalty.succeeded(self._addr_key, user.name if master is None
                                  else ctx.config.auth_master_separator + master)
        delay = login_delay(user, ctx.config.login_delay)
        # LOGIN-DELAY paces the user's own client: a master's login neither waits for it nor counts
        # (but a proxy's master logs in for the user's own client)
        if (master is None or self._proxy_master) and ctx.last_logins.too_soon(user.name, delay):
            log.info("login refused user=%s rip=%s: LOGIN-DELAY %d", user.name, self._peer, delay)
            self._on_login_refused("login_delay")
            self._out.append(R.ERR_LOGIN_DELAY)
            self._flush()
            self._unbusy(BUSY_AUTH)
            return
        self._open_mailbox(user)  # answers through _finish_login

    def _open_mailbox(self, user: UserRecord) -> None:
        """Lock and open the user's mailbox, then answer the login.  A mailbox
        whose index must be rebuilt is opened in a thread, so a huge or
        changed mailbox never stalls other sessions."""
        try:
            path = self._ctx.auth.maildir_for(user)
        except ValueError as exc:
            log.error("no mail location for user=%s: %s", user.name, exc)
            return self._finish_login(R.ERR_MAILBOX_PERM, "mailbox")
        owner = served_uid(user.uid)
        try:
            try:
                lock = self._ctx.mailbox_locks.acquire(path)
            except FileNotFoundError:  # first login: create the Maildir
                ensure_maildir(path, owner)
                lock = self._ctx.mailbox_locks.acquire(path)
        except MailboxLocked:
            return self._finish_login(R.ERR_IN_USE, "in_use")
        except OSError as exc:
            log.error("cannot lock mailbox user=%s path=%s: %s", user.name, path, exc)
            return self._finish_login(R.ERR_MAILBOX_PERM if is_permanent(exc) else R.ERR_MAILBOX_TEMP, "mailbox")
        days = expire.days_for(user.extra, self._ctx.config.expire)
        # (in a thread: 0 s for Dovecot's locks, which are waited for in the event loop instead)
        if days is not None and expire.has_record(path):
            # EXPIRE: messages retrieved long enough ago go before the client sees the mailbox
            job = functools.partial(expire.open_expired, path, owner, days, 0.0)
        else:
            try:
                mailbox = Mailbox.open_current(path, owner)
            except OSError:
                mailbox = None  # let the full open report it
            if mailbox is not None:
                return self._enter_transaction(user, lock, mailbox)
            job = functools.partial(Mailbox.open, path, owner, 0.0)
        self._open_in_thread(user, lock, path, job, None)  # type: ignore[attr-defined]  # (POP3Protocol's)

    def _enter_transaction(self, user: UserRecord, lock: MailboxLock | TableLock, mailbox: Mailbox) -> None:
        self._user = user
        self._lock = lock
        self._mailbox = mailbox
        # EXPIRE counts the user's own downloads: a master user's RETR is neither recorded nor deleted at QUIT
        mailbox.expire_days = (None if self._master is not None and not self._proxy_master
                               else expire.days_for(user.extra, self._ctx.config.expire))
        self._deleted = bytearray(len(mailbox))
        self._state = TRANSACTION
        self._table = self._transaction_table  # type: ignore[attr-defined]  # (POP3Protocol's)
        self._since = self.loop.time()
        config = self._ctx.config
        if config.timeout_transaction < config.timeout_authorization:
            self._rearm_timer()  # else the running timer, firing early, re-arms itself (_on_timer)
        if self._master is not None:  # an administrator in a user's mailbox: always on the record
            log.info("login user=%s master=%s rip=%s messages=%d", user.name, self._master, self._peer, len(mailbox))
        else:
            log.debug("login user=%s rip=%s messages=%d", user.name, self._peer, len(mailbox))
        self._finish_login(R.OK_LOGGED_IN)

    def _finish_login(self, reply: bytes, refused: str = "") -> None:
        """Answer the login: ``refused`` names why it was (a metrics label), or it succeeded."""
        if refused:
            self._on_login_refused(refused)
        else:  # LOGIN-DELAY counts from here
            user = self._user
            assert user is not None, "a login succeeds in _enter_transaction, which sets it"
            if self._master is None or self._proxy_master:
                self._ctx.last_logins.record(user.name, login_delay(user, self._ctx.config.login_delay))
            self._on_logged_in()
        self._out.append(reply)
        self._flush()
        self._unbusy(BUSY_AUTH)

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
        status = b"+OK %d messages (%d octets)\r\n" % (count, size)
        if len(mailbox) > LISTING_IN_LOOP_MOST:
            return self._list_in_thread(mailbox.index.list_lines, status)  # type: ignore[attr-defined]
        lines = mailbox.index.list_lines(self._deleted)
        self._out += (status, lines, R.END)
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
        if len(mailbox) > LISTING_IN_LOOP_MOST:
            return self._list_in_thread(mailbox.index.uidl_lines, R.OK)  # type: ignore[attr-defined]
        lines = mailbox.index.uidl_lines(self._deleted)
        self._out += (R.OK, lines, R.END)
        self._out_size += len(lines)

    def cmd_retr(self, args: tuple[str, ...]) -> None:
        if len(args) != 1:
            return self._bad(R.ERR_ARGS)
        i = self._message_index(args[0])
        if i < 0:
            return
        if i >= self._last_retr:
            self._last_retr = i + 1  # (LAST)
        mailbox = self._mailbox
        assert mailbox is not None
        if self._ctx.config.seen_on_retr:  # flagged at QUIT (fastpop.store.maildir.Mailbox.apply_seen)
            mailbox.mark_seen(i)
        if mailbox.expire_days is not None:  # EXPIRE: its retrieval is recorded at QUIT
            mailbox.mark_retrieved(i)
        self._send(i, -1)

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
        self._send(i, min(int(lines), MAX_TOP_LINES))

    def _send(self, index: int, top: int) -> None:
        """RETR (``top`` < 0) or TOP of message ``index``.  The common case, a
        small message whose file has the indexed size and no client
        workaround, is done here: an open, one read, a close, the stuffed
        copy queued.  Anything else (a large message, a renamed or unreadable
        file, a changed size) goes to Retrieval._send_message, which opens
        the file again and deals with it."""
        top_lines = None if top < 0 else top
        mailbox = self._mailbox
        assert mailbox is not None
        path, pop3_size, size = mailbox.message_file(index)
        if size > SMALL_MESSAGE or self._ctx.config.client_workarounds:
            return self._send_message(index, top_lines)  # type: ignore[attr-defined]  # (Retrieval's)
        try:
            fd = mailbox.open_message(path)
        except OSError:
            return self._send_message(index, top_lines)  # type: ignore[attr-defined]
        try:
            data = os.read(fd, size + 1)  # +1: see a file that grew
        except OSError:
            data = None
        finally:
            os.close(fd)
        if data is None or len(data) != size:
            return self._send_message(index, top_lines)  # type: ignore[attr-defined]
        body = render_small(data, top_lines, 0)
        self._out += (R.OK_TOP if top >= 0 else b"+OK %d octets\r\n" % pop3_size, body, R.END)
        self._out_size += len(body)
        self._count_sent(top >= 0, len(body))  # type: ignore[attr-defined]  # (Retrieval's; metrics override it)

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
        self._last_retr = 0  # RFC 1460
        mailbox.forget_seen()
        self._out.append(b"+OK %d messages (%d octets)\r\n" % (len(mailbox), mailbox.total_size))

    def cmd_quit_transaction(self, args: tuple[str, ...]) -> None:
        mailbox = self._mailbox
        assert mailbox is not None and self._deleted is not None
        self._state = UPDATE
        deleted = marked(self._deleted, self._deleted_count) if self._deleted_count else []
        if not deleted and not mailbox.has_changes():
            return self._end_update(0, False)  # nothing to write
        # unlinks, an fsync, maybe a listing of cur/: in a thread (fastpop.session.update)
        self._busy |= BUSY_UPDATING
        future = self.loop.run_in_executor(update_pool(), apply_update, mailbox, self._deleted, deleted)
        future.add_done_callback(functools.partial(self._updated, len(deleted)))

    def _updated(self, requested: int, future: asyncio.Future) -> None:
        """The update's thread is done: the reply (if the client is still there)."""
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is None:
            failed, deleted = future.result()
        else:  # (what the update could not do is logged by it; this it did not expect)
            log.error("cannot apply the update user=%s: %r", self._user.name if self._user else "?", exc)
            failed, deleted = max(requested, 1), True
        self._busy &= ~BUSY_UPDATING
        self._end_update(failed, deleted)

    def _end_update(self, failed: int, deleted: bool) -> None:
        """The UPDATE state's end: the lock released, the reply, the close."""
        if faults.ACTIVE and deleted:
            faults.hit("update.before_reply")
        self._release_mailbox()
        if self._state == CLOSED:
            return  # the client left while the update's thread worked: it is done all the same
        self._out.append(R.ERR_NOT_ALL_DELETED if failed else (R.OK_LOGOUT_DELETED if deleted else R.OK_LOGOUT))
        self._close("quit")

    def _release_mailbox(self) -> None:
        """At the session's end (QUIT, or the connection lost): the lock
        released and the index unmapped now, not when the session is collected.
        The lock and the mailbox are set together, so this runs once."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if self._mailbox is not None:
                self._mailbox.close()  # (its total_size stays readable for the log line)

    def _log_end(self) -> None:
        user = self._user
        if user is None:
            if self._auth_failures:
                log.info("disconnected rip=%s auth_failures=%d reason=%s", self._peer, self._auth_failures,
                         self._end_reason)
            return
        if not log.isEnabledFor(logging.INFO):
            return
        applied = self._state == UPDATE
        counts = (
            self._top_count,
            self._top_bytes,
            self._retr_count,
            self._retr_bytes,
            self._deleted_count if applied else 0,
            self._deleted_size if applied else 0,
            self._mailbox.total_size if self._mailbox is not None else 0,
            self._end_reason,
        )
        if self._master is not None:  # (its own format: the structured logs read pairs from it)
            logline.info(log, "session user=%s master=%s rip=%s top=%d/%d retr=%d/%d del=%d/%d size=%d end=%s",
                         (user.name, self._master, self._peer, *counts))
            return
        logline.info(log, "session user=%s rip=%s top=%d/%d retr=%d/%d del=%d/%d size=%d end=%s",
                     (user.name, self._peer, *counts))
