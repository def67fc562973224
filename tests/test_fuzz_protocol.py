"""Fuzzing the POP3 session: random command sequences against a real fastpop.

A hypothesis ``RuleBasedStateMachine`` drives one fastpop (once per parser)
over TCP with random batches of commands, pipelined in one write: USER,
PASS, STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP, CAPA, QUIT with good
and bad arguments, random keyword case, unknown keywords, control
characters, non-ASCII and over-long lines; and it hangs up at random.
Every reply is checked, byte for byte, against a model of the session and
of the mailbox (RFC 1939 sizes, dot-stuffing, TOP's cut, the error table
of ``fastpop.wire.responses``); after QUIT the files left on disk must be
exactly the model's undeleted messages, and after any other end nothing
may be deleted.  ``FASTPOP_FUZZ_EXAMPLES`` (default 50) sets the number of
random sessions per parser; for a long run::

    FASTPOP_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_protocol.py
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fastpop.auth.authenticator import valid_username
from fastpop.wire import responses as R

MAX_BAD = 20  # config.max_bad_commands
MAX_AUTH_FAILURES = 3  # config.auth_max_attempts
KNOWN = {"USER", "PASS", "APOP", "QUIT", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL",
         "CAPA", "AUTH", "STLS", "UTF8"}
UNMODELLED = (b"APOP", b"AUTH", b"STLS", b"UTF8")  # login exchanges and TLS: tested elsewhere
MESSAGE_POOL_LINES = [b"", b".", b"..", b".x", b"...", b"From: a@example.com", b"Subject: s",
                      b"body", b"a\rb", b" ", b"x" * 200, b"\t.tab", b"\xff\xfe bin"]

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------- the message model

@st.composite
def messages(draw) -> bytes:
    """A stored message: any mix of the lines that matter to the transform
    (dot lines, empty lines, bare CR, binary), CRLF or LF, with or without a
    final newline; sometimes empty."""
    lines = draw(st.lists(st.sampled_from(MESSAGE_POOL_LINES), max_size=12))
    if draw(st.booleans()):
        lines = [b"From: a@example.com", b"Subject: fuzz", b""] + lines
    ends = draw(st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=len(lines), max_size=len(lines)))
    out = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    if out and draw(st.booleans()):
        out = out[:-1] if out.endswith(b"\n") and not out.endswith(b"\r\n") else out  # no final newline
        out = out.rstrip(b"\r\n") if draw(st.booleans()) else out
    return out


def on_the_wire(data: bytes) -> bytes:
    """RFC 1939 content of a message before stuffing: LF -> CRLF (a bare CR
    stays), a final CRLF added if missing; what LIST counts."""
    if not data:
        return b""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\n") else out + b"\r\n"


def stuffed(wire: bytes) -> bytes:
    return b"".join(b"." + line if line.startswith(b".") else line for line in wire.splitlines(keepends=True)) \
        if wire else b""


def top_of(wire: bytes, n: int) -> bytes:
    """Header, the empty line, and n body lines."""
    if not wire:
        return b""
    lines = wire[:-2].split(b"\r\n")
    try:
        blank = lines.index(b"")
    except ValueError:
        return wire
    kept = lines[: blank + 1 + n]
    return b"".join(line + b"\r\n" for line in kept)


# ----------------------------------------------------------------- commands and expected replies

NUMBERS = st.one_of(
    st.integers(min_value=1, max_value=4).map(str),
    st.integers(min_value=1, max_value=4).map(str),
    st.integers(min_value=-1, max_value=9).map(str),
    st.sampled_from(["abc", "1x", "0", "+1", "01", "99999999999", "4294967297", "\u0661"]),
)


def keyword(name: str):
    """The keyword in random case (keywords are case-insensitive)."""
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda ups: "".join(c.upper() if u else c.lower() for c, u in zip(name, ups, strict=True)))


def command(name: str, *args) -> st.SearchStrategy:
    return st.tuples(keyword(name), st.tuples(*args) if args else st.just(()),
                     st.sampled_from([" ", " ", "  "])).map(lambda t: ("cmd", name, t[0], t[1], t[2]))


GARBAGE = st.one_of(
    st.sampled_from([b"XYZZ", b"HELO there", b"", b" ", b"STATX", b"ST", b"\x00", b"NOOP\x01", b"RETR \x7f",
                     b"\xc3\xa9t\xc3\xa9", b"USER \xff", b"LIST 1\r2"]),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.integers(min_value=254, max_value=600).map(lambda n: b"X" * n),  # around the 255-octet limit
).map(lambda raw: ("raw", raw))


BATCH = st.lists(st.one_of(
    command("USER", st.sampled_from(["<me>", "<me>", "nosuchuser", "../x", ".hidden"])),
    command("USER"),
    command("USER", st.just("a"), st.just("b")),
    command("PASS", st.sampled_from(["<pw>", "<pw>", "wrong", "se cret"])),
    command("PASS"),
    command("STAT"), command("STAT", st.just("1")),
    command("LIST"), command("LIST", NUMBERS), command("LIST", NUMBERS, NUMBERS),
    command("UIDL"), command("UIDL", NUMBERS),
    command("RETR", NUMBERS), command("RETR"),
    command("TOP", NUMBERS, st.sampled_from(["0", "1", "2", "5", "100", "x", "-1", "99999999999999"])),
    command("TOP", NUMBERS),
    command("DELE", NUMBERS), command("DELE"),
    command("RSET"), command("NOOP"), command("NOOP", st.just("x")), command("CAPA"),
    command("QUIT"),
    GARBAGE,
    ), min_size=1, max_size=6)


class POP3Machine(RuleBasedStateMachine):
    """One mailbox, one connection at a time.  Subclassed per test with the
    ``server`` (support.server.ServerProcess) to drive."""

    server = None  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.user = None
        self.conn: socket.socket | None = None
        self.buf = bytearray()
        self.present: list[tuple[str, bytes]] = []  # (UIDL, stored content), in mailbox order
        self.reset_session()

    def reset_session(self) -> None:
        self.state = "closed"
        self.user_name: str | None = None  # USER accepted
        self.deleted: set[int] = set()  # 0-based, this session
        self.bad = 0
        self.auth_failures = 0
        self.logged_in = False

    # -- the mailbox
    @initialize(contents=st.lists(messages(), min_size=1, max_size=6),
                large=st.sampled_from([None, None, (b"\r\n", 12000), (b"\n", 12000), (b"\r\n", 8000)]))
    def make_mailbox(self, contents, large):
        if large:
            # 12,000 lines: past SMALL_MESSAGE, the sendfile (CRLF) and streamed
            # (LF) paths; 8,000: a single write, and three RETRs of it in one
            # batch pass the protocol's flush threshold
            end, lines = large
            body = b"".join(b"%s line %d%s" % (b"." if i % 7 == 0 else b"", i, end) for i in range(lines))
            contents = contents + [b"Subject: big\r\n\r\n" + body]
        self.user = self.server.add_user([])
        for data in contents:
            path = self.user.deliver(data)
            self.present.append((path.name, data))
        self.sessions_seen = self._sessions_logged()

    def _sessions_logged(self) -> int:
        return len(re.findall(rf"session user={re.escape(self.user.name)} rip", self.server.log()))

    # -- the connection
    def _connect(self) -> None:
        self.conn = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        self.buf.clear()
        greeting = self._line()
        assert greeting.startswith(b"+OK fastpop ready."), greeting
        self.reset_session()
        self.state = "authorization"

    def _ended(self) -> None:
        """The connection is gone; wait until the server has let go of the
        mailbox (its session line is logged when it has) before the next."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.logged_in:
            deadline = time.monotonic() + 10
            while self._sessions_logged() <= self.sessions_seen:
                assert time.monotonic() < deadline, "session end never logged\n" + self.server.log()[-3000:]
                time.sleep(0.005)
            self.sessions_seen += 1
        self.reset_session()

    def _fill(self) -> bool:
        try:
            chunk = self.conn.recv(1 << 20)
        except ConnectionResetError:  # closed with commands still unread: RST, not FIN
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 2]
                return out
            if not self._fill():
                raise EOFError(bytes(self.buf))

    def _body(self) -> bytes:
        if self.buf[:3] == b".\r\n":
            del self.buf[:3]
            return b""
        start = 0
        while True:
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 5]
                return out
            start = max(0, len(self.buf) - 4)
            if not self._fill():
                raise EOFError(bytes(self.buf[:200]))
            if self.buf[:3] == b".\r\n":
                del self.buf[:3]
                return b""

    def _eof(self) -> None:
        rest = bytes(self.buf)
        while self._fill():
            rest = bytes(self.buf)
        assert rest == b"", f"data after the server should have closed: {rest[:200]!r}"

    # -- the model: what the server must answer to one command
    def _bad(self, reply: bytes) -> list:
        self.bad += 1
        if self.bad >= MAX_BAD:
            self.state = "closing"
            return [reply, R.ERR_TOO_MANY_BAD, "eof"]
        return [reply]

    def _live(self) -> list[int]:
        return [i for i in range(len(self.present)) if i not in self.deleted]

    def _index(self, arg: str):
        if not (arg.isascii() and arg.isdigit()) or len(arg) > 10:
            return R.ERR_BAD_NUMBER
        n = int(arg)
        if n < 1 or n > len(self.present):
            return R.ERR_NO_MESSAGE
        if n - 1 in self.deleted:
            return R.ERR_MESSAGE_DELETED
        return n - 1

    def _size(self, i: int) -> int:
        return len(on_the_wire(self.present[i][1]))

    def expect(self, raw: bytes) -> list:
        """Expected replies to one command line (without its CRLF), as the
        server must parse it: bytes (a line), ("multi", status or None for
        any +OK, body or None for any), or "eof"."""
        if len(raw) + 2 > 255:
            return self._bad(R.ERR_TOO_LONG)
        if re.search(rb"[\x00-\x1f\x7f-\xff]", raw):
            return self._bad(R.ERR_INVALID_CHARS)
        kw, sp, rest = raw.partition(b" ")
        name = kw.upper().decode()
        if name not in KNOWN:
            return self._bad(R.ERR_UNKNOWN)
        if name == "PASS":
            args = [rest.decode()] if rest else []
        else:
            args = [a.decode() for a in rest.split(b" ") if a]
        if self.state == "authorization":
            return self._expect_authorization(name, args)
        return self._expect_transaction(name, args)

    def _expect_authorization(self, name: str, args: list) -> list:
        if name == "USER":
            if len(args) != 1:
                return self._bad(R.ERR_ARGS)
            if not valid_username(args[0]):
                self.user_name = None
                return self._bad(R.ERR_AUTH_INVALID_USER)
            self.user_name = args[0]
            return [R.OK_USER]
        if name == "PASS":
            if self.user_name is None:
                return self._bad(R.ERR_NO_USER)
            if len(args) != 1:
                return self._bad(R.ERR_ARGS)
            user, self.user_name = self.user_name, None
            if user == self.user.name and args[0] == self.user.password:
                self.state = "transaction"
                self.logged_in = True
                self.deleted = set()
                return [R.OK_LOGGED_IN]
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.state = "closing"
                return [R.ERR_AUTH_FAILED, "eof"]
            return [R.ERR_AUTH_FAILED]
        if name == "QUIT":
            self.state = "closing"
            return [R.OK_LOGOUT, "eof"]
        if name == "CAPA":
            return self._bad(R.ERR_ARGS) if args else [("multi", None, None)]
        return self._bad(R.ERR_WRONG_STATE)

    def _expect_transaction(self, name: str, args: list) -> list:
        if name in ("USER", "PASS", "APOP", "AUTH", "STLS", "UTF8"):
            return self._bad(R.ERR_WRONG_STATE)
        if name in ("STAT", "NOOP", "RSET", "CAPA") and args:
            return self._bad(R.ERR_ARGS)
        if name == "STAT":
            live = self._live()
            return [b"+OK %d %d\r\n" % (len(live), sum(self._size(i) for i in live))]
        if name == "NOOP":
            return [R.OK_NOOP]
        if name == "CAPA":
            return [("multi", None, None)]
        if name == "RSET":
            self.deleted = set()
            total = sum(self._size(i) for i in range(len(self.present)))
            return [b"+OK %d messages (%d octets)\r\n" % (len(self.present), total)]
        if name in ("LIST", "UIDL"):
            if len(args) > 1:
                return self._bad(R.ERR_ARGS)
            value = (lambda i: str(self._size(i))) if name == "LIST" else (lambda i: self.present[i][0])
            if args:
                i = self._index(args[0])
                if isinstance(i, bytes):
                    return [i]
                return [b"+OK %d %s\r\n" % (i + 1, value(i).encode())]
            live = self._live()
            lines = b"".join(b"%d %s\r\n" % (i + 1, value(i).encode()) for i in live)
            status = R.OK if name == "UIDL" else b"+OK %d messages (%d octets)\r\n" % (
                len(live), sum(self._size(i) for i in live))
            return [("multi", status, lines)]
        if name == "DELE":
            if len(args) != 1:
                return self._bad(R.ERR_ARGS)
            i = self._index(args[0])
            if isinstance(i, bytes):
                return [i]
            self.deleted.add(i)
            return [R.OK_DELETED]
        if name == "RETR":
            if len(args) != 1:
                return self._bad(R.ERR_ARGS)
            i = self._index(args[0])
            if isinstance(i, bytes):
                return [i]
            wire = on_the_wire(self.present[i][1])
            return [("multi", b"+OK %d octets\r\n" % len(wire), stuffed(wire))]
        if name == "TOP":
            if len(args) != 2:
                return self._bad(R.ERR_ARGS)
            i = self._index(args[0])
            if isinstance(i, bytes):
                return [i]
            if not (args[1].isascii() and args[1].isdigit()):
                return [R.ERR_BAD_LINES]
            return [("multi", R.OK_TOP, stuffed(top_of(on_the_wire(self.present[i][1]), int(args[1]))))]
        if name == "QUIT":
            self.state = "closing"
            gone = sorted(self.deleted)
            self.present = [m for i, m in enumerate(self.present) if i not in self.deleted]
            self.deleted = set()
            return [R.OK_LOGOUT_DELETED if gone else R.OK_LOGOUT, "eof"]
        raise AssertionError(name)

    # -- the rules
    @rule(batch=BATCH)
    def send_batch(self, batch):
        """Send the commands in one write (pipelining), then check every reply."""
        self._run(self._lines(batch))

    @precondition(lambda self: self.state in ("closed", "authorization"))
    @rule(then=st.one_of(st.just([]), BATCH))
    def login(self, then):
        """USER and PASS right, then (in the same write) more commands."""
        self._run([b"USER " + self.user.name.encode(), b"PASS " + self.user.password.encode()] + self._lines(then))

    def _lines(self, batch) -> list[bytes]:
        lines = []
        for item in batch:
            if item[0] == "raw":
                lines.append(item[1])
                continue
            _, name, kw, args, sep = item
            args = tuple(self.user.name if a == "<me>" else self.user.password if a == "<pw>" else a for a in args)
            lines.append((kw + "".join(sep + a for a in args)).encode())
        return lines

    def _run(self, lines: list[bytes]) -> None:
        if any(line[:4].upper() in UNMODELLED for line in lines):
            return
        if self.conn is None:
            self._connect()
        # Replies are modelled command by command; commands after the one that
        # ends the session are never answered.
        expected: list = []
        for line in lines:
            if self.state == "closing":
                break
            expected.extend(self.expect(line))
        self.conn.sendall(b"".join(line + b"\r\n" for line in lines))
        for want in expected:
            if want == "eof":
                self._eof()
                self._ended()
                return
            if isinstance(want, bytes):
                line = self._line()
                assert line == want, (lines, line, want)
                continue
            _, status, body = want
            line = self._line()
            if status is None:
                assert line.startswith(b"+OK"), (lines, line)
            else:
                assert line == status, (lines, line, status)
            got = self._body()
            if body is not None:
                assert got == body, (lines, got[:300], body[:300])

    @rule()
    def hang_up(self):
        """The client goes away without QUIT: nothing may be deleted."""
        if self.conn is not None:
            self.deleted = set()
            self._ended()

    @invariant()
    def disk_matches_model(self):
        """Outside a session (and during one: deletions wait for QUIT) the
        files on disk are the model's messages."""
        if self.user is None:
            return
        assert self.user.contents() == sorted(data for _, data in self.present)

    def teardown(self):
        if self.conn is not None:
            self._ended()


EXAMPLES = int(os.environ.get("FASTPOP_FUZZ_EXAMPLES", "50"))  # longer: FASTPOP_FUZZ_EXAMPLES=2000


@pytest.mark.timeout(max(300, EXAMPLES * 6))
def test_protocol_state_machine(server):
    class Machine(POP3Machine):
        pass

    Machine.server = server
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    ))
