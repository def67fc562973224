"""AUTH (RFC 5034): PLAIN, LOGIN, SCRAM-SHA-256 (scramp as the client, and
mpop), OAUTHBEARER and XOAUTH2 through the token-validator hook; UTF8
(RFC 6856); [SYS/TEMP] when the user database is unavailable.  Against a real
fastpop, once with each parser (continuation lines go through the parser's
``next_line``)."""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest
from scramp import ScramClient, ScramMechanism
from support.server import PARSERS, ServerProcess, message
from support.tls import Conn, b64, stop_clean, unb64

from fastpop.auth.oauth import make_token
from fastpop.auth.sasl import format_scram_keys, make_scram_keys

SECRET = b"a shared secret of the test suite, 32+ bytes"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
SYS_TEMP = b"-ERR [SYS/TEMP] Authentication service is temporarily unavailable.\r\n"
MECHS = ["PLAIN", "LOGIN", "SCRAM-SHA-256", "OAUTHBEARER", "XOAUTH2"]
CURL = shutil.which("curl")
MPOP = shutil.which("mpop")


def ssha256(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA256}" + base64.b64encode(hashlib.sha256(password.encode() + salt).digest() + salt).decode()


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fastpop-sasl")
    (root / "oauth.key").write_bytes(SECRET + b"\n")
    (root / "oauth.key").chmod(0o600)  # (a secret others may read is refused)
    srv = ServerProcess(root, PARSERS[request.param],
                        extra_args=["--oauth-validator", "hmac", "--oauth-secret-file", str(root / "oauth.key")])
    srv.start()
    yield srv
    stop_clean(srv)


def scram_user(server, password: str = "scram pass", **kw):
    """A user stored as `fastpop user add` stores one: a hash plus scram_sha256 keys."""
    stored = f"{ssha256(password)}::::::scram_sha256={make_scram_keys(password)}"
    return server.add_user(password=password, stored=stored, **kw)


def plain(c: Conn, name: str, password: str, authzid: str = "") -> bytes:
    return c.cmd("AUTH PLAIN " + b64(f"{authzid}\0{name}\0{password}"))


def scram_login(c: Conn, name: str, password: str, initial: bool = True) -> bytes:
    client = ScramClient(["SCRAM-SHA-256"], name, password)
    first = b64(client.get_client_first())
    if initial:
        line = c.cmd("AUTH SCRAM-SHA-256 " + first)
    else:
        assert c.cmd("AUTH SCRAM-SHA-256") == b"+ \r\n"
        line = c.cmd(first)
    client.set_server_first(unb64(line).decode())
    line = c.cmd(b64(client.get_client_final()))
    if not line.startswith(b"+ "):
        return line
    client.set_server_final(unb64(line).decode())  # verifies the server's signature
    return c.cmd("")


# ----------------------------------------------------------------- listing


def test_bare_auth_lists_mechanisms(server):
    c = Conn(server.port)
    c.send(b"AUTH\r\n")
    assert [c.line() for _ in range(len(MECHS) + 2)] == (
        [b"+OK\r\n"] + [m.encode() + b"\r\n" for m in MECHS] + [b".\r\n"])
    assert b"SASL " + " ".join(MECHS).encode() in c.multi("CAPA")
    assert c.cmd("AUTH NOSUCH") == b"-ERR [AUTH] Unsupported authentication mechanism.\r\n"
    assert c.cmd("AUTH PLAIN a b") == b"-ERR Wrong number of arguments.\r\n"
    c.close()


# ----------------------------------------------------------------- PLAIN and LOGIN


def test_plain_initial_response_and_continuation(server):
    user = server.add_user(messages=[message()])
    c = Conn(server.port)
    assert plain(c, user.name, user.password) == b"+OK Logged in.\r\n"
    assert c.cmd("STAT") == b"+OK 1 %d\r\n" % len(message())
    assert c.cmd("QUIT").startswith(b"+OK")
    c = Conn(server.port)
    assert c.cmd("auth plain") == b"+ \r\n"  # keywords are case-insensitive
    assert c.cmd(b64(f"{user.name}\0{user.name}\0{user.password}")) == b"+OK Logged in.\r\n"  # authzid = authcid
    assert c.cmd("QUIT").startswith(b"+OK")


def test_auth_pipelined_with_its_continuation_and_commands(server):
    """PIPELINING: AUTH, its answer and the next commands in one packet."""
    user = server.add_user(messages=[message()])
    c = Conn(server.port)
    c.send(f"AUTH PLAIN\r\n{b64(chr(0) + user.name + chr(0) + user.password)}\r\nSTAT\r\nQUIT\r\n".encode())
    assert c.line() == b"+ \r\n"
    assert c.line() == b"+OK Logged in.\r\n"
    assert c.line() == b"+OK 1 %d\r\n" % len(message())
    assert c.line().startswith(b"+OK Logging out")
    c = Conn(server.port)
    c.send(f"AUTH LOGIN {b64(user.name)}\r\n{b64('wrong')}\r\nCAPA\r\n".encode())
    assert unb64(c.line()) == b"Password:"
    assert c.line() == AUTH_FAILED
    assert c.line() == b"+OK Capability list follows\r\n"
    c.close()


def test_plain_failures(server):
    user = server.add_user()
    other = server.add_user()
    c = Conn(server.port)
    assert plain(c, user.name, "wrong") == AUTH_FAILED
    assert plain(c, user.name, user.password, authzid=other.name) == AUTH_FAILED  # no proxy logins
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN " + b64("no nul at all")) == AUTH_FAILED
    assert c.cmd("AUTH PLAIN =") == AUTH_FAILED  # an empty initial response is an empty message
    assert c.cmd("AUTH PLAIN " + b64(f"\0{user.name}\0")) == AUTH_FAILED  # an empty password
    c.close()
    log = server.log()
    assert f"auth failed rip=127.0.0.1 user={user.name} mech=PLAIN reason=wrong password or unknown user" in log
    assert "reason=authorization identity differs" in log


def test_login_mechanism(server):
    user = server.add_user()
    c = Conn(server.port)
    assert unb64(c.cmd("AUTH LOGIN")) == b"Username:"
    assert unb64(c.cmd(b64(user.name))) == b"Password:"
    assert c.cmd(b64(user.password)) == b"+OK Logged in.\r\n"
    c.cmd("QUIT")
    c = Conn(server.port)
    assert unb64(c.cmd("AUTH LOGIN " + b64(user.name))) == b"Password:"
    assert c.cmd(b64("nope")) == AUTH_FAILED
    c.close()


def test_star_cancels(server):
    user = server.add_user()
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    assert c.cmd("*") == b"-ERR [AUTH] Authentication cancelled.\r\n"
    assert unb64(c.cmd("AUTH LOGIN")) == b"Username:"
    assert unb64(c.cmd(b64(user.name))) == b"Password:"
    assert c.cmd("*") == b"-ERR [AUTH] Authentication cancelled.\r\n"
    client = ScramClient(["SCRAM-SHA-256"], user.name, user.password)
    assert c.cmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first())).startswith(b"+ ")
    assert c.cmd("*") == b"-ERR [AUTH] Authentication cancelled.\r\n"
    # cancelling is not a failed login: the session logs in afterwards
    assert plain(c, user.name, user.password) == b"+OK Logged in.\r\n"
    c.cmd("QUIT")


# ----------------------------------------------------------------- SCRAM-SHA-256


def test_scram_with_stored_keys(server):
    user = scram_user(server, messages=[message()])
    c = Conn(server.port)
    assert scram_login(c, user.name, user.password) == b"+OK Logged in.\r\n"
    assert c.cmd("STAT") == b"+OK 1 %d\r\n" % len(message())
    c.cmd("QUIT")
    c = Conn(server.port)
    assert scram_login(c, user.name, user.password, initial=False) == b"+OK Logged in.\r\n"
    c.cmd("QUIT")
    # the same user also logs in with PLAIN (the hash beside the keys)
    c = Conn(server.port)
    assert plain(c, user.name, user.password) == b"+OK Logged in.\r\n"
    c.cmd("QUIT")


def test_scram_with_plaintext_and_dovecot_scram_passwords(server):
    clear = server.add_user()  # {PLAIN}: keys derived on the fly
    salt, stored, key, i = ScramMechanism("SCRAM-SHA-256").make_auth_info("dove pw", 4096)
    dovecot = server.add_user(password="dove pw", stored="{SCRAM-SHA-256}" + format_scram_keys(salt, stored, key, i))
    for user in (clear, dovecot):
        c = Conn(server.port)
        assert scram_login(c, user.name, user.password) == b"+OK Logged in.\r\n", user.name
        c.cmd("QUIT")
    # a {SCRAM-SHA-256} password also verifies USER/PASS and PLAIN
    c = Conn(server.port)
    assert c.cmd(f"USER {dovecot.name}") == b"+OK\r\n"
    assert c.cmd("PASS dove pw") == b"+OK Logged in.\r\n"
    c.cmd("QUIT")


def test_scram_failures(server):
    user = scram_user(server)
    hash_only = server.add_user(password="hashed", stored=ssha256("hashed"))
    c = Conn(server.port)
    assert scram_login(c, user.name, "wrong") == AUTH_FAILED
    assert scram_login(c, hash_only.name, "hashed") == AUTH_FAILED  # no keys: cannot do SCRAM
    c = Conn(server.port)
    # An unknown user gets a server-first like anyone (no user enumeration),
    # with the same salt every time, and fails only at the proof.
    salts = set()
    for _ in range(2):
        client = ScramClient(["SCRAM-SHA-256"], "nobody-at-all", "x")
        line = c.cmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
        server_first = unb64(line).decode()
        salts.add(dict(kv.split("=", 1) for kv in server_first.split(","))["s"])
        client.set_server_first(server_first)
        assert c.cmd(b64(client.get_client_final())) == AUTH_FAILED
    assert len(salts) == 1
    c = Conn(server.port)
    assert c.cmd("AUTH SCRAM-SHA-256 " + b64("n,a=other,n=x,r=abc")) == AUTH_FAILED  # authzid
    assert c.cmd("AUTH SCRAM-SHA-256 " + b64("p=tls-unique,,n=x,r=abc")) == AUTH_FAILED  # channel binding
    c.close()


@pytest.mark.external
@pytest.mark.skipif(MPOP is None, reason="mpop is not installed")
def test_mpop_scram_sha256_without_tls(server, tmp_path):
    """mpop (GNU SASL) logs in with SCRAM-SHA-256 on loopback without TLS:
    the password never crosses the wire."""
    user = scram_user(server, messages=[message("one"), message("two")])
    maildir = tmp_path / "maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    conf = tmp_path / "mpoprc"
    conf.write_text(
        f"defaults\naccount test\nhost 127.0.0.1\nport {server.port}\ntimeout 30\ntls off\n"
        f"auth scram-sha-256\nuser {user.name}\npassword {user.password}\n"
        f"delivery maildir {maildir}\nkeep off\nuidls_file {tmp_path / 'uidls'}\n"
    )
    conf.chmod(0o600)
    (tmp_path / "home").mkdir()
    res = subprocess.run([MPOP, "-C", str(conf), "--debug", "test"], capture_output=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    assert b"--> AUTH SCRAM-SHA-256" in res.stdout
    assert user.password.encode() not in res.stdout
    assert len(list((maildir / "new").iterdir()) + list((maildir / "cur").iterdir())) == 2
    assert user.files() == []


GSASL = ctypes.util.find_library("gsasl")


def gsasl_scram(c: Conn, authid: str, password: str, authzid: str | None) -> bytes:
    """SCRAM-SHA-256 by GNU SASL (libgsasl, through ctypes), set up as mutt does:
    the authzid is the account's user (mutt_sasl_gnu.c), so the client-first is
    "n,a=USER,n=USER,r=...".  Returns the server's last line."""
    lib = ctypes.CDLL(GSASL)
    ctx, session, out = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    assert lib.gsasl_init(ctypes.byref(ctx)) == 0
    try:
        assert lib.gsasl_client_start(ctx, b"SCRAM-SHA-256", ctypes.byref(session)) == 0
        for prop, value in ((1, authid), (2, authzid), (3, password)):  # GSASL_AUTHID, _AUTHZID, _PASSWORD
            if value is not None:
                lib.gsasl_property_set(session, prop, value.encode())
        line, step = b"+ ", 0
        while line.startswith(b"+ "):
            rc = lib.gsasl_step64(session, line[2:].strip(), ctypes.byref(out))
            assert rc in (0, 1), f"gsasl_step64: {rc}"  # GSASL_OK, GSASL_NEEDS_MORE
            data = ctypes.string_at(out).decode()
            lib.gsasl_free(out)
            if step == 0:
                if authzid is not None:
                    assert base64.b64decode(data).startswith(f"n,a={authzid},n={authid},".encode())
                line = c.cmd("AUTH SCRAM-SHA-256 " + data)
            else:
                line = c.cmd(data)  # the client-final; then "" after the server-final (verified by gsasl)
            step += 1
        return line
    finally:
        if session:
            lib.gsasl_finish(session)
        lib.gsasl_done(ctx)


@pytest.mark.skipif(GSASL is None, reason="libgsasl is not installed (apt-get install -y libgsasl18)")
def test_gnu_sasl_scram_with_authzid_as_mutt_sends(server):
    """mutt's default SCRAM-SHA-256 login (GNU SASL, authzid = user) logs in;
    before, any authzid was refused (mutt then waited the failure delay, fed the
    penalty and fell back; with pop_authenticators=scram-sha-256 it could not log in)."""
    for user in (scram_user(server, messages=[message()]), server.add_user(password="clear pw")):
        c = Conn(server.port)
        assert gsasl_scram(c, user.name, user.password, authzid=user.name) == b"+OK Logged in.\r\n", user.name
        assert c.cmd("STAT").startswith(b"+OK")
        c.cmd("QUIT")
        c.close()
    user = scram_user(server)
    c = Conn(server.port)
    assert gsasl_scram(c, user.name, user.password, authzid=None) == b"+OK Logged in.\r\n"  # as mpop does
    c.cmd("QUIT")
    other = server.add_user()
    c = Conn(server.port)
    assert gsasl_scram(c, user.name, user.password, authzid=other.name) == AUTH_FAILED  # someone else: refused
    assert gsasl_scram(c, user.name, "wrong", authzid=user.name) == AUTH_FAILED
    c.close()


# ----------------------------------------------------------------- OAUTHBEARER and XOAUTH2


def oauthbearer(name: str | None, token: str, extra: str = "") -> str:
    authzid = f"a={name}" if name else ""
    return b64(f"n,{authzid},\x01host=127.0.0.1\x01port=110\x01auth=Bearer {token}\x01{extra}\x01")


def xoauth2(name: str, token: str) -> str:
    return b64(f"user={name}\x01auth=Bearer {token}\x01\x01")


def auth(c: Conn, mechanism: str, response: str) -> bytes:
    """AUTH with an initial response when the line fits in 255 octets; else,
    as RFC 5034 requires of clients, the response as a continuation."""
    line = f"AUTH {mechanism} {response}"
    if len(line) + 2 <= 255:
        return c.cmd(line)
    assert c.cmd(f"AUTH {mechanism}") == b"+ \r\n"
    return c.cmd(response)


def test_long_initial_response_is_a_long_line(server):
    user = server.add_user()
    c = Conn(server.port)
    response = oauthbearer(user.name, make_token(SECRET, user.name), extra="x=" + "y" * 100 + "\x01")
    assert len(response) > 255
    assert c.cmd(f"AUTH OAUTHBEARER {response}") == b"-ERR Line too long.\r\n"
    assert auth(c, "OAUTHBEARER", response) == b"+OK Logged in.\r\n"
    c.cmd("QUIT")


def test_oauth_tokens(server):
    user = server.add_user(messages=[message()])
    other = server.add_user()
    token = make_token(SECRET, user.name)
    for mech, response in (("OAUTHBEARER", oauthbearer(user.name, token)), ("OAUTHBEARER", oauthbearer(None, token)),
                           ("XOAUTH2", xoauth2(user.name, token))):
        c = Conn(server.port)
        assert auth(c, mech, response) == b"+OK Logged in.\r\n", (mech, response)
        assert c.cmd("STAT").startswith(b"+OK 1 ")
        c.cmd("QUIT")

    bad_tokens = {
        "expired": make_token(SECRET, user.name, ttl=-3600),
        "other user's": make_token(SECRET, other.name),
        "wrong key": make_token(b"another secret of sufficient size", user.name),
        "garbage": "not.a.token",
    }
    for what, bad in bad_tokens.items():
        c = Conn(server.port)
        err = auth(c, "OAUTHBEARER", oauthbearer(user.name, bad))
        assert b'"status": "invalid_token"' in unb64(err), what  # RFC 7628 error challenge
        assert c.cmd(b64(b"\x01")) == AUTH_FAILED, what
        err = auth(c, "XOAUTH2", xoauth2(user.name, bad))
        assert unb64(err).startswith(b"{"), what
        assert c.cmd("") == AUTH_FAILED, what
        c.close()
    # a token for a user the passwd-file does not have
    c = Conn(server.port)
    assert unb64(auth(c, "XOAUTH2", xoauth2("ghost", make_token(SECRET, "ghost")))).startswith(b"{")
    assert c.cmd("*") == AUTH_FAILED  # even "*" after the error challenge ends a failed attempt
    c.close()


def test_oauth_token_cli(server):
    user = server.add_user()
    res = subprocess.run([sys.executable, "-m", "fastpop", "oauth", "token", user.name, "--ttl", "60",
                          "--secret-file", str(server.root / "oauth.key")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    c = Conn(server.port)
    assert auth(c, "XOAUTH2", xoauth2(user.name, res.stdout.strip())) == b"+OK Logged in.\r\n"
    c.cmd("QUIT")


def test_oauth_not_offered_without_validator(tmp_path):
    srv = ServerProcess(tmp_path, "cython")
    srv.start()
    try:
        c = Conn(srv.port)
        assert b"SASL PLAIN LOGIN SCRAM-SHA-256" in c.multi("CAPA")
        assert c.cmd("AUTH XOAUTH2") == b"-ERR [AUTH] Unsupported authentication mechanism.\r\n"
        c.close()
    finally:
        stop_clean(srv)


VALIDATOR_MODULE = '''
import asyncio

async def validate(request):
    await asyncio.sleep(0.01)
    if request.token == "explode":
        raise RuntimeError("introspection endpoint down")
    if request.token.startswith("good-"):
        return request.token[len("good-"):]
    return None
'''

CHECKER_SCRIPT = '''
import os, sys
token = sys.stdin.readline().strip()
if token == "let-me-in-" + os.environ["FASTPOP_OAUTH_USER"]:
    print(os.environ["FASTPOP_OAUTH_USER"])
else:
    sys.exit(1)
'''


@pytest.mark.parametrize("kind", ["module", "command"])
def test_custom_validators(tmp_path, kind):
    if kind == "module":
        (tmp_path / "my_tokens.py").write_text(VALIDATOR_MODULE)  # the server runs in tmp_path
        args = ["--oauth-validator", "my_tokens:validate"]
    else:
        (tmp_path / "check.py").write_text(CHECKER_SCRIPT)
        args = ["--oauth-validator", "command", "--oauth-command", f"{sys.executable} {tmp_path / 'check.py'}"]
    srv = ServerProcess(tmp_path, "cython", extra_args=args)
    srv.start()
    try:
        user = srv.add_user()
        good = f"good-{user.name}" if kind == "module" else f"let-me-in-{user.name}"
        c = Conn(srv.port)
        assert c.cmd(f"AUTH XOAUTH2 {xoauth2(user.name, good)}") == b"+OK Logged in.\r\n"
        c.cmd("QUIT")
        c = Conn(srv.port)
        assert unb64(c.cmd(f"AUTH OAUTHBEARER {oauthbearer(user.name, 'bad')}")).startswith(b"{")
        assert c.cmd(b64(b"\x01")) == AUTH_FAILED
        if kind == "module":  # the hook failing is the backend being unavailable
            assert c.cmd(f"AUTH OAUTHBEARER {oauthbearer(user.name, 'explode')}") == SYS_TEMP
        c.close()
    finally:
        rc = srv.stop()
        assert rc == 0
    assert "Traceback" not in srv.log()


@pytest.mark.external
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_login_and_oauth2_bearer(server):
    user = server.add_user(messages=[message("one")])
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LC_ALL": "C"}
    url = f"pop3://127.0.0.1:{server.port}/1"
    base = [CURL, "-q", "-sS", "-v", "--max-time", "60", "--noproxy", "*"]
    res = subprocess.run(base + ["-u", f"{user.name}:{user.password}", "--login-options", "AUTH=LOGIN", url],
                         capture_output=True, timeout=60, env=env)
    assert res.returncode == 0 and res.stdout == message("one"), res.stderr.decode(errors="replace")
    assert b"> AUTH LOGIN" in res.stderr
    token = make_token(SECRET, user.name)
    res = subprocess.run(base + ["-u", f"{user.name}:", "--oauth2-bearer", token, url],
                         capture_output=True, timeout=60, env=env)
    assert res.returncode == 0 and res.stdout == message("one"), res.stderr.decode(errors="replace")
    assert b"> AUTH OAUTHBEARER" in res.stderr


# ----------------------------------------------------------------- UTF8 (RFC 6856)


def test_utf8_user_names_and_saslprep_passwords(server):
    user = server.add_user(name="jörg-" + os.urandom(3).hex(), password="pass word", messages=[message()])
    c = Conn(server.port)
    assert b"UTF8" in c.multi("CAPA")
    # before UTF8 a non-ASCII command line is refused by the parser
    assert c.cmd(f"USER {user.name}".encode()) == b"-ERR Invalid characters in command.\r\n"
    assert c.cmd("UTF8") == b"+OK UTF8 enabled.\r\n"
    assert c.cmd(f"USER {user.name}".encode()) == b"+OK\r\n"
    # U+00A0 NO-BREAK SPACE maps to a space under SASLprep (RFC 4013)
    assert c.cmd("PASS pass\u00a0word".encode()) == b"+OK Logged in.\r\n"
    assert c.cmd("UTF8") == b"-ERR Command not valid in this state.\r\n"
    c.cmd("QUIT")
    # SASL carries UTF-8 anyway: no UTF8 command needed
    c = Conn(server.port)
    assert plain(c, user.name, "pass\u2003word") == b"+OK Logged in.\r\n"  # EM SPACE, also mapped
    c.cmd("QUIT")
    c = Conn(server.port)
    assert scram_login(c, user.name, "pass word") == b"+OK Logged in.\r\n"
    c.cmd("QUIT")
    c = Conn(server.port)
    assert c.cmd("UTF8 x") == b"-ERR Wrong number of arguments.\r\n"
    c.close()


# ----------------------------------------------------------------- [SYS/TEMP]


@pytest.mark.parametrize("parser", ["cython"])
def test_sys_temp_when_user_database_unavailable(tmp_path, parser):
    srv = ServerProcess(tmp_path, parser)
    srv.start()
    try:
        user = srv.add_user()
        os.replace(srv.passwd, tmp_path / "passwd.away")
        (tmp_path / "passwd").mkdir()  # reading it now fails with an OSError
        c = Conn(srv.port)
        assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
        assert c.cmd(f"PASS {user.password}") == SYS_TEMP
        assert plain(c, user.name, user.password) == SYS_TEMP
        client = ScramClient(["SCRAM-SHA-256"], user.name, user.password)
        assert c.cmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first())) == SYS_TEMP
        (tmp_path / "passwd").rmdir()
        os.replace(tmp_path / "passwd.away", srv.passwd)
        time.sleep(0.05)
        assert plain(c, user.name, user.password) == b"+OK Logged in.\r\n"  # [SYS/TEMP] is no failure
        c.cmd("QUIT")
    finally:
        stop_clean(srv)


def test_validator_names_from_before_the_auth_package_still_load():
    """Configurations written when the module was fastpop.oauth keep working."""
    from fastpop.auth.oauth import command_validator, hmac_validator, load_validator

    assert load_validator("fastpop.oauth:hmac_validator") is hmac_validator
    assert load_validator("fastpop.oauth:command_validator") is command_validator
    assert load_validator("hmac") is hmac_validator
    with pytest.raises(ValueError):
        load_validator("fastpop.nosuchmodule:validator")
