"""The POP3 session: one asyncio.Protocol per connection (RFC 1939, RFC 2449).

Input is framed by the command parser; the command pull takes complete
commands one at a time and dispatches them through a per-state table, so a
command that must wait (a password check in a thread, a message streaming
out under flow control) simply stops the pull: pipelined commands stay
buffered in the parser and are answered in order afterwards.  Replies to a
burst of pipelined commands are gathered and written with one call.

The state, the pull, the replies and the common commands are
``SessionCore`` (fastpop.session._core, compiled, or its pure-Python twin
fastpop.session._core_py: fastpop._compiled chooses); ``POP3Protocol`` adds
the parts in Python and the dispatch tables.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastpop import _compiled
from fastpop.session.login import Login
from fastpop.session.retrieval import Retrieval
from fastpop.session.state import BUSY_CLOSING, BUSY_TLS, CLOSED, FLUSH_BYTES, FLUSH_REPLIES
from fastpop.session.tls import bound_tls_buffers
from fastpop.wire import responses as R
from fastpop.wire.commands import NUM_CODES, Command

if TYPE_CHECKING:
    from fastpop.session._core_py import SessionCore
else:
    _core = _compiled.load("fastpop.session._core")
    SessionCore = _core.SessionCore

__all__ = ["FLUSH_BYTES", "FLUSH_REPLIES", "POP3Protocol"]

log = logging.getLogger("fastpop.session")


class POP3Protocol(SessionCore, Login, Retrieval, asyncio.Protocol):
    """One POP3 connection.  ``SessionCore`` holds its state and common
    paths (small RETR/TOP too); login's rarer paths (fastpop.session.login),
    the rest of RETR/TOP (fastpop.session.retrieval) and STLS are parts of
    it in Python.

    Extension points, for subclasses (fastpop.session.metered counts with
    them; fastpop.session.proxied starts the session after a PROXY header;
    fastpop.proxy.relay relays it to a backend after the login);
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
    - ``_auth_finished(outcome)``: a login exchange ended with its
      ``fastpop.auth.sasl.Outcome`` (fastpop.proxy.relay relays a successful
      one to a backend instead of opening a Maildir);
    - ``start_session()``: greet the client once its address is known;
    - asyncio's ``connection_made`` and ``connection_lost``.

    The core calls each hook through the instance, so an override in Python
    takes effect with the compiled core too.
    """

    __slots__ = ()  # the fields are SessionCore's

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
        bound_tls_buffers(transport)
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
_AUTHORIZATION: dict[Command, Callable] = {
    Command.USER: P.cmd_user,
    Command.PASS: P.cmd_pass,
    Command.APOP: P.cmd_apop,
    Command.QUIT: P.cmd_quit_authorization,
    Command.CAPA: P.cmd_capa,
    Command.AUTH: P.cmd_auth,
    Command.STLS: P.cmd_stls,
    Command.UTF8: P.cmd_utf8,
    Command.LAST: P.cmd_last,  # unknown unless [pop3] last is on, then not valid before login
}
_TRANSACTION: dict[Command, Callable] = {
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
    Command.LAST: P.cmd_last,
}
_IMPLEMENTED = set(_AUTHORIZATION) | set(_TRANSACTION)
_AUTHORIZATION_TABLE = _table(_AUTHORIZATION)
_TRANSACTION_TABLE = _table(_TRANSACTION)
del P
POP3Protocol._authorization_table = _AUTHORIZATION_TABLE
POP3Protocol._transaction_table = _TRANSACTION_TABLE
