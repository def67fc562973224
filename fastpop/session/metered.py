"""The counting session: ``POP3Protocol`` (or a subclass) with metrics on.

With ``[metrics] listen`` set the server's sessions are ``MeteredProtocol``:
the same session, dispatching through copies of the command tables whose
entries count the command and time it (``time.perf_counter`` deltas into
fixed buckets found with ``bisect``), and a few overridden hooks that count
connections, logins, failures and bytes.  All of that goes into plain ints
and lists on a ``Counters`` object, one per process; fastpop.serve.metrics moves
them into prometheus-client about once a second.  Without metrics the server
uses the plain ``POP3Protocol`` and never imports this module.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastpop.session.protocol import POP3Protocol
from fastpop.session.state import (
    BUSY_AUTH,
    BUSY_COUNTING,
    BUSY_FORMATTING,
    BUSY_LISTING,
    BUSY_SCANNING,
    BUSY_SENDING,
    BUSY_TLS,
    BUSY_UPDATING,
    CLOSED,
)
from fastpop.wire.commands import NUM_CODES, Command

# Upper bounds (seconds) of the latency buckets; a last bucket takes the rest.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NBUCKETS = len(BUCKETS) + 1
FIRST_BUCKET = BUCKETS[0]  # most commands are answered within it: no bisect for them

COMMAND_NAMES = tuple(Command(code).name for code in range(NUM_CODES))

# A command still "runs" while one of these is set: the reply is not complete.
_WAITING = (BUSY_AUTH | BUSY_COUNTING | BUSY_FORMATTING | BUSY_LISTING | BUSY_SCANNING | BUSY_SENDING | BUSY_TLS
            | BUSY_UPDATING)

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

if TYPE_CHECKING:

    class _Session(POP3Protocol):
        """What the table entries see: a session of a ``metered_class`` (made at run time)."""

        _metrics: Counters
        _command: int
        _command_start: float
        _mechanism: str


def _metered(code: int, handler: Callable) -> Callable:
    """The table entry for one command: count it, time it (a perf_counter
    delta into a bucket found with bisect), and remember a login's mechanism."""
    clock = time.perf_counter
    buckets = BUCKETS
    first = FIRST_BUCKET
    mechanism = {Command.PASS: "USER", Command.APOP: "APOP"}.get(Command(code))

    def metered(self: _Session, args: tuple[str, ...]) -> None:
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
        def metered_auth(self: _Session, args: tuple[str, ...]) -> None:
            if args:
                name = args[0].upper()  # only offered mechanisms become label values
                self._mechanism = name if name in self._ctx.mechanisms else "-"
            metered(self, args)

        return metered_auth
    if mechanism is not None:
        def metered_login(self: _Session, args: tuple[str, ...]) -> None:
            self._mechanism = mechanism
            metered(self, args)

        return metered_login
    return metered


def _metered_table(table: tuple[Callable, ...]) -> tuple[Callable, ...]:
    return tuple(_metered(code, handler) for code, handler in enumerate(table))


_METERED_AUTHORIZATION = _metered_table(POP3Protocol._authorization_table)
_METERED_TRANSACTION = _metered_table(POP3Protocol._transaction_table)


def metered_class(base: type) -> type:
    """``base`` (POP3Protocol or a subclass: the PROXY listeners' sessions)
    counting into ``ctx.metrics``; ``metered(base)`` caches them."""

    class Metered(base):
        """The POP3 session, counting into ``ctx.metrics`` (a ``Counters``)."""

        __slots__ = ("_metrics", "_command", "_command_start", "_mechanism")

        # Commands counted and timed by the tables' entries (_metered).
        _authorization_table = _METERED_AUTHORIZATION
        _transaction_table = _METERED_TRANSACTION

        # No __init__ of its own (a call less per connection): the fields are set
        # in connection_made, before any of them is read.

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._metrics = counters = self._ctx.metrics
            self._command = -1  # the code of a command whose reply is not complete yet
            self._mechanism = "-"
            counters.connections += 1
            counters.open += 1
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
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

        def _on_logged_in(self) -> None:
            counters = self._metrics
            counters.logins[self._mechanism] = counters.logins.get(self._mechanism, 0) + 1
            counters.logged_in += 1

        def _on_login_refused(self, kind: str) -> None:
            key = (self._mechanism, kind)
            failures = self._metrics.failures
            failures[key] = failures.get(key, 0) + 1

    Metered.__name__ = Metered.__qualname__ = f"Metered{base.__name__}"
    return Metered


MeteredProtocol = metered_class(POP3Protocol)
_metered_classes: dict[type, type] = {POP3Protocol: MeteredProtocol}


def metered(base: type) -> type:
    cls = _metered_classes.get(base)
    if cls is None:
        cls = _metered_classes[base] = metered_class(base)
    return cls
