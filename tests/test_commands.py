"""Every POP3 command and every error path, end to end, against a real fastpop.

Driven through stdlib poplib where it can express the exchange, and through
a raw socket where exact bytes matter (pipelining, bad input, limits).  The
``server`` fixture runs each test against both parser implementations.
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import re
import time

import pytest
from support.server import PARSERS, Raw, ServerProcess, message, serving

from fastpop import __version__

CRLF = b"\r\n"
OK_LOGGED_IN = b"+OK Logged in."
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
GREETING = re.compile(rb"^\+OK fastpop ready\. (<[^<>\s]+@[^<>\s]+>)\r\n$")


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    """conftest's ``server`` with APOP on (off by default: tests/test_hostile_auth.py)."""
    yield from serving(ServerProcess(tmp_path_factory.mktemp("fastpop"), PARSERS[request.param], extra_args=["--apop"]))


# --------------------------------------------------------------------------- helpers


def raw_login(server, user) -> Raw:
    c = Raw(server.port)
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    return c


def pop3_lines(data: bytes) -> list[bytes]:
    """What poplib's RETR returns for a stored message with CRLF line ends."""
    text = data if data.endswith(b"\n") else data + CRLF
    return text[:-2].split(CRLF)


def ssha256(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha256(password.encode() + salt).digest()
    return "{SSHA256}" + base64.b64encode(digest + salt).decode()


def cur_names(user) -> list[str]:
    return sorted(os.listdir(user.maildir / "cur"))


def three_messages():
    return [
        message("one", "First body.\r\n"),
        message("two", "Second body,\r\nwith two lines.\r\n"),
        message("three", "Third.\r\n" * 10),
    ]


# --------------------------------------------------------------------------- greeting, CAPA


def test_greeting_has_unique_apop_timestamp(server):
    a, b = Raw(server.port), Raw(server.port)
    ma, mb = GREETING.match(a.greeting), GREETING.match(b.greeting)
    assert ma and mb, (a.greeting, b.greeting)
    assert ma.group(1) != mb.group(1)
    a.close()
    b.close()


CAPA_REQUIRED = {
    "TOP": [],
    "UIDL": [],
    "RESP-CODES": [],
    "AUTH-RESP-CODE": [],
    "PIPELINING": [],
    "EXPIRE": ["NEVER"],
    "LOGIN-DELAY": ["0"],
    "IMPLEMENTATION": [f"fastpop-{__version__}"],
}


def assert_capa(capa: dict, logged_in: bool) -> None:
    for name, args in CAPA_REQUIRED.items():
        assert capa.get(name) == args, (name, capa)
    if logged_in:
        assert "USER" not in capa, capa
    else:
        assert capa.get("USER") == [], capa


def test_capa_before_and_after_login(server):
    user = server.add_user(messages=[message()])
    p = server.connect()
    assert_capa(p.capa(), logged_in=False)
    p.user(user.name)
    p.pass_(user.password)
    assert_capa(p.capa(), logged_in=True)
    p.quit()


def test_capa_raw_and_with_argument(server):
    c = Raw(server.port)
    status, body = c.multi("CAPA")
    assert status == b"+OK Capability list follows\r\n"
    lines = body.split(CRLF)[:-1]
    assert lines[:3] == [b"TOP", b"UIDL", b"USER"]
    for line in (b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"EXPIRE NEVER", b"LOGIN-DELAY 0",
                 f"IMPLEMENTATION fastpop-{__version__}".encode()):
        assert lines.count(line) == 1, (line, lines)
    assert all(re.fullmatch(rb"[A-Z][A-Z0-9-]*( \S+)*", line) for line in lines), lines
    assert c.cmd("CAPA x") == b"-ERR Wrong number of arguments.\r\n"
    assert c.cmd("capa") == b"+OK Capability list follows\r\n"
    assert c.body().split(CRLF)[:-1] == lines
    c.close()


# --------------------------------------------------------------------------- USER / PASS / APOP


def test_user_pass_success(server):
    user = server.add_user(messages=[message()])
    p = server.connect()
    assert p.user(user.name) == b"+OK"
    assert p.pass_(user.password) == OK_LOGGED_IN
    assert p.stat() == (1, len(message()))
    assert p.quit() == b"+OK Logging out."


def test_password_with_spaces(server):
    user = server.add_user(password="two  words and more ")
    p = server.connect()
    p.user(user.name)
    assert p.pass_(user.password) == OK_LOGGED_IN
    p.quit()


@pytest.mark.parametrize("which", ["wrong-password", "unknown-user", "truncated-password"])
def test_user_pass_failure(server, which):
    user = server.add_user()
    name, password = user.name, user.password
    if which == "wrong-password":
        password = "wrong"
    elif which == "unknown-user":
        name = "nobody-" + user.name
    else:
        password = user.password[:-1]
    p = server.connect()
    assert p.user(name) == b"+OK"  # no hint whether the user exists
    with pytest.raises(poplib.error_proto) as exc:
        p.pass_(password)
    assert exc.value.args[0] == AUTH_FAILED
    # still in AUTHORIZATION: a correct login on the same connection works
    p.user(user.name)
    assert p.pass_(user.password) == OK_LOGGED_IN
    p.quit()


def test_pass_without_user(server):
    user = server.add_user()
    c = Raw(server.port)
    assert c.cmd("PASS secret") == b"-ERR No username given.\r\n"
    # a failed PASS forgets the user name too
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd("PASS wrong") == AUTH_FAILED + CRLF
    assert c.cmd(f"PASS {user.password}") == b"-ERR No username given.\r\n"
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd("PASS") == b"-ERR Wrong number of arguments.\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    c.assert_closed()


def test_apop_success(server):
    user = server.add_user(messages=[message()])
    p = server.connect()
    assert GREETING.match(p.welcome + CRLF)
    assert p.apop(user.name, user.password) == OK_LOGGED_IN
    assert p.stat()[0] == 1
    p.quit()


def test_apop_raw_digest_is_md5_of_timestamp_and_password(server):
    user = server.add_user()
    c = Raw(server.port)
    stamp = GREETING.match(c.greeting).group(1)
    digest = hashlib.md5(stamp + user.password.encode()).hexdigest()
    assert c.cmd(f"APOP {user.name} {digest.upper()}") == b"+OK Logged in.\r\n"  # hex case-insensitive
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    c.close()


def test_apop_failures(server):
    user = server.add_user()
    c = Raw(server.port)
    stamp = GREETING.match(c.greeting).group(1)
    wrong = hashlib.md5(stamp + b"wrong").hexdigest()
    right = hashlib.md5(stamp + user.password.encode()).hexdigest()
    assert c.cmd(f"APOP {user.name} {wrong}") == AUTH_FAILED + CRLF
    assert c.cmd(f"APOP nobody-{user.name} {right}") == AUTH_FAILED + CRLF
    # a digest made for another connection's timestamp does not work here
    c2 = Raw(server.port)
    assert GREETING.match(c2.greeting).group(1) != stamp
    assert c2.cmd(f"APOP {user.name} {right}") == AUTH_FAILED + CRLF
    assert c2.cmd(f"APOP {user.name}") == b"-ERR Wrong number of arguments.\r\n"
    assert c2.cmd(f"APOP {user.name} {right} extra") == b"-ERR Wrong number of arguments.\r\n"
    c2.close()
    c.close()


def test_apop_refused_for_hashed_password(server):
    stored = ssha256("hashed-secret")
    user = server.add_user(password="hashed-secret", stored=stored)
    # the hash is valid: USER/PASS works with it
    p = user.login()
    p.quit()
    for secret in (user.password, stored, stored[len("{SSHA256}"):]):
        c = Raw(server.port)
        stamp = GREETING.match(c.greeting).group(1)
        digest = hashlib.md5(stamp + secret.encode()).hexdigest()
        assert c.cmd(f"APOP {user.name} {digest}") == AUTH_FAILED + CRLF, secret
        c.close()


def test_three_failed_logins_close_the_connection(server):
    user = server.add_user()
    c = Raw(server.port)
    stamp = GREETING.match(c.greeting).group(1)
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd("PASS bad1") == AUTH_FAILED + CRLF
    assert c.cmd(f"APOP {user.name} {hashlib.md5(stamp + b'bad2').hexdigest()}") == AUTH_FAILED + CRLF
    assert c.cmd("CAPA").startswith(b"+OK")  # still open after two failures
    c.body()
    assert c.cmd("USER nobody-at-all") == b"+OK\r\n"
    assert c.cmd("PASS bad3") == AUTH_FAILED + CRLF
    c.assert_closed()
    # two failures then success is fine
    c = Raw(server.port)
    for _ in range(2):
        assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
        assert c.cmd("PASS bad") == AUTH_FAILED + CRLF
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    c.close()


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", ".hidden", "/etc", "../x", "x/../y", "a\\b"])
def test_invalid_user_names_refused(server, name):
    c = Raw(server.port)
    assert c.cmd(f"USER {name}") == b"-ERR [AUTH] Invalid user name.\r\n"
    assert c.cmd("PASS secret") == b"-ERR No username given.\r\n"
    c.close()
    before = sorted(os.listdir(server.mail))
    parent_before = sorted(os.listdir(server.mail.parent))
    c = Raw(server.port)
    digest = hashlib.md5(GREETING.match(c.greeting).group(1) + b"secret").hexdigest()
    assert c.cmd(f"APOP {name} {digest}") == AUTH_FAILED + CRLF
    c.close()
    assert sorted(os.listdir(server.mail)) == before
    assert sorted(os.listdir(server.mail.parent)) == parent_before


def test_user_name_with_domain(server):
    user = server.add_user(messages=[message()], name=f"u{os.getpid()}.x@example.com")
    p = user.login()
    assert p.stat()[0] == 1
    p.quit()


# --------------------------------------------------------------------------- TRANSACTION commands


def test_transaction_commands(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    uids = [n.split(":")[0] for n in (p.name for p in sorted((user.maildir / "new").iterdir()))]
    total = sum(map(len, msgs))
    p = user.login()
    assert p.stat() == (3, total)
    resp, lines, _ = p.list()
    assert resp == b"+OK 3 messages (%d octets)" % total
    assert lines == [b"%d %d" % (i + 1, len(m)) for i, m in enumerate(msgs)]
    for i, m in enumerate(msgs):
        assert p.list(i + 1) == b"+OK %d %d" % (i + 1, len(m))
    resp, lines, _ = p.uidl()
    assert resp == b"+OK"
    assert lines == [b"%d %s" % (i + 1, u.encode()) for i, u in enumerate(uids)]
    assert p.uidl(2) == b"+OK 2 " + uids[1].encode()
    for i, m in enumerate(msgs):
        resp, lines, _ = p.retr(i + 1)
        assert resp == b"+OK %d octets" % len(m)
        assert lines == pop3_lines(m)
    resp, lines, _ = p.top(2, 0)
    assert resp == b"+OK Top of message follows"
    assert lines == [b"From: a@example.com", b"To: b@example.com", b"Subject: two", b""]
    resp, lines, _ = p.top(2, 1)
    assert lines == [b"From: a@example.com", b"To: b@example.com", b"Subject: two", b"", b"Second body,"]
    assert p.noop() == b"+OK"
    assert p.rset() == b"+OK 3 messages (%d octets)" % total
    assert p.quit() == b"+OK Logging out."
    assert len(cur_names(user)) == 3
    assert user.contents() == sorted(msgs)


def test_commands_are_case_insensitive(server):
    user = server.add_user(messages=[message()])
    c = Raw(server.port)
    assert c.cmd(f"user {user.name}") == b"+OK\r\n"
    assert c.cmd(f"pAsS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("stat") == b"+OK 1 %d\r\n" % len(message())
    assert c.cmd("Noop") == b"+OK\r\n"
    assert c.cmd("quit") == b"+OK Logging out.\r\n"
    c.close()


def test_bare_lf_command_terminator(server):
    user = server.add_user(messages=[message()])
    c = Raw(server.port)
    c.send(f"USER {user.name}\nPASS {user.password}\nSTAT\n".encode())
    assert c.line() == b"+OK\r\n"
    assert c.line() == b"+OK Logged in.\r\n"
    assert c.line() == b"+OK 1 %d\r\n" % len(message())
    c.close()


def test_dele_hides_message_and_rset_restores(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    total = sum(map(len, msgs))
    p = user.login()
    uid2 = p.uidl(2).split()[2]
    assert p.dele(2) == b"+OK Marked to be deleted."
    assert p.stat() == (2, total - len(msgs[1]))
    resp, lines, _ = p.list()
    assert resp == b"+OK 2 messages (%d octets)" % (total - len(msgs[1]))
    assert lines == [b"1 %d" % len(msgs[0]), b"3 %d" % len(msgs[2])]
    resp, lines, _ = p.uidl()
    assert [line.split()[0] for line in lines] == [b"1", b"3"]
    assert uid2 not in b" ".join(lines)
    for call in (lambda: p.list(2), lambda: p.uidl(2), lambda: p.retr(2), lambda: p.top(2, 0), lambda: p.dele(2)):
        with pytest.raises(poplib.error_proto) as exc:
            call()
        assert exc.value.args[0] == b"-ERR Message is deleted."
    assert p.rset() == b"+OK 3 messages (%d octets)" % total
    assert p.stat() == (3, total)
    assert p.list(2) == b"+OK 2 %d" % len(msgs[1])
    assert p.retr(2)[1] == pop3_lines(msgs[1])
    # RSET really cleared the mark: QUIT deletes nothing
    assert p.quit() == b"+OK Logging out."
    assert len(cur_names(user)) == 3


def test_quit_applies_deletions(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    p = user.login()
    uids = [line.split()[1] for line in p.uidl()[1]]
    assert p.dele(1) == b"+OK Marked to be deleted."
    assert p.dele(3) == b"+OK Marked to be deleted."
    assert p.quit() == b"+OK Logging out, messages deleted."
    names = cur_names(user)
    assert [n.split(":")[0].encode() for n in names] == [uids[1]]
    assert user.contents() == [msgs[1]]
    p = user.login_when_free()
    assert p.stat() == (1, len(msgs[1]))
    assert p.uidl(1) == b"+OK 1 " + uids[1]
    assert p.retr(1)[1] == pop3_lines(msgs[1])
    p.quit()


def test_close_without_quit_applies_no_deletions(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    c = raw_login(server, user)
    for n in (1, 2, 3):
        assert c.cmd(f"DELE {n}") == b"+OK Marked to be deleted.\r\n"
    assert c.cmd("STAT") == b"+OK 0 0\r\n"
    c.close()
    p = user.login_when_free()
    assert p.stat() == (3, sum(map(len, msgs)))
    p.quit()
    assert user.contents() == sorted(msgs)


# --------------------------------------------------------------------------- argument errors


NO_SUCH = b"-ERR No such message.\r\n"
BAD_NUMBER = b"-ERR Invalid message number.\r\n"
WRONG_ARGS = b"-ERR Wrong number of arguments.\r\n"


def test_message_number_errors(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    c = raw_login(server, user)
    cases = {
        "0": NO_SUCH,
        "4": NO_SUCH,
        "4294967297": NO_SUCH,
        "9999999999": NO_SUCH,
        "99999999999": BAD_NUMBER,
        "99999999999999999999999999999999": BAD_NUMBER,
        "-1": BAD_NUMBER,
        "+1": BAD_NUMBER,
        "abc": BAD_NUMBER,
        "1x": BAD_NUMBER,
        "0x1": BAD_NUMBER,
        "1.0": BAD_NUMBER,
    }
    for cmd in ("LIST", "UIDL", "RETR", "DELE"):
        for arg, reply in cases.items():
            assert c.cmd(f"{cmd} {arg}") == reply, (cmd, arg)
    for arg, reply in cases.items():
        assert c.cmd(f"TOP {arg} 0") == reply, ("TOP", arg)
    # leading zeros are still a number
    assert c.cmd("LIST 002") == b"+OK 2 %d\r\n" % len(msgs[1])
    # lines argument of TOP
    for lines in ("-1", "x", "1x", "+1"):
        assert c.cmd(f"TOP 1 {lines}") == b"-ERR Invalid number of lines.\r\n", lines
    # none of these errors counts as a bad command or marked anything deleted
    assert c.cmd("STAT") == b"+OK 3 %d\r\n" % sum(map(len, msgs))
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    c.assert_closed()
    assert user.contents() == sorted(msgs)


def test_missing_and_extra_arguments(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    c = raw_login(server, user)
    for cmd in ("RETR", "DELE", "TOP", "TOP 1", "RETR 1 2", "DELE 1 2", "LIST 1 2", "UIDL 1 2",
                "TOP 1 2 3", "STAT 1", "NOOP 1", "RSET 1", "CAPA 1"):
        assert c.cmd(cmd) == WRONG_ARGS, cmd
    # extra spaces are not arguments
    assert c.cmd("LIST  2 ") == b"+OK 2 %d\r\n" % len(msgs[1])
    assert c.cmd("STAT ") == b"+OK 3 %d\r\n" % sum(map(len, msgs))
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    assert user.contents() == sorted(msgs)


def test_user_argument_count(server):
    c = Raw(server.port)
    assert c.cmd("USER") == WRONG_ARGS
    assert c.cmd("USER a b") == WRONG_ARGS
    assert c.cmd("APOP") == WRONG_ARGS
    c.close()


def test_unknown_commands(server):
    user = server.add_user(messages=[message()])
    c = Raw(server.port)
    for cmd in ("FOO", "XTND XLST", "", "  ", "RETRX 1", "STA", "LAST", "RPOP x", "STATS", "US"):
        assert c.cmd(cmd) == b"-ERR Unknown command.\r\n", cmd
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    for cmd in ("FOO", "XTND", "", "LAST"):
        assert c.cmd(cmd) == b"-ERR Unknown command.\r\n", cmd
    assert c.cmd("NOOP") == b"+OK\r\n"
    c.close()


def test_commands_in_wrong_state(server):
    user = server.add_user(messages=[message()])
    c = Raw(server.port)
    for cmd in ("STAT", "LIST", "LIST 1", "UIDL", "RETR 1", "DELE 1", "TOP 1 0", "RSET", "NOOP"):
        assert c.cmd(cmd) == b"-ERR Command not valid in this state.\r\n", cmd
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    digest = hashlib.md5(GREETING.match(c.greeting).group(1) + user.password.encode()).hexdigest()
    for cmd in (f"USER {user.name}", f"PASS {user.password}", f"APOP {user.name} {digest}"):
        assert c.cmd(cmd) == b"-ERR Command not valid in this state.\r\n", cmd
    assert c.cmd("STAT") == b"+OK 1 %d\r\n" % len(message())
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    c.close()


# --------------------------------------------------------------------------- bad input


def test_overlong_line(server):
    user = server.add_user(messages=[message()])
    c = Raw(server.port)
    # 255 octets including CRLF is the limit (RFC 2449)
    name_ok = "u" * (255 - len("USER ") - 2)
    assert c.cmd(f"USER {name_ok}") == b"+OK\r\n"
    assert c.cmd(f"USER {name_ok}u") == b"-ERR Line too long.\r\n"
    assert c.cmd("CAPA").startswith(b"+OK")
    c.body()
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd(b"NOOP " + b"x" * 5000) == b"-ERR Line too long.\r\n"
    assert c.cmd("NOOP") == b"+OK\r\n"
    # an overlong line is answered once, even before its end arrives
    c.send(b"X" * 1000)
    assert c.line() == b"-ERR Line too long.\r\n"
    c.send(b"Y" * 3000)
    time.sleep(0.05)
    c.send(b"Z" * 10 + b"\r\nSTAT\r\n")
    assert c.line() == b"+OK 1 %d\r\n" % len(message())
    assert c.cmd("NOOP") == b"+OK\r\n"
    c.close()


@pytest.mark.parametrize("line", [b"NO\x00OP", b"NOOP\x00", b"NOOP\xff", b"N\xc3\xa9OP", b"\x00",
                                  b"STAT\x7f", b"NOOP\tx", b"NO\rOP", b"\xef\xbb\xbfNOOP"])
def test_nul_and_8bit_bytes(server, line):
    user = server.add_user(messages=[message()])
    c = Raw(server.port)
    assert c.cmd(line) == b"-ERR Invalid characters in command.\r\n"
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd(line) == b"-ERR Invalid characters in command.\r\n"
    assert c.cmd("NOOP") == b"+OK\r\n"
    c.close()


def test_8bit_user_and_password_refused(server):
    user = server.add_user()
    c = Raw(server.port)
    assert c.cmd("USER caf\xc3\xa9".encode("latin-1")) == b"-ERR Invalid characters in command.\r\n"
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(b"PASS s\xe9cret") == b"-ERR Invalid characters in command.\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    c.close()


def test_twenty_bad_commands_close_the_connection(server):
    c = Raw(server.port)
    for i in range(19):
        assert c.cmd("FOO") == b"-ERR Unknown command.\r\n", i
    assert c.cmd("CAPA").startswith(b"+OK")  # a good command does not reset or count
    c.body()
    c.send(b"FOO\r\n")
    assert c.read_to_eof() == b"-ERR Unknown command.\r\n-ERR Too many bad commands.\r\n"


def test_bad_commands_of_every_kind_count(server):
    user = server.add_user(messages=[message()])
    c = raw_login(server, user)
    kinds = [b"FOO", b"USER x", b"STAT 1", b"X" * 300, b"NO\x00OP"]
    replies = []
    for i in range(19):
        replies.append(c.cmd(kinds[i % len(kinds)]))
    assert all(r.startswith(b"-ERR") for r in replies)
    # message-number errors are answered but are not "bad commands"
    for _ in range(25):
        assert c.cmd("RETR 99") == NO_SUCH
    assert c.cmd("NOOP") == b"+OK\r\n"
    c.send(b"FOO\r\n")
    assert c.read_to_eof() == b"-ERR Unknown command.\r\n-ERR Too many bad commands.\r\n"


# --------------------------------------------------------------------------- pipelining


def stuffed(data: bytes) -> bytes:
    """RETR body (dot-stuffed, no terminator) for a message with CRLF line ends."""
    if not data:
        return b""
    text = data if data.endswith(b"\n") else data + CRLF
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in text[:-2].split(CRLF))


def test_pipelining_all_in_one_send(server):
    m1 = message("piped", "Body line.\r\n.dotted\r\n")
    m2 = message("second", "x\r\n")
    user = server.add_user(messages=[m1, m2])
    uids = [p.name for p in sorted((user.maildir / "new").iterdir())]
    c = Raw(server.port)
    c.send(
        f"USER {user.name}\r\nPASS {user.password}\r\nSTAT\r\nLIST\r\nRETR 1\r\nUIDL\r\n"
        "TOP 1 0\r\nNOOP\r\nQUIT\r\n".encode()
    )
    total = len(m1) + len(m2)
    header = m1[: m1.index(b"\r\n\r\n") + 4]
    expected = (
        b"+OK\r\n"
        b"+OK Logged in.\r\n"
        + b"+OK 2 %d\r\n" % total
        + b"+OK 2 messages (%d octets)\r\n1 %d\r\n2 %d\r\n.\r\n" % (total, len(m1), len(m2))
        + b"+OK %d octets\r\n" % len(m1) + stuffed(m1) + b".\r\n"
        + b"+OK\r\n1 " + uids[0].encode() + b"\r\n2 " + uids[1].encode() + b"\r\n.\r\n"
        + b"+OK Top of message follows\r\n" + header + b".\r\n"
        + b"+OK\r\n"
        + b"+OK Logging out.\r\n"
    )
    assert b"\r\n..dotted\r\n" in expected
    assert c.read_to_eof() == expected


def test_pipelining_with_large_message_and_errors(server):
    big = message("big", size=600 * 1024)
    small = message("small", ".\r\n")
    user = server.add_user(messages=[big, small])
    c = Raw(server.port)
    c.send(
        f"USER {user.name}\r\nPASS wrong\r\nUSER {user.name}\r\nPASS {user.password}\r\n"
        "RETR 1\r\nRETR 2\r\nRETR 3\r\nFOO\r\nDELE 2\r\nRETR 1\r\nSTAT\r\nQUIT\r\n".encode()
    )
    assert c.line() == b"+OK\r\n"
    assert c.line() == AUTH_FAILED + CRLF
    assert c.line() == b"+OK\r\n"
    assert c.line() == b"+OK Logged in.\r\n"
    assert not big.endswith(b"\n")
    assert c.line() == b"+OK %d octets\r\n" % (len(big) + 2)
    assert c.body() == stuffed(big)
    assert c.line() == b"+OK %d octets\r\n" % len(small)
    assert c.body() == stuffed(small)
    assert c.line() == NO_SUCH
    assert c.line() == b"-ERR Unknown command.\r\n"
    assert c.line() == b"+OK Marked to be deleted.\r\n"
    assert c.line() == b"+OK %d octets\r\n" % (len(big) + 2)
    assert c.body() == stuffed(big)
    assert c.line() == b"+OK 1 %d\r\n" % (len(big) + 2)
    assert c.line() == b"+OK Logging out, messages deleted.\r\n"
    c.assert_closed()
    assert user.contents() == [big]


def test_pipelining_behind_slow_password_hash(server):
    argon2 = pytest.importorskip("argon2")
    stored = "{ARGON2ID}" + argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("slowpw")
    m = message("slow", "hi\r\n")
    user = server.add_user(messages=[m], password="slowpw", stored=stored)
    c = Raw(server.port)
    c.send(f"USER {user.name}\r\nPASS {user.password}\r\nSTAT\r\nNOOP\r\nQUIT\r\n".encode())
    assert c.read_to_eof() == (
        b"+OK\r\n+OK Logged in.\r\n" + b"+OK 1 %d\r\n" % len(m) + b"+OK\r\n+OK Logging out.\r\n"
    )


# --------------------------------------------------------------------------- locking and snapshots


def test_second_session_gets_in_use(server):
    user = server.add_user(messages=[message()])
    first = user.login()
    second = server.connect()
    second.user(user.name)
    with pytest.raises(poplib.error_proto) as exc:
        second.pass_(user.password)
    assert exc.value.args[0] == IN_USE
    # APOP is refused the same way
    third = server.connect()
    with pytest.raises(poplib.error_proto) as exc:
        third.apop(user.name, user.password)
    assert exc.value.args[0] == IN_USE
    third.close()
    assert first.stat()[0] == 1  # the first session is unaffected
    assert first.quit() == b"+OK Logging out."
    # the refused connection is still in AUTHORIZATION and may retry
    deadline = time.monotonic() + 5
    while True:
        second.user(user.name)
        try:
            assert second.pass_(user.password) == OK_LOGGED_IN
            break
        except poplib.error_proto as e:
            assert e.args[0] == IN_USE and time.monotonic() < deadline
            time.sleep(0.05)
    assert second.stat()[0] == 1
    second.quit()
    user.login_when_free().quit()


def test_in_use_is_not_an_auth_failure(server):
    user = server.add_user()
    first = user.login()
    c = Raw(server.port)
    for _ in range(4):
        assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
        assert c.cmd(f"PASS {user.password}") == IN_USE + CRLF
    assert c.cmd("CAPA").startswith(b"+OK")
    c.close()
    first.quit()


def test_mail_delivered_during_session_appears_at_next_login(server):
    m1, m2 = message("first"), message("later", "arrived during the session\r\n")
    user = server.add_user(messages=[m1])
    p = user.login()
    assert p.stat() == (1, len(m1))
    path = user.deliver(m2)
    assert p.stat() == (1, len(m1))
    assert len(p.list()[1]) == 1
    assert len(p.uidl()[1]) == 1
    with pytest.raises(poplib.error_proto):
        p.retr(2)
    assert p.quit() == b"+OK Logging out."
    assert path.exists()  # still in new/: nobody logged in since
    p = user.login_when_free()
    assert p.stat() == (2, len(m1) + len(m2))
    assert p.retr(2)[1] == pop3_lines(m2)
    assert p.uidl(2) == b"+OK 2 " + path.name.encode()
    p.quit()


def test_new_messages_move_to_cur_at_login(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    new_names = sorted(os.listdir(user.maildir / "new"))
    assert len(new_names) == 3 and cur_names(user) == []
    # a message already in cur/ keeps its flags and name
    seen = user.deliver(message("seen"))
    seen_cur = user.maildir / "cur" / (seen.name + ":2,S")
    seen.rename(seen_cur)
    p = user.login()
    assert os.listdir(user.maildir / "new") == []
    assert cur_names(user) == sorted([n + ":2," for n in new_names] + [seen_cur.name])
    assert p.stat()[0] == 4
    p.quit()
    assert user.contents() == sorted(msgs + [message("seen")])


def test_uidl_stable_and_equal_to_unique_name(server):
    msgs = three_messages()
    user = server.add_user(messages=msgs)
    user.deliver(message("sized"), sizes_in_name=True)
    names = sorted(os.listdir(user.maildir / "new"))
    uniques = [n.split(",")[0] for n in names]
    p = user.login()
    first = p.uidl()[1]
    p.quit()
    assert first == [b"%d %s" % (i + 1, u.encode()) for i, u in enumerate(uniques)]
    p = user.login_when_free()
    assert p.uidl()[1] == first
    assert p.dele(1) == b"+OK Marked to be deleted."
    p.quit()
    p = user.login_when_free()
    # renumbered, same ids
    assert p.uidl()[1] == [b"%d %s" % (i + 1, u.encode()) for i, u in enumerate(uniques[1:])]
    p.quit()
