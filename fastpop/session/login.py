"""Logging in: USER/PASS, APOP and AUTH, each a fastpop.auth.sasl exchange
(the penalty gate, the failure delay, the attempt cap), then LOGIN-DELAY and
the mailbox opened and locked.

The path every login takes is in the session's core (fastpop.session._core:
USER, PASS, the exchange's driver, a login that succeeds, the mailbox opened
and locked); ``Login`` has the rest, in Python: APOP, AUTH and its
continuation lines, failures, a mailbox opened in a thread.  ``Login`` is a
part of ``POP3Protocol`` (fastpop.session.protocol): it holds no state of its
own; the core's fields do.  Each login's end is reported through the
session's hooks ``_on_logged_in`` and ``_on_login_refused``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastpop.auth import sasl
from fastpop.auth.authenticator import valid_username
from fastpop.auth.userdb import flag, login_refusal
from fastpop.session.state import BUSY_AUTH, BUSY_CLOSING, SessionParts
from fastpop.store import dovecot_uidlist
from fastpop.store.maildir import is_permanent
from fastpop.wire import responses as R

if TYPE_CHECKING:
    from fastpop.store.locking import MailboxLock, TableLock
    from fastpop.store.maildir import Mailbox

log = logging.getLogger("fastpop.session")

# A login finding dovecot-uidlist.lock held tries again after this many seconds,
# doubled each time up to LOCK_RETRY_MAX (a Dovecot sync takes milliseconds; a
# retry costs a listing of the user's cur/).
LOCK_RETRY_FIRST = 0.05
LOCK_RETRY_MAX = 1.0


class Login(SessionParts):
    """The AUTHORIZATION state's rarer login paths (a part of POP3Protocol)."""

    if not TYPE_CHECKING:  # slots at run time (no __dict__ per session); the checker reads the declarations
        __slots__ = ()

    def cmd_apop(self, args: tuple[str, ...]) -> None:
        if not self._timestamp:  # APOP off ([auth] apop): the greeting offered none
            return self._bad(R.ERR_UNKNOWN)
        if len(args) != 2:
            return self._bad(R.ERR_ARGS)
        name, digest = args
        self._user_name = None
        self._auth_mech = "APOP"
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
        self._auth_mech = mechanism.name
        initial = None
        if len(args) == 2:
            initial = sasl.decode_response(args[1].encode("utf-8", "surrogatepass"))
            if initial is None:
                self._auth_started = self.loop.time()
                self._auth_failed(R.ERR_AUTH_BASE64, None, None, False, "initial response not base64")
                return
        self._run_auth(mechanism.start(Services(self), initial))

    # The exchange's driver is the core's (_run_auth, _auth_step); these are its rarer turns.

    def _auth_future_done(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._auth_step(None, asyncio.CancelledError())
        elif future.exception() is not None:
            self._auth_step(None, future.exception())
        else:
            self._auth_step(future.result(), None)

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
        if data.rstrip(b" \t") == b"*":  # (a trailing blank, as decode_response allows)
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

    def _auth_failed(self, reply: bytes, name: str | None, credentials: bytes | None, penalize: bool,
                     reason: str) -> None:
        self._on_login_refused("credentials" if penalize else "malformed")
        self._auth_failures += 1
        valid = name is not None and valid_username(name)
        if penalize and not self._trusted:  # per-user accounting only for names that can exist
            # (a master login's failure counts against the master: sasl.penalty_name)
            sep = master_separator(self._ctx)
            counted = sasl.penalty_name(name, sep) if valid and name is not None else None
            if counted is not None and sep is not None and counted.startswith(sep) \
                    and not self._master_counted(counted[len(sep):]):
                counted = None
            self._ctx.penalty.failed(self._addr_key, counted, credentials)
        # a name from SASL can be anything (16 KiB, newlines): logged as it is only if valid
        shown = name if valid else ("-" if name is None else repr(name[:64]))
        # the address first, before what the client chose (contrib/fail2ban reads it there);
        # a stable interface (docs/operations.md)
        log.info("auth failed rip=%s user=%s mech=%s reason=%s", self._peer, shown, self._auth_mech, reason or "-")
        # Answer every failure at the same moment after the attempt, so
        # timing tells nothing about whether the user exists.
        self._busy |= BUSY_AUTH
        delay = self._auth_started + self._ctx.config.auth_failure_delay - self.loop.time()
        self.loop.call_later(max(0.0, delay), self._login_failed, reply)

    def _restricted(self, outcome: sasl.Outcome) -> bool:
        """The user's own fields (and a master's) forbid this login: it fails
        as a wrong password does (RFC 3206's [AUTH] covers "an attempt to
        authenticate in violation of policy"), and only the log says why.

        A master whose line has ``proxy_master`` is a proxy's (fastpop proxy's
        [backends] master_user), logging in for a user who logged in at the
        proxy: the login is the user's own (LOGIN-DELAY, EXPIRE), and the
        master's allow_nets name the proxies, so they are matched against the
        address the connection comes from, not the client's of its PROXY header."""
        record = outcome.record
        assert record is not None
        reason = login_refusal(record, self._peer)
        master_record = outcome.master_record
        proxy_master = master_record is not None and flag(master_record, "proxy_master")
        if reason is None and master_record is not None:
            peer = self._peer
            if proxy_master:
                peer = self._connection_address()
            reason = login_refusal(master_record, peer)
            reason = reason and f"master: {reason}"
        if reason is None:
            self._master = outcome.master
            self._proxy_master = proxy_master
            return False
        sep = master_separator(self._ctx)
        name = record.name if outcome.master is None or sep is None else f"{record.name}{sep}{outcome.master}"
        self._auth_failed(R.ERR_AUTH_FAILED, name, outcome.credentials, True, reason)
        return True

    def _connection_address(self) -> str:
        """The address the connection comes from (a proxy's, behind a PROXY header)."""
        peername = self.transport.get_extra_info("peername") if self.transport is not None else None
        return peername[0] if peername else "-"

    def _master_counted(self, master: str) -> bool:
        """Whether a failed login naming ``master`` counts against the master's
        name too.  Not for a proxies' master (``proxy_master``) tried from
        outside its allow_nets: from there even its password fails, so the
        count guards nothing, and since every user's login through the proxies
        waits for it, a stranger's guesses would hold them all up (past the
        proxy's connect_timeout: the backend taken for down)."""
        masters = self._ctx.masters
        record = masters.lookup(master) if masters is not None else None
        if record is None or not flag(record, "proxy_master"):
            return True
        return login_refusal(record, self._connection_address()) is None

    def _login_failed(self, reply: bytes = R.ERR_AUTH_FAILED) -> None:
        if self.transport is None or self._busy & BUSY_CLOSING:
            return
        self._out.append(reply)
        if self._auth_failures >= self._ctx.config.auth_max_attempts:
            self._close("too many auth failures")
            return
        self._flush()
        self._unbusy(BUSY_AUTH)

    def _open_in_thread(self, user, lock: MailboxLock | TableLock, path: str, job: Callable[[], Mailbox],
                        deadline: float | None, delay: float = LOCK_RETRY_FIRST) -> None:
        """Open the mailbox with ``job`` in a thread of the login pool (the
        loop's default executor: a few threads every login shares).  ``job``
        never waits there for Dovecot's locks: a live dovecot-uidlist.lock
        (Dovecot numbering messages, or one the user planted) makes it fail at
        once with UidlistLocked, and it is tried again from the event loop,
        holding no thread, until dovecot_uidlist.LOCK_WAIT has passed (then
        that user gets -ERR [SYS/TEMP]), so no user can fill the pool."""
        if deadline is None:
            deadline = self.loop.time() + dovecot_uidlist.LOCK_WAIT
        fut = self.loop.run_in_executor(None, job)
        fut.add_done_callback(functools.partial(self._mailbox_opened, user, lock, path, job, deadline, delay))

    def _retry_open(self, user, lock: MailboxLock | TableLock, path: str, job: Callable[[], Mailbox],
                    deadline: float, delay: float) -> None:
        if self.transport is None or self._busy & BUSY_CLOSING:
            lock.release()  # the client left while Dovecot's lock was held
            return
        self._open_in_thread(user, lock, path, job, deadline, delay)

    def _mailbox_opened(self, user, lock: MailboxLock | TableLock, path: str, job: Callable[[], Mailbox],
                        deadline: float, delay: float, fut: asyncio.Future) -> None:
        if self.transport is None or self._busy & BUSY_CLOSING:
            lock.release()  # the client left meanwhile
            if not fut.cancelled() and fut.exception() is None:
                fut.result().close()  # its index unmapped now
            return
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if isinstance(exc, dovecot_uidlist.UidlistLocked) and self.loop.time() + delay < deadline:
            self.loop.call_later(delay, self._retry_open, user, lock, path, job, deadline,
                                 min(delay * 2, LOCK_RETRY_MAX))
            return
        if exc is not None:
            lock.release()
            log.error("cannot open mailbox user=%s path=%s: %s", user.name, path, exc)
            return self._finish_login(R.ERR_MAILBOX_PERM if is_permanent(exc) else R.ERR_MAILBOX_TEMP, "mailbox")
        self._enter_transaction(user, lock, fut.result())


def master_separator(ctx: Any) -> str | None:
    """The master users' separator, or None when there are none."""
    return ctx.config.auth_master_separator if ctx.masters is not None else None


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

    @property
    def master_separator(self) -> str | None:
        return master_separator(self._session._ctx)

    def verify_password(self, name: str, password: str):
        """The user record (None: wrong), or a Pending when the check runs
        elsewhere (a slow hash in a thread, a user database on a task)."""
        session = self._session
        auth = session._ctx.auth
        if auth.is_async:  # SQL, LDAP: through the auth cache, on a task
            return sasl.Pending(session.loop.create_task(auth.verify_password_async(name, password, session._peer)))
        return self._verify(auth, name, password)

    def verify_master(self, name: str, password: str):
        """A master user's record from the masters' passwd-file (None: wrong), or a Pending."""
        masters = self._session._ctx.masters
        if masters is None:  # pragma: no cover - sasl asks only when master users are on
            return None
        return self._verify(masters, name, password)

    def _verify(self, auth, name: str, password: str):
        """A synchronous database's check: at once, or a Pending on a thread's hash."""
        session = self._session
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
        return self._derived(session._ctx.auth.scram_keys(record, session._ctx.secret))

    def _derived(self, keys):
        """Keys, or a derivation (a callable: PBKDF2) run in the login threads."""
        if callable(keys):
            return sasl.Pending(self._session.loop.run_in_executor(None, keys))
        return keys

    def refusal(self, record) -> str | None:
        """What _restricted and _auth_finished refuse after a login (fastpop deny,
        the user's own fields), for the exchanges that would otherwise tell
        the client its credentials were right first (SCRAM's server-final,
        OAuth's missing error challenge)."""
        session = self._session
        denied = session._ctx.denied
        if denied and record.name in denied:
            return "denied"
        return login_refusal(record, session._peer)

    def fake_scram_keys(self, name: str):
        session = self._session  # (a derivation's cost where most users' keys are derived)
        return self._derived(session._ctx.auth.fake_scram_keys(name, session._ctx.secret))

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
