"""Hostile input to what logins are checked against (issue 17, items 7 and 10).

The passwd-file: a password, user name or home that ``fastpop user`` would
write with a ``:`` or a line break in it adds fields or lines of the
attacker's choosing (a ``mail=`` into another user's Maildir, a second line
for another user); each attack runs the real ``python -m fastpop user``
(as a web panel letting users pick their passwords would) and then logs in
to a real fastpop.  A line the server cannot parse costs that user only,
never everyone's logins; rewriting the file keeps the operator's comments.

OAuth bearer tokens for the hmac validator: a token whose dates are NaN,
infinite, too large or not numbers is refused, and a token the parser
cannot even read (nested too deep) is an ordinary failed login: the SASL
failure, after the failure delay, counted towards the closing of the
connection; never [SYS/TEMP], never a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support.server import Raw, ServerProcess, message

from fastpop.auth.oauth import make_token
from fastpop.auth.passwd_file import (
    PasswdFile,
    UserRecord,
    format_record,
    parse_line,
    read_records,
    write_records,
)

SECRET = b"the shared secret of test_hostile_auth_files (32+ bytes)"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
LOGGED_IN = b"+OK Logged in.\r\n"
FAILURE_DELAY = 0.3


@pytest.fixture
def srv(tmp_path):
    """A fastpop of the test's own (the tests change or break its passwd-file),
    with the hmac OAuth validator and a failure delay long enough to measure."""
    (tmp_path / "oauth.key").write_bytes(SECRET + b"\n")
    os.chmod(tmp_path / "oauth.key", 0o600)
    s = ServerProcess(tmp_path, "cython", extra_args=[
        "--oauth-validator", "hmac", "--oauth-secret-file", str(tmp_path / "oauth.key"),
        "--auth-failure-delay", str(FAILURE_DELAY)])
    yield s
    if s.proc is not None:
        s.stop()
    log = s.log()
    assert "Traceback" not in log and "RecursionError" not in log, log


def fastpop_user(server: ServerProcess, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    """``python -m fastpop user ...`` on the server's passwd-file, the password on standard input."""
    return subprocess.run(
        [sys.executable, "-m", "fastpop", "user", *args, "--passwd-file", str(server.passwd)],
        input="" if password is None else password + "\n", capture_output=True, text=True, timeout=60,
        cwd=server.root)


def pop_login(server: ServerProcess, name: str, password: str) -> tuple[bytes, Raw]:
    c = Raw(server.port)
    assert c.cmd(f"USER {name}").startswith(b"+OK")
    return c.cmd(("PASS " + password).encode()), c


def stat_after_login(server: ServerProcess, name: str, password: str) -> bytes:
    reply, c = pop_login(server, name, password)
    assert reply == LOGGED_IN, (name, reply)
    stat = c.cmd("STAT")
    c.cmd("QUIT")
    c.close()
    return stat


def login_fails(server: ServerProcess, name: str, password: str) -> None:
    reply, c = pop_login(server, name, password)
    seen = c.cmd("STAT") if reply == LOGGED_IN else b""  # what the attacker would see
    c.close()
    assert reply == AUTH_FAILED, (name, reply, seen)  # an ordinary failure: never [SYS/TEMP]


# ================================================================= passwd-file: writing


def test_plain_password_with_colons_cannot_point_into_another_maildir(srv):
    """The attack of the issue: ``--scheme PLAIN`` with a password that ends
    the field and adds ``mail=`` to alice's Maildir, the attacker's password
    in front.  Refused with a clear message, the file untouched."""
    srv.start()
    alice = srv.add_user(messages=[message("one"), message("two")])
    bob = srv.add_user()
    before = srv.passwd.read_bytes()
    hostile = f"evil::::::mail=maildir:{alice.maildir}"
    res = fastpop_user(srv, "passwd", bob.name, "--scheme", "PLAIN", password=hostile)
    login_fails(srv, bob.name, "evil")  # the old code: logged in, STAT showing alice's 2 messages
    login_fails(srv, bob.name, hostile)
    assert res.returncode == 2, (res.returncode, srv.passwd.read_text())
    assert "cannot contain ':'" in res.stderr and "hashing scheme" in res.stderr, res.stderr
    assert "evil" not in res.stderr + res.stdout  # the password is never echoed
    assert srv.passwd.read_bytes() == before
    assert stat_after_login(srv, bob.name, "secret") == b"+OK 0 0\r\n"  # bob's own, empty Maildir
    assert stat_after_login(srv, alice.name, "secret").startswith(b"+OK 2 ")

    # hashed, the same password is one field like any other: bob gets it, and only his own mail
    res = fastpop_user(srv, "passwd", bob.name, "--scheme", "SSHA256", password=hostile)
    assert res.returncode == 0, res.stderr
    assert len(srv.passwd.read_text().splitlines()) == 2
    assert read_records(str(srv.passwd))[1].extra.keys() == {"scram_sha256"}
    assert stat_after_login(srv, bob.name, hostile) == b"+OK 0 0\r\n"
    login_fails(srv, bob.name, "evil")


def test_carriage_return_in_a_password_cannot_add_a_line_for_another_user(srv):
    """A CR inside the password (``readline`` keeps it) made the old reader
    (universal newlines) see two lines, the second one alice's with the
    attacker's password, and the last line of a user won: account takeover."""
    srv.start()
    alice = srv.add_user(messages=[message()])
    bob = srv.add_user()
    before = srv.passwd.read_bytes()
    for hostile in (f"x\r{alice.name}:{{PLAIN}}pwned", "x\rpwned", "x\x00y", "x\ty", "x\u2028y", "x\x85y"):
        res = fastpop_user(srv, "passwd", bob.name, "--scheme", "PLAIN", password=hostile)
        login_fails(srv, alice.name, "pwned")  # the old code: logged in as alice
        assert res.returncode == 2 and "control characters" in res.stderr, (repr(hostile), res.stderr)
        assert srv.passwd.read_bytes() == before
    assert stat_after_login(srv, alice.name, "secret").startswith(b"+OK 1 ")
    # any such password is fine hashed: one line still, alice untouched
    res = fastpop_user(srv, "passwd", bob.name, "--scheme", "SSHA256", "--no-scram",
                       password=f"x\r{alice.name}:{{PLAIN}}pwned")
    assert res.returncode == 0, res.stderr
    assert srv.passwd.read_bytes().count(b"\r") == 0 and len(srv.passwd.read_bytes().split(b"\n")) == 3
    login_fails(srv, alice.name, "pwned")
    assert stat_after_login(srv, alice.name, "secret").startswith(b"+OK 1 ")


def test_home_with_colons_cannot_add_fields(srv):
    """``--home`` ends its field the same way (a panel may build it from what
    the user typed): refused before the password is even asked for."""
    srv.start()
    alice = srv.add_user(messages=[message()])
    before = srv.passwd.read_bytes()
    for home in (f"/srv/x::mail=maildir:{alice.maildir}", "/srv/x\n" + alice.name + ":{PLAIN}pwned", "/srv/x\ry"):
        res = fastpop_user(srv, "add", "mallory", "--scheme", "SSHA256", "--home", home, password="pw")
        login_fails(srv, "mallory", "pw")  # the old code: mallory in, reading alice's Maildir
        assert res.returncode == 2 and "home directory cannot contain" in res.stderr, (home, res.stderr)
        assert srv.passwd.read_bytes() == before
    login_fails(srv, alice.name, "pwned")


def test_names_starting_with_a_hash_are_refused(srv):
    """``#bob`` would be written as a comment: a user who silently does not exist."""
    srv.start()
    before = srv.passwd.read_bytes()
    for name in ("#bob", "#"):
        res = fastpop_user(srv, "add", name, "--scheme", "SSHA256", password="pw")
        assert res.returncode == 2 and "invalid user name" in res.stderr and "comment" in res.stderr, res.stderr
        assert srv.passwd.read_bytes() == before


def test_rewriting_keeps_comments_blank_and_unreadable_lines_where_they_were(srv):
    srv.start()
    alice, bob = srv.add_user(), srv.add_user(messages=[message()])
    alice_line, bob_line = srv.passwd.read_text().splitlines()
    lines = ["# fastpop users, managed by hand and by `fastpop user`", "", alice_line,
             "  # bob is the boss", bob_line, "mallory:{PLAIN}pa:ss", "", "# end"]
    srv.passwd.write_text("\n".join(lines) + "\n")

    res = fastpop_user(srv, "passwd", bob.name, "--scheme", "SSHA256", password="new pass")
    assert res.returncode == 0, res.stderr
    assert ":6 (user 'mallory'): uid is not a number" in res.stderr  # warned, not silently dropped
    now = srv.passwd.read_text().splitlines()
    assert now[:4] + now[5:] == lines[:4] + lines[5:] and now[4].startswith(f"{bob.name}:{{SSHA256}}")

    assert fastpop_user(srv, "add", "carol", "--scheme", "SSHA256", password="carol pw").returncode == 0
    assert fastpop_user(srv, "del", alice.name).returncode == 0
    now = srv.passwd.read_text().splitlines()
    assert [line for line in now if not line.startswith((bob.name + ":",
                                                         "carol:"))] == lines[:2] + lines[3:4] + lines[5:]
    assert now[-1].startswith("carol:{SSHA256}")

    # the malformed line is the operator's to mend: not guessed at
    res = fastpop_user(srv, "passwd", "mallory", "--scheme", "SSHA256", password="pw")
    assert res.returncode == 1 and ":5: the line of user mallory is malformed" in res.stderr, res.stderr
    assert stat_after_login(srv, bob.name, "new pass").startswith(b"+OK 1 ")
    assert stat_after_login(srv, "carol", "carol pw") == b"+OK 0 0\r\n"
    login_fails(srv, alice.name, "secret")


# ================================================================= passwd-file: reading


def test_a_bad_line_costs_its_user_only(srv):
    """``pa:ss`` stored in clear (as the old ``fastpop user`` did), a Latin-1
    line, a line without a name, a second line for alice: each is logged once
    and skipped; everyone else still logs in, alice with her first line's
    password; the bad lines' users fail as unknown users do, never [SYS/TEMP]."""
    srv.start()
    alice, bob = srv.add_user(messages=[message()]), srv.add_user()
    res = fastpop_user(srv, "passwd", bob.name, "--scheme", "PLAIN", password="pa:ss")
    assert stat_after_login(srv, alice.name, "secret").startswith(b"+OK 1 ")  # the old code: [SYS/TEMP]
    assert res.returncode == 2, res.stderr
    with open(srv.passwd, "ab") as f:
        f.write(b"mallory:{PLAIN}pa:ss\n"           # line 3
                b"carol:{PLAIN}caf\xe9:::Carol Caf\xe9\n"  # 4: not UTF-8
                b":{PLAIN}nameless\n"                # 5
                + f"{alice.name}:{{PLAIN}}second\n".encode()  # 6
                + b"dave:{PLAIN}d\x00ve\n")          # 7
    for _ in range(3):
        assert stat_after_login(srv, alice.name, "secret").startswith(b"+OK 1 ")
        assert stat_after_login(srv, bob.name, "secret") == b"+OK 0 0\r\n"
        login_fails(srv, "mallory", "pa")
        login_fails(srv, "mallory", "pa:ss")
        login_fails(srv, alice.name, "second")
        login_fails(srv, "dave", "d")
    log = srv.log()
    for lineno, what in ((3, "(user 'mallory'): uid is not a number"), (4, "(user 'carol'): not UTF-8"),
                         (5, ": empty user name"), (6, f"(user '{alice.name}'): the user is on line 1 already"),
                         (7, "(user 'dave'): NUL character in the line")):
        assert log.count(f"passwd:{lineno}") == 1, (lineno, log)  # once per load, not once per login
        assert f"passwd:{lineno}{' ' if what.startswith('(') else ''}{what}" in log, (lineno, log)
    assert "pa:ss" not in log and ":ss" not in log and "second" not in log


def test_server_starts_with_a_malformed_line(srv):
    """At start as at a reload: the bad line is skipped (Dovecot does the
    same), the server serves the others."""
    srv.passwd.write_text("alice:{PLAIN}secret:1000:x\nbob:{PLAIN}secret\n")
    srv.start()
    assert stat_after_login(srv, "bob", "secret") == b"+OK 0 0\r\n"
    login_fails(srv, "alice", "secret")
    assert "passwd:1 (user 'alice'): gid is not a number" in srv.log()


# ------------------------------------------------------------- the functions themselves


@pytest.mark.parametrize("rec, field", [
    (UserRecord("bob", "{PLAIN}pa:ss"), "password field cannot contain ':'"),
    (UserRecord("bob", "{PLAIN}x\ny"), "password field cannot contain a newline"),
    (UserRecord("bob", "{PLAIN}x\ry"), "password field cannot contain a newline"),
    (UserRecord("bob", "{PLAIN}x\0y"), "password field cannot contain a newline"),
    (UserRecord("bob", "{PLAIN}x\x85y"), "password field cannot contain a newline"),
    (UserRecord("bob", "{PLAIN}x\u2029y"), "password field cannot contain a newline"),
    (UserRecord("b:ob", "{PLAIN}x"), "user name cannot contain ':'"),
    (UserRecord("bob\nalice", "{PLAIN}x"), "user name cannot contain a newline"),
    (UserRecord("#bob", "{PLAIN}x"), "a line starting with '#'"),
    (UserRecord(" bob", "{PLAIN}x"), "a line starting with '#' or white space"),
    (UserRecord("", "{PLAIN}x"), "empty user name"),
    (UserRecord("bob", "{PLAIN}x", home="/h:x"), "home directory cannot contain ':'"),
    (UserRecord("bob", "{PLAIN}x", home="/h\nx"), "home directory cannot contain a newline"),
    (UserRecord("bob", "{PLAIN}x", uid=-1), "uid must be a number"),
    (UserRecord("bob", "{PLAIN}x", gid=True), "gid must be a number"),
    (UserRecord("bob", "{PLAIN}x", uid="5"), "uid must be a number"),
    (UserRecord("bob", "{PLAIN}x", extra={"mail": "maildir:/a b"}), "extra field mail cannot contain white space"),
    (UserRecord("bob", "{PLAIN}x", extra={"a b": ""}), "name cannot contain white space"),
    (UserRecord("bob", "{PLAIN}x", extra={"a=b": "c"}), "name cannot contain '='"),
    (UserRecord("bob", "{PLAIN}x", extra={"mail": "x\ny"}), "cannot contain a newline"),
])
def test_format_record_refuses_what_would_not_read_back(rec, field):
    with pytest.raises(ValueError) as info:
        format_record(rec)
    assert field in str(info.value)
    assert "pa:ss" not in str(info.value) and "x\ny" not in str(info.value)


def test_what_is_allowed_reads_back():
    from fastpop.auth.passwd_file import check_record

    for rec in (UserRecord("bob", "{PLAIN}p w \u00e9!#=", 0, 0, "/home/b ob",
                           {"userdb_mail": "maildir:/var/mail/b:LAYOUT=fs", "nopassword": ""}),
                UserRecord("a@b.c", "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA")):
        check_record(rec)
        assert parse_line(format_record(rec)) == rec


def test_write_records_refusal_leaves_the_file_untouched(tmp_path):
    path = tmp_path / "passwd"
    path.write_bytes(b"# users\nalice:{PLAIN}a\r\n")
    with pytest.raises(ValueError):
        write_records(str(path), [UserRecord("alice", "{PLAIN}a"), UserRecord("bob", "{PLAIN}b:c")])
    assert path.read_bytes() == b"# users\nalice:{PLAIN}a\r\n"
    assert os.listdir(tmp_path) == ["passwd"]
    # unchanged lines are kept byte for byte (CRLF too); duplicates pair up in order
    path.write_bytes(b"# users\nalice:{PLAIN}a\r\nbob:{PLAIN}1\nbob:{PLAIN}2\n\xff junk\n")
    write_records(str(path), read_records(str(path)))
    assert path.read_bytes() == b"# users\nalice:{PLAIN}a\r\nbob:{PLAIN}1\nbob:{PLAIN}2\n\xff junk\n"
    write_records(str(path), [UserRecord("bob", "{PLAIN}1"), UserRecord("carol", "{PLAIN}c")])
    assert path.read_bytes() == b"# users\nbob:{PLAIN}1\n\xff junk\ncarol:{PLAIN}c\n"


def test_many_bad_lines_are_logged_in_bounded_number(tmp_path, caplog):
    path = tmp_path / "passwd"
    path.write_text("".join(f"u{i}:{{PLAIN}}x:bad\n" for i in range(1000)) + "ok:{PLAIN}y\n")
    with caplog.at_level("ERROR", logger="fastpop.auth"):
        db = PasswdFile(str(path))
        db.lookup("ok")
        db.lookup("u1")
    assert len(db) == 1 and db.lookup("ok").password == "{PLAIN}y"
    assert len(caplog.records) == 21 and caplog.records[-1].getMessage().endswith("980 more lines skipped")


# ================================================================= OAuth bearer tokens


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: bytes, payload: bytes, secret: bytes = SECRET) -> str:
    """A JWT of these exact JSON texts, signed with the server's secret."""
    head, body = b64url(header), b64url(payload)
    return f"{head}.{body}.{b64url(hmac.new(secret, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"


def claims(name: str, **extra) -> bytes:
    now = int(time.time())
    return json.dumps({"sub": name, "iat": now, "exp": now + 600, **extra}).encode()


HS256 = b'{"alg":"HS256","typ":"JWT"}'


def oauth_attempt(c: Raw, mechanism: str, name: str, token: str) -> bytes:
    """One AUTH exchange, the response as a continuation line (RFC 5034 lets
    the client do so whatever its length); the server's final reply."""
    if mechanism == "OAUTHBEARER":
        response = b64(f"n,a={name},\x01host=127.0.0.1\x01port=110\x01auth=Bearer {token}\x01\x01")
        after_error = b64(b"\x01")
    else:
        response, after_error = b64(f"user={name}\x01auth=Bearer {token}\x01\x01"), ""
    assert c.cmd(f"AUTH {mechanism}") == b"+ \r\n"
    reply = c.cmd(response)
    if reply.startswith(b"+ "):  # RFC 7628 error challenge (XOAUTH2 the same), then the failure
        assert b"invalid_token" in base64.b64decode(reply[2:])
        reply = c.cmd(after_error)
    return reply


def non_finite(name: str, claim: str, literal: str) -> bytes:
    """Claims with ``claim`` set to a literal json.dumps would not write (NaN)."""
    now = int(time.time())
    fields = {"sub": json.dumps(name), "iat": str(now), "exp": str(now + 600), claim: literal}
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


BAD_DATES = {
    "exp NaN": lambda n: non_finite(n, "exp", "NaN"),
    "exp Infinity": lambda n: non_finite(n, "exp", "Infinity"),
    "exp 1e999": lambda n: non_finite(n, "exp", "1e999"),
    "exp 10**400": lambda n: non_finite(n, "exp", "1" + "0" * 400),
    "exp string": lambda n: non_finite(n, "exp", '"99999999999"'),
    "exp true": lambda n: non_finite(n, "exp", "true"),
    "exp missing": lambda n: json.dumps({"sub": n}).encode(),
    "nbf NaN": lambda n: non_finite(n, "nbf", "NaN"),
    "nbf string": lambda n: non_finite(n, "nbf", '"now"'),
    "nbf -Infinity": lambda n: non_finite(n, "nbf", "-Infinity"),
    "iat true": lambda n: non_finite(n, "iat", "true"),
    "iat string": lambda n: non_finite(n, "iat", '"yesterday"'),
    "iat next year": lambda n: non_finite(n, "iat", str(int(time.time()) + 365 * 86400)),
    "NaN elsewhere": lambda n: non_finite(n, "x", "NaN"),
}


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_oauth_token_dates_must_be_finite_numbers(srv, mechanism):
    srv.start()
    user = srv.add_user(messages=[message()])
    c = Raw(srv.port)  # the well-formed twin logs in: the refusals below are the dates' doing
    assert oauth_attempt(c, mechanism, user.name, signed(HS256, claims(user.name, nbf=int(time.time())))) == LOGGED_IN
    c.cmd("QUIT")
    for what, make in BAD_DATES.items():
        c = Raw(srv.port)
        assert oauth_attempt(c, mechanism, user.name, signed(HS256, make(user.name))) == AUTH_FAILED, what
        c.close()


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_malformed_tokens_are_ordinary_failed_logins(srv, mechanism):
    """A header nested 3000 deep (RecursionError in the JSON parser), unsigned
    as any client can send it and signed as well, and other garbage: each an
    AUTH failure after the failure delay, counted: the third closes the
    connection, as three wrong passwords do."""
    srv.start()
    user = srv.add_user()
    deep = b"[" * 3000 + b"]" * 3000
    nested_header = b'{"alg":"HS256","x":' + deep + b"}"
    tokens = [
        f"{b64url(deep)}.{b64url(claims(user.name))}.{b64url(os.urandom(32))}",
        signed(nested_header, claims(user.name)),
        signed(HS256, b'{"sub":"' + user.name.encode() + b'","exp":' + deep + b"}"),
        signed(HS256, claims(user.name)) + "!",
        "\u00e9." + signed(HS256, claims(user.name)).split(".", 1)[1],
        signed(b"[]", claims(user.name)),
        signed(HS256, b'"just a string"'),
        signed(HS256, b"\xff\xfe{}"),
        "..",
    ]
    failures = 0
    c = Raw(srv.port)
    for token in tokens:
        start = time.monotonic()
        assert oauth_attempt(c, mechanism, user.name, token) == AUTH_FAILED, token[:80]
        assert time.monotonic() - start >= FAILURE_DELAY * 0.8, token[:80]  # delayed like any failure
        failures += 1
        if failures == 3:  # counted: the default max_attempts closes the connection
            c.assert_closed()
            c = Raw(srv.port)
            failures = 0
    c.close()
    assert srv.log().count("reason=token rejected by the validator") == len(tokens)
    c = Raw(srv.port)
    assert oauth_attempt(c, mechanism, user.name, make_token(SECRET, user.name)) == LOGGED_IN
    c.cmd("QUIT")


# ================================================================= the OAuth secret file


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_an_oauth_secret_others_may_read_is_refused_at_start(tmp_path, mode):
    """The hmac validator's secret signs every token: whoever reads it logs in
    as anyone.  A secret file others may read was used as it was, so a local
    user who read it minted a token for another user and read their mail;
    now the start is refused, naming the file and the chmod that mends it."""
    key = tmp_path / "oauth.key"
    key.write_bytes(SECRET + b"\n")
    os.chmod(key, mode)
    s = ServerProcess(tmp_path, "cython", extra_args=[
        "--oauth-validator", "hmac", "--oauth-secret-file", str(key)])
    victim = s.add_user([message("private")])
    try:
        s.start()
    except (RuntimeError, AssertionError, TimeoutError):
        pass  # refused at start: what must happen
    else:
        try:  # the attack: a token minted with the secret anyone could read
            c = Raw(s.port)
            reply = oauth_attempt(c, "OAUTHBEARER", victim.name, make_token(SECRET, victim.name))
            c.close()
        finally:
            s.stop()
        pytest.fail(f"a server with a world- or group-readable OAuth secret started; the forged login got {reply!r}")
    assert s.proc is not None and s.proc.wait(10) != 0
    assert f"{key} is mode {mode:04o}: others may read it (chmod 600 {key})" in s.log()


def test_a_root_only_oauth_secret_survives_sighup():
    """Started as root with --user nobody: the secret is read before the switch.
    A reload (SIGHUP) runs as nobody, who cannot read it: every reload failed
    ("oauth secret_file: Permission denied"), so no passwd-file or
    certificate change could be applied without a restart.  Now the secret
    read at start is kept (a warning says so) and the reload goes on."""
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="fastpop-oauth-sighup-"))  # (pytest's is below a 0700 directory)
    tmp_path.chmod(0o755)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    key = keys / "oauth.key"
    key.write_bytes(SECRET + b"\n")
    os.chmod(key, 0o600)
    s = ServerProcess(tmp_path, "cython", extra_args=[
        "--user", "nobody", "--oauth-validator", "hmac", "--oauth-secret-file", str(key)])
    alice = s.add_user([message("for alice")])
    for path in (s.mail, *s.mail.rglob("*"), s.passwd):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    s.start()
    try:
        s.add_user([message("for bob")], name="bob-after-reload")
        os.chown(s.mail / "bob-after-reload", nobody.pw_uid, nobody.pw_gid)
        for path in (s.mail / "bob-after-reload").rglob("*"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        os.kill(s.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: configuration" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "SIGHUP: configuration, passwd-file reloaded" in s.log(), s.log()
        assert "not re-read" in s.log()  # and says it kept the secret read at start
        c = Raw(s.port)
        assert oauth_attempt(c, "OAUTHBEARER", alice.name, make_token(SECRET, alice.name)) == LOGGED_IN, s.log()
        c.close()
        import poplib

        box = poplib.POP3("127.0.0.1", s.port, timeout=10)
        box.user("bob-after-reload")
        box.pass_("secret")  # a user added before the SIGHUP: the reload was applied
        assert box.stat()[0] == 1
        box.quit()
    finally:
        s.stop()
        log = s.log()
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert "not reloaded" not in log and "not re-read:" not in log, log
