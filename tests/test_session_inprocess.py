"""The session in this process, without sockets (tests/support/inprocess.py):
a real POP3Protocol and MeteredProtocol, a real ServerContext, passwd-file
and Maildir store, on a new asyncio or uvloop event loop per test; only the
transport is a stand-in, so flow control and a peer that stops reading are
played exactly.  Pipelining, the busy flags, the flush bounds, the SASL
exchanges and the login path's outcomes, each in milliseconds."""

from __future__ import annotations

import base64
import math
import time

import pytest
from scramp import ScramClient
from support.inprocess import HIGH_WATER, Harness

from fastpop import __version__
from fastpop.auth.sasl import SCRAM_FIRST_FLOOR
from fastpop.session.protocol import FLUSH_BYTES, FLUSH_REPLIES
from fastpop.session.sending import SMALL_MESSAGE
from fastpop.session.state import (
    AUTHORIZATION,
    BUSY_AUTH,
    BUSY_SENDING,
    BUSY_WRITE_PAUSED,
    CLOSED,
    TRANSACTION,
)
from fastpop.store.maildir_names import uidl_of
from fastpop.wire import responses as R
from fastpop.wire.stuffing import CHUNK

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]

LOOPS = ["asyncio", "uvloop"]
UNTRUSTED = "192.0.2.7"  # not in the default trusted networks: no plaintext logins without TLS
CAPA_TAIL = b"RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nEXPIRE NEVER\r\nLOGIN-DELAY %d\r\n"
IMPLEMENTATION = b"IMPLEMENTATION fastpop-" + __version__.encode() + b"\r\n.\r\n"


@pytest.fixture(params=LOOPS)
def make(request, tmp_path):
    """``make(**config)``: a Harness on this test's loop kind; each is closed after
    the test (failing it if the loop reported an exception or fastpop logged an error)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    made: list[Harness] = []

    def make_harness(**config) -> Harness:
        h = Harness(tmp_path / f"server{len(made)}", loop=request.param, **config)
        made.append(h)
        return h

    yield make_harness
    for h in made:
        h.close()


@pytest.fixture
def h(make) -> Harness:
    return make()


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return b"From: a@example.com\r\nSubject: " + subject.encode() + b"\r\n\r\n" + body


def big_message(size: int) -> bytes:
    """A CRLF message of about ``size`` octets; every 500th line starts with a dot."""
    lines = [b"." + b"d" * 69 + b"\r\n" if i % 500 == 499 else b"x" * 70 + b"\r\n" for i in range(size // 72 + 1)]
    return message("big", b"".join(lines))


def stuffed(data: bytes) -> bytes:
    """RFC 1939 byte-stuffing of a CRLF message that does not start with a dot."""
    assert not data.startswith(b".")
    return data.replace(b"\r\n.", b"\r\n..")


def retr_reply(data: bytes) -> bytes:
    return b"+OK %d octets\r\n" % len(data) + stuffed(data) + R.END


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def unb64(line: bytes) -> str:
    assert line.startswith(b"+ ") and line.endswith(b"\r\n"), line
    return base64.b64decode(line[2:-2]).decode()


def capa_authorization(login_delay: int = 0, trusted: bool = True) -> bytes:
    users = b"USER\r\nSASL PLAIN LOGIN SCRAM-SHA-256\r\n" if trusted else b"SASL SCRAM-SHA-256\r\n"
    return R.OK_CAPA + b"TOP\r\nUIDL\r\n" + users + CAPA_TAIL % login_delay + b"UTF8\r\n" + IMPLEMENTATION


def capa_transaction(login_delay: int = 0) -> bytes:
    return R.OK_CAPA + b"TOP\r\nUIDL\r\n" + CAPA_TAIL % login_delay + IMPLEMENTATION


# ----------------------------------------------------------------- pipelining


def test_pipelined_burst_is_answered_in_order_in_one_write(h):
    one, two = message("one"), message("two", b".leading dot\r\nend\r\n")
    user = h.add_user(messages=[one, two])
    s = h.connect()
    assert s.greeting == b"+OK fastpop ready.\r\n"
    s.login(user)
    t = s.transport
    uidls = [uidl_of(p.name) for p in user.files()]
    writes, reads = len(t.writes), t.data_received_calls
    s.send(b"STAT\r\nLIST\r\nUIDL\r\nLIST 2\r\nTOP 1 0\r\nRETR 2\r\nDELE 1\r\nSTAT\r\nRETR 1\r\nRSET\r\nNOOP\r\n")
    total = len(one) + len(two)
    s.expect(
        b"+OK 2 %d\r\n" % total
        + b"+OK 2 messages (%d octets)\r\n1 %d\r\n2 %d\r\n.\r\n" % (total, len(one), len(two))
        + b"+OK\r\n1 %s\r\n2 %s\r\n.\r\n" % (uidls[0].encode(), uidls[1].encode())
        + b"+OK 2 %d\r\n" % len(two)
        + R.OK_TOP + b"From: a@example.com\r\nSubject: one\r\n\r\n" + R.END
        + b"+OK %d octets\r\nFrom: a@example.com\r\nSubject: two\r\n\r\n..leading dot\r\nend\r\n.\r\n" % len(two)
        + R.OK_DELETED
        + b"+OK 1 %d\r\n" % len(two)
        + R.ERR_MESSAGE_DELETED
        + b"+OK 2 messages (%d octets)\r\n" % total
        + R.OK_NOOP
    )
    assert s.output() == b""
    assert (t.data_received_calls - reads, len(t.writes) - writes) == (1, 1)  # one read in, one write out


def test_command_split_across_reads_waits_for_its_line_end(h):
    user = h.add_user(messages=[message("one")])
    s = h.connect()
    for byte in f"USER {user.name}\r\n".encode():  # one octet per data_received
        s.send(bytes([byte]))
    s.expect(R.OK_USER)
    s.send(f"PASS {user.password}\r\nST".encode())
    s.expect(R.OK_LOGGED_IN)
    s.send(b"A")
    s.h.turns(5)
    assert s.output() == b""
    s.send(b"T\r\nNO")
    s.expect(b"+OK 1 %d\r\n" % len(message("one")))
    s.send(b"OP\r")
    s.h.turns(5)
    assert s.output() == b""
    s.send(b"\n")
    s.expect(R.OK_NOOP)


def test_login_pipelined_with_transaction_commands_in_one_read(h):
    """The first login builds the mailbox's index in a thread; the commands
    behind it in the same read wait and are answered after it, in order."""
    data = message("one")
    user = h.add_user(messages=[data])
    s = h.connect()
    s.send(f"USER {user.name}\r\nPASS {user.password}\r\nSTAT\r\nLIST\r\nQUIT\r\n")
    s.wait_closed()
    assert s.output() == (R.OK_USER + R.OK_LOGGED_IN + b"+OK 1 %d\r\n" % len(data)
                          + b"+OK 1 messages (%d octets)\r\n1 %d\r\n.\r\n" % (len(data), len(data)) + R.OK_LOGOUT)
    assert s.transport.data_received_calls == 1


# ----------------------------------------------------------------- busy flags


def test_password_check_in_a_thread_holds_pipelined_commands(h):
    """BUSY_AUTH: a slow hash is checked in a thread; the pull stops, reading
    pauses, and what was pipelined behind PASS is answered after the login."""
    data = message("one")
    user = h.add_user(scheme="BLF-CRYPT", messages=[data])  # bcrypt: checked in a thread, for tens of ms
    s = h.connect()
    t = s.transport
    s.send(f"USER {user.name}\r\nPASS {user.password}\r\nSTAT\r\nNOOP\r\n")
    assert s.output() == R.OK_USER  # USER's reply is out; PASS is being checked
    assert s.busy & BUSY_AUTH and s.protocol._state == AUTHORIZATION
    assert (t.reading, t.pause_reading_calls) == (False, 1)
    s.send(b"LIST 1\r\n")  # sent meanwhile: stays with the transport
    assert t.inbound == [b"LIST 1\r\n"]
    s.expect(R.OK_LOGGED_IN + b"+OK 1 %d\r\n" % len(data) + R.OK_NOOP + b"+OK 1 %d\r\n" % len(data))
    h.wait_for(lambda: t.reading, what="reading resumed")
    assert (s.busy, t.resume_reading_calls, s.protocol._state) == (0, 1, TRANSACTION)


def test_failed_login_waits_the_failure_delay_and_holds_what_follows(make):
    h = make(auth_failure_delay=0.3)
    user = h.add_user()
    s = h.connect()
    start = time.monotonic()
    s.send(f"USER {user.name}\r\nPASS wrong\r\nCAPA\r\n")
    assert s.output() == R.OK_USER
    assert s.busy & BUSY_AUTH and not s.transport.reading
    h.sleep(0.05)
    assert s.output() == b""  # neither the failure nor CAPA yet
    s.expect(R.ERR_AUTH_FAILED)
    assert time.monotonic() - start >= 0.28
    s.expect(capa_authorization())
    assert s.protocol._auth_failures == 1 and s.busy == 0


def test_too_many_failures_end_the_connection(make):
    h = make(auth_max_attempts=2, auth_failure_delay=0.01)
    user = h.add_user()
    s = h.connect()
    s.send(f"USER {user.name}\r\nPASS bad1\r\nUSER {user.name}\r\nPASS bad2\r\nNOOP\r\n")
    s.wait_closed()
    assert s.output() == R.OK_USER + R.ERR_AUTH_FAILED + R.OK_USER + R.ERR_AUTH_FAILED


def test_retr_under_flow_control_pauses_reading_and_resumes(h):
    """BUSY_SENDING and BUSY_WRITE_PAUSED: a large message streams a chunk at a
    time as the peer reads; the commands behind it wait, reading is paused,
    and both resume when the message is out."""
    data = big_message(700 * 1024)
    assert len(data) > SMALL_MESSAGE  # streamed, not one write
    user = h.add_user(messages=[data])
    s = h.connect()
    s.login(user)
    t = s.transport
    s.start_reading(32 * 1024)  # a peer reading 32 KiB per loop turn
    paused, resumed = t.pause_reading_calls, t.resume_reading_calls  # (the first login paused reading too)
    s.send(b"RETR 1\r\nNOOP\r\nSTAT\r\n")
    assert s.busy & BUSY_SENDING and s.busy & BUSY_WRITE_PAUSED
    assert not t.reading and t.pause_writing_calls == 1
    s.expect(retr_reply(data) + R.OK_NOOP + b"+OK 1 %d\r\n" % len(data))
    h.wait_for(lambda: t.reading, what="reading resumed")
    assert s.busy == 0 and (t.pause_reading_calls - paused, t.resume_reading_calls - resumed) == (1, 1)
    assert t.pause_writing_calls >= len(data) // CHUNK and t.resume_writing_calls == t.pause_writing_calls
    assert t.max_pending <= HIGH_WATER + CHUNK  # never the whole message


def test_retr_to_a_peer_that_stopped_reading_holds_one_chunk(h):
    data = big_message(1024 * 1024)
    user = h.add_user(messages=[data])
    s = h.connect()
    s.login(user)
    t = s.transport
    s.stop_reading()
    s.send(b"RETR 1\r\nNOOP\r\n")
    h.sleep(0.05)
    assert t.max_pending <= CHUNK + 100  # the status line and one chunk, then the stream waits
    assert s.busy & BUSY_SENDING and s.busy & BUSY_WRITE_PAUSED and not t.reading
    assert R.OK_NOOP not in t.pending
    s.send(b"STAT\r\n")
    assert t.inbound == [b"STAT\r\n"]  # not read while the session is busy
    s.start_reading()
    s.expect(retr_reply(data) + R.OK_NOOP + b"+OK 1 %d\r\n" % len(data), timeout=5)
    h.wait_for(lambda: t.reading and s.busy == 0, what="the session idle and reading")


def test_peer_that_stops_reading_mid_retr_is_dropped_at_the_idle_timeout(make):
    h = make(timeout_transaction=0.2)
    data = big_message(1024 * 1024)
    user = h.add_user(messages=[data])
    s = h.connect()
    s.login(user)
    s.stop_reading()
    start = time.monotonic()
    s.send(b"RETR 1\r\n")
    s.wait_closed()
    assert time.monotonic() - start >= 0.18
    assert s.transport.aborted  # nothing more can be said to it: no -ERR queued behind the message
    assert s.protocol._end_reason == "timeout"
    assert not h.ctx.mailbox_locks.holder(str(user.maildir)) and not h.ctx.sessions


def test_client_leaving_during_the_password_check(h):
    """The check finishes after the connection is gone: no mailbox opened or
    locked, nothing written, nothing logged as an error."""
    user = h.add_user(scheme="BLF-CRYPT")
    s = h.connect()
    s.send(f"USER {user.name}\r\nPASS {user.password}\r\nSTAT\r\n")
    assert s.busy & BUSY_AUTH
    s.disconnect()
    h.sleep(0.2)  # the bcrypt check (tens of ms) is over
    assert s.output() == R.OK_USER and s.transport.dropped_writes == 0
    assert s.protocol._mailbox is None and s.protocol._user is None
    assert not h.ctx.mailbox_locks.holder(str(user.maildir)) and not h.ctx.sessions


# ----------------------------------------------------------------- FLUSH_REPLIES and FLUSH_BYTES


def test_pipelined_capa_to_a_peer_that_stopped_reading_is_bounded(h):
    """FLUSH_REPLIES: 10,240 pipelined CAPA (2 MB of replies) to a peer that
    reads nothing: at most FLUSH_REPLIES replies are written, then the pull
    and reading wait for the peer."""
    s = h.connect()
    t = s.transport
    capa = capa_authorization()
    s.send(b"CAPA\r\n")
    s.expect(capa)
    s.stop_reading()
    n = 20 * FLUSH_REPLIES
    s.send(b"CAPA\r\n" * n)
    h.turns(20)
    assert 0 < t.max_pending <= FLUSH_REPLIES * len(capa)
    assert s.busy & BUSY_WRITE_PAUSED and not t.reading
    assert s.protocol._parser.buffered > 0  # the rest still unparsed
    s.start_reading()
    s.expect(capa * n, timeout=5)
    h.wait_for(lambda: t.reading and s.busy == 0, what="the session idle and reading")
    assert t.max_pending <= FLUSH_REPLIES * len(capa)


def test_pipelined_retr_to_a_peer_that_stopped_reading_is_bounded(h):
    """FLUSH_BYTES: 40 pipelined RETR of a 100 KiB message (4 MB) to a peer that
    reads nothing: about FLUSH_BYTES is written, then everything waits."""
    data = big_message(100 * 1024)
    assert len(data) <= SMALL_MESSAGE  # each one write with its status line
    user = h.add_user(messages=[data])
    s = h.connect()
    s.login(user)
    t = s.transport
    s.stop_reading()
    s.send(b"RETR 1\r\n" * 40)
    h.turns(20)
    assert FLUSH_BYTES <= t.max_pending <= FLUSH_BYTES + len(retr_reply(data))
    assert s.busy & BUSY_WRITE_PAUSED and not t.reading
    s.start_reading()
    s.expect(retr_reply(data) * 40, timeout=5)
    h.wait_for(lambda: t.reading and s.busy == 0, what="the session idle and reading")


def test_pipelined_replies_to_a_reading_peer_are_written_in_bounded_pieces(h):
    """A peer that reads everything still gets a long burst in writes of at
    most FLUSH_REPLIES replies, the loop turning between them."""
    s = h.connect()
    t = s.transport
    capa = capa_authorization()
    n = 4 * FLUSH_REPLIES + 10
    writes = len(t.writes)
    s.send(b"CAPA\r\n" * n)
    assert t.pause_reading_calls == 1  # the pull gave the loop a turn, reading paused meanwhile
    s.expect(capa * n)
    burst = t.writes[writes:]
    assert len(burst) == math.ceil(n / FLUSH_REPLIES)
    assert max(len(w) for w in burst) == FLUSH_REPLIES * len(capa)
    h.wait_for(lambda: t.reading, what="reading resumed")


# ----------------------------------------------------------------- SASL


def test_auth_plain_initial_response_continuation_and_pipelining(h):
    first, second, third = h.add_user(), h.add_user(), h.add_user()
    s = h.connect()
    assert s.cmd(b"AUTH PLAIN " + b64(f"\0{first.name}\0{first.password}")) == R.OK_LOGGED_IN
    s = h.connect()
    assert s.cmd("AUTH PLAIN") == b"+ \r\n"
    assert s.cmd(b64(f"{second.name}\0{second.name}\0{second.password}")) == R.OK_LOGGED_IN  # authzid = authcid
    s = h.connect()  # the exchange and a command behind it, in one read
    s.send(b"AUTH PLAIN\r\n" + b64(f"\0{third.name}\0{third.password}") + b"\r\nSTAT\r\n")
    s.expect(b"+ \r\n" + R.OK_LOGGED_IN + b"+OK 0 0\r\n")


def test_auth_login_challenges(h):
    user = h.add_user()
    s = h.connect(metered=True)
    assert s.cmd("AUTH LOGIN") == b"+ " + b64("Username:") + b"\r\n"
    assert s.cmd(b64(user.name)) == b"+ " + b64("Password:") + b"\r\n"
    assert s.cmd(b64(user.password)) == R.OK_LOGGED_IN
    assert h.counters().logins == {"LOGIN": 1}


@pytest.mark.parametrize("keys", ["stored", "derived"])
def test_auth_scram_sha256(h, keys):
    """scramp as the client, from an untrusted address (SCRAM needs no TLS);
    keys stored by `fastpop user add`, or derived from a {PLAIN} password."""
    user = h.add_user(scheme="SSHA256", scram=True) if keys == "stored" else h.add_user()
    s = h.connect(peer=UNTRUSTED, metered=True)
    client = ScramClient(["SCRAM-SHA-256"], user.name, user.password)
    start = time.monotonic()
    line = s.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
    assert time.monotonic() - start >= SCRAM_FIRST_FLOOR - 0.005  # the server-first's floor
    client.set_server_first(unb64(line))
    line = s.cmd(b64(client.get_client_final()))
    client.set_server_final(unb64(line))  # the server proved it knows the keys
    assert s.cmd(b"") == R.OK_LOGGED_IN
    assert s.protocol._state == TRANSACTION
    assert h.counters().logins == {"SCRAM-SHA-256": 1}


def test_auth_scram_wrong_password_fails_after_the_delay(make):
    h = make(auth_failure_delay=0.3)
    user = h.add_user(scheme="SSHA256", scram=True)
    s = h.connect(peer=UNTRUSTED, metered=True)
    client = ScramClient(["SCRAM-SHA-256"], user.name, "not the password")
    start = time.monotonic()
    client.set_server_first(unb64(s.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))))
    assert s.cmd(b64(client.get_client_final())) == R.ERR_AUTH_FAILED
    assert time.monotonic() - start >= 0.28
    assert h.counters().failures == {("SCRAM-SHA-256", "credentials"): 1}
    assert s.protocol._state == AUTHORIZATION and s.protocol._auth is None


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "SCRAM-SHA-256"])
def test_auth_cancelled_with_star(make, mechanism):
    """'*' ends the exchange (RFC 5034): no failure counted, no delay, and the
    session logs in normally afterwards."""
    h = make(auth_failure_delay=1.0)
    user = h.add_user()
    s = h.connect(metered=True)
    if mechanism == "SCRAM-SHA-256":  # cancelled after the server-first
        client = ScramClient(["SCRAM-SHA-256"], user.name, user.password)
        line = s.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
        assert unb64(line).startswith("r=")
    else:
        assert s.cmd(f"AUTH {mechanism}").startswith(b"+ ")
    start = time.monotonic()
    assert s.cmd("*") == R.ERR_AUTH_CANCELLED
    assert time.monotonic() - start < h.config.auth_failure_delay
    assert (s.protocol._auth, s.protocol._auth_wants_line, s.protocol._auth_failures) == (None, False, 0)
    assert h.counters().failures == {}
    s.login(user)


def test_auth_bad_base64_is_a_malformed_failure_after_the_delay(make):
    h = make(auth_failure_delay=0.2)
    s = h.connect(metered=True)
    start = time.monotonic()
    assert s.cmd("AUTH PLAIN !!not-base64!!") == R.ERR_AUTH_BASE64  # in the initial response
    assert time.monotonic() - start >= 0.18
    assert s.cmd("AUTH LOGIN") == b"+ " + b64("Username:") + b"\r\n"
    start = time.monotonic()
    assert s.cmd("%%%") == R.ERR_AUTH_BASE64  # in a continuation
    assert time.monotonic() - start >= 0.18
    assert h.counters().failures == {("PLAIN", "malformed"): 1, ("LOGIN", "malformed"): 1}
    assert s.protocol._auth_failures == 2


def test_plaintext_mechanisms_refused_from_an_untrusted_address(h):
    user = h.add_user()
    s = h.connect(peer=UNTRUSTED)
    s.send(b"AUTH\r\n")
    s.expect(b"+OK\r\nSCRAM-SHA-256\r\n.\r\n")
    assert s.cmd(b"AUTH PLAIN " + b64(f"\0{user.name}\0{user.password}")) == R.ERR_PLAINTEXT_DISALLOWED
    assert s.cmd(f"USER {user.name}") == R.ERR_PLAINTEXT_DISALLOWED
    assert s.cmd("AUTH CRAM-MD5") == R.ERR_AUTH_MECHANISM
    s = h.connect()
    s.send(b"AUTH\r\n")
    s.expect(b"+OK\r\nPLAIN\r\nLOGIN\r\nSCRAM-SHA-256\r\n.\r\n")


# ----------------------------------------------------------------- the login path's outcomes (MeteredProtocol)


def test_metered_logins_and_refusals(h):
    user = h.add_user(messages=[message("one")])
    c = h.counters()
    s = h.connect(metered=True)
    assert (c.connections, c.open) == (1, 1)
    s.send(f"USER {user.name}\r\nPASS wrong\r\n")
    s.expect(R.OK_USER + R.ERR_AUTH_FAILED)
    assert c.failures == {("USER", "credentials"): 1}
    assert s.cmd(b"AUTH PLAIN " + b64(f"\0{user.name}\0")) == R.ERR_AUTH_FAILED  # no password: malformed
    assert c.failures == {("USER", "credentials"): 1, ("PLAIN", "malformed"): 1}
    s.login(user)
    assert (c.logins, c.logged_in) == ({"USER": 1}, 1)
    other = h.connect(metered=True)
    other.send(f"USER {user.name}\r\nPASS {user.password}\r\n")
    other.expect(R.OK_USER + R.ERR_IN_USE)
    assert c.failures[("USER", "in_use")] == 1 and c.logins == {"USER": 1}
    assert s.cmd("QUIT") == R.OK_LOGOUT
    s.wait_closed()
    assert (c.open, c.logged_in, c.sessions) == (1, 0, {"quit": 1})
    assert other.cmd(f"USER {user.name}") == R.OK_USER
    assert other.cmd(f"PASS {user.password}") == R.OK_LOGGED_IN  # free again
    assert (c.logins, c.logged_in) == ({"USER": 2}, 1)


def test_metered_login_delay(make):
    h = make(login_delay=3600)
    user = h.add_user()
    c = h.counters()
    s = h.connect(metered=True)
    s.login(user)
    assert s.cmd("QUIT") == R.OK_LOGOUT
    s = h.connect(metered=True)
    s.send(f"USER {user.name}\r\nPASS {user.password}\r\n")
    s.expect(R.OK_USER + R.ERR_LOGIN_DELAY)
    assert c.failures == {("USER", "login_delay"): 1} and c.logins == {"USER": 1}
    assert s.protocol._state == AUTHORIZATION and s.busy == 0


def test_metered_unavailable_and_mailbox_refusals(h):
    broken = h.add_user()
    broken.maildir.rename(broken.maildir.with_name("elsewhere"))
    broken.maildir.write_bytes(b"a file where the Maildir should be\n")
    c = h.counters()
    s = h.connect(metered=True)
    s.send(f"USER {broken.name}\r\nPASS {broken.password}\r\n")
    s.expect(R.OK_USER + R.ERR_MAILBOX_PERM)
    assert c.failures == {("USER", "mailbox"): 1}
    assert any("cannot lock mailbox" in r.getMessage() for r in h.logged_errors)
    h.logged_errors.clear()
    h.passwd.unlink()  # the user database cannot be read
    s.send(f"USER {broken.name}\r\nPASS {broken.password}\r\n")
    s.expect(R.OK_USER + R.ERR_AUTH_UNAVAILABLE)
    assert c.failures == {("USER", "mailbox"): 1, ("USER", "unavailable"): 1}
    assert any("user database unavailable" in r.getMessage() for r in h.logged_errors)
    h.logged_errors.clear()


# ----------------------------------------------------------------- UTF8, CAPA


def test_utf8_allows_utf8_user_names_and_passwords(h):
    user = h.add_user(name="jörg", password="pässwörd")
    s = h.connect()
    assert s.cmd("USER jörg".encode()) == R.ERR_INVALID_CHARS
    assert s.cmd("UTF8 on") == R.ERR_ARGS
    assert s.cmd("UTF8") == R.OK_UTF8
    s.send(f"USER {user.name}\r\nPASS {user.password}\r\n".encode())
    s.expect(R.OK_USER + R.OK_LOGGED_IN)
    assert s.cmd("UTF8") == R.ERR_WRONG_STATE


def test_capa_before_and_after_login(h):
    user = h.add_user()
    slow = h.add_user(extra={"login_delay": "30"})
    s = h.connect()
    s.send(b"CAPA\r\n")
    s.expect(capa_authorization())
    assert s.cmd("CAPA x") == R.ERR_ARGS
    s.login(user)
    s.send(b"CAPA\r\n")
    s.expect(capa_transaction())
    s = h.connect(peer=UNTRUSTED)
    s.send(b"CAPA\r\n")
    s.expect(capa_authorization(trusted=False))
    s = h.connect()
    s.login(slow)
    s.send(b"CAPA\r\n")
    s.expect(capa_transaction(login_delay=30))  # the value that applies to this user


# ----------------------------------------------------------------- QUIT and UPDATE


def test_deletions_applied_only_by_quit_in_transaction(h):
    one, two = message("one"), message("two")
    user = h.add_user(messages=[one, two])
    s = h.connect()
    s.login(user)
    assert s.cmd("DELE 1") == R.OK_DELETED
    assert s.cmd("DELE 1") == R.ERR_MESSAGE_DELETED
    s.disconnect()  # gone without QUIT: nothing is deleted
    assert user.contents() == sorted([one, two])
    assert not h.ctx.mailbox_locks.holder(str(user.maildir))
    s = h.connect()
    s.send(f"USER {user.name}\r\nQUIT\r\n")  # QUIT before logging in
    s.wait_closed()
    assert s.output() == R.OK_USER + R.OK_LOGOUT
    s = h.connect()
    s.login(user)
    assert s.cmd("DELE 1") == R.OK_DELETED
    assert s.cmd("RSET") == b"+OK 2 messages (%d octets)\r\n" % (len(one) + len(two))
    assert s.cmd("DELE 2") == R.OK_DELETED
    assert user.contents() == sorted([one, two])  # marked only
    assert s.cmd("QUIT") == R.OK_LOGOUT_DELETED
    s.wait_closed()
    assert user.contents() == [one]
    assert s.protocol._state == CLOSED
    assert not h.ctx.mailbox_locks.holder(str(user.maildir))


# ----------------------------------------------------------------- the mapped index at the session's end


@pytest.fixture
def mapped(make, tmp_path):
    """A harness whose indexes live in a ``[mail] index`` directory of this
    uid, so they are mapped (fastpop.store.index.mappable)."""
    from fastpop.store import index as mindex

    directory = tmp_path / "indexes"
    mindex.configure(str(directory))
    try:
        yield make(mail_index=str(directory))
    finally:
        mindex.configure(None)


@pytest.mark.parametrize("end", ["quit", "disconnect"])
def test_mapped_index_is_unmapped_when_the_session_ends(mapped, end):
    """At QUIT, or when the client goes, the session's mapping is closed then,
    while the session object is still referenced (the old code left it to
    whenever the session was collected)."""
    user = mapped.add_user(messages=[message("one"), message("two")])
    for _ in range(2):  # the first login builds the index; the second maps it warm
        s = mapped.connect()
        s.login(user)
        assert s.cmd("STAT").startswith(b"+OK 2 ")
        index = s.protocol._mailbox.index
        assert index.mapped and not index.buf.closed
        if end == "quit":
            assert s.cmd("QUIT") == R.OK_LOGOUT
            s.wait_closed()
        else:
            s.disconnect()
        assert index.buf.closed, "the index stayed mapped after the session ended"
        assert s.protocol._mailbox is not None  # (still referenced: unmapped by the session, not by collection)
