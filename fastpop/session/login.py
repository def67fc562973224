"""Logging in: USER/PASS, APOP and AUTH, each a fastpop.auth.sasl exchange
driven here (the penalty gate, the failure delay, the attempt cap), then
LOGIN-DELAY and the mailbox opened and locked.

``Login`` is a part of ``POP3Protocol`` (fastpop.session.protocol): it holds
no state of its own; the session's slots do.  It reports each login's end
through the session's hooks ``_on_logged_in`` and ``_on_login_refused``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastpop.auth import sasl
from fastpop.auth.authenticator import valid_username
from fastpop.errors import AuthUnavailable
from fastpop.session.state import BUSY_AUTH, BUSY_CLOSING, TRANSACTION, SessionParts
from fastpop.store.locking import MailboxLock, MailboxLocked, TableLock
from fastpop.store.maildir import Mailbox, ensure_maildir, is_permanent
from fastpop.store.safefs import served_uid
from fastpop.wire import responses as R

log = logging.getLogger("fastpop.session")


class Login(SessionParts):
    """The AUTHORIZATION state's login commands (a part of POP3Protocol)."""

    if not TYPE_CHECKING:  # slots at run time (no __dict__ per session); the checker reads the declarations
        __slots__ = ()

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
        self._run_auth(sasl.password_login(Services(self), name, args[0]))

    def cmd_apop(self, args: tuple[str, ...]) -> None:
        if not self._timestamp:  # APOP off ([auth] apop): the greeting offered none
            return self._bad(R.ERR_UNKNOWN)
        if len(args) != 2:
            return self._bad(R.ERR_ARGS)
        name, digest = args
        self._user_name = None
        self._run_auth(sasl.apop_login(Services(self), name, digest))

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
        self._run_auth(mechanism.start(Services(self), initial))

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
                self._on_login_refused("unavailable")
                self._auth_resume()
                return
            value = exc = None
            if type(step) is sasl.Challenge:
                self._auth_failure = step.failed
                self._out.append(sasl.encode_challenge(step.data))
                self._auth_wants_line = True
                self._auth_resume()  # the pull reads the answer
                return
            if type(step) is sasl.Gate:
                # Credentials are about to be checked: the failure penalty
                # waits here, on a timer, before anything is looked at.
                delay = 0.0 if self._trusted else self._ctx.penalty.delay(self._addr_key, step.user)
                self._auth_started = self.loop.time() + delay
                if delay > 0:
                    self.loop.call_later(delay, self._auth_step, None, None)
                    return
                continue
            if type(step) is sasl.Hold:
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
        self._on_login_refused("credentials" if penalize else "malformed")
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
        delay = login_delay(user, ctx.config.login_delay)
        if ctx.last_logins.too_soon(user.name, delay):
            log.info("login refused user=%s rip=%s: LOGIN-DELAY %d", user.name, self._peer, delay)
            self._on_login_refused("login_delay")
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
            return self._finish_login(R.ERR_MAILBOX_PERM if is_permanent(exc) else R.ERR_MAILBOX_TEMP, "mailbox")
        self._enter_transaction(user, lock, fut.result())

    def _enter_transaction(self, user, lock: MailboxLock | TableLock, mailbox: Mailbox) -> None:
        self._user = user
        self._lock = lock
        self._mailbox = mailbox
        self._deleted = bytearray(len(mailbox))
        self._state = TRANSACTION
        self._table = self._transaction_table
        config = self._ctx.config
        if config.timeout_transaction < config.timeout_authorization:
            self._rearm_timer()  # else the running timer, firing early, re-arms itself (_on_timer)
        log.debug("login user=%s rip=%s messages=%d", user.name, self._peer, len(mailbox))
        self._finish_login(R.OK_LOGGED_IN)

    def _finish_login(self, reply: bytes, refused: str = "") -> None:
        """Answer the login: ``refused`` names why it was (a metrics label), or it succeeded."""
        if refused:
            self._on_login_refused(refused)
        else:  # LOGIN-DELAY counts from here
            user = self._user
            assert user is not None, "a login succeeds in _enter_transaction, which sets it"
            self._ctx.last_logins.record(user.name, login_delay(user, self._ctx.config.login_delay))
            self._on_logged_in()
        self._out.append(reply)
        self._flush()
        self._unbusy(BUSY_AUTH)


class Services:
    """What fastpop.auth.sasl's exchanges may ask of the server, for one session."""

    __slots__ = ("_session",)

    def __init__(self, session: Any) -> None:
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


def login_delay(user, default: int) -> int:
    """LOGIN-DELAY seconds for a user: the login_delay extra field, else the default."""
    value = user.extra.get("login_delay") if user.extra else None
    if value is not None and value.isdigit():
        return int(value)
    return default
