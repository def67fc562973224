"""Hostile logins (issue 17, items 3, 4 and 5, and the mutt SCRAM authzid), each
an attack on a real fastpop over TCP on 127.0.0.1:

- a malformed APOP digest (after UTF8: ``APOP bob é``, or not 32 hex digits)
  is an ordinary failed login: ``-ERR [AUTH]`` after the failure delay,
  counted toward the attempt cap, penalised, no ERROR line, the same for
  existing users with clear-text passwords, hashed ones and unknown names;
- a password that is empty (``{PLAIN}``, or any stored hash or SCRAM keys of
  the empty string) never logs in, by any mechanism: APOP, SCRAM-SHA-256
  (password "" or one SASLprep maps to ""), PLAIN, LOGIN (NUL: bcrypt's key
  of "" is NULs), USER/PASS;
- APOP is off unless configured: no timestamp in the greeting (RFC 1939 4:
  that is what offers APOP; RFC 2449 has no APOP capability, CAPA lists none
  either way), APOP answered as an unknown command; ``--apop`` or
  ``[auth] apop = true`` turns it on;
- SCRAM-SHA-256 with an authorization identity equal to the user (GNU SASL's
  ``n,a=USER,n=USER,...``, as mutt sends) logs in; a different one does not.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import bcrypt
import pytest
from support.server import PARSERS, ServerProcess
from support.tls import Conn, b64, stop_clean, unb64, wait_for_log

from fastpop.auth.sasl import make_scram_keys

# The flag that turns APOP on.  (To run these tests against a fastpop from
# before it existed, set this to [] in a copy: APOP was always on then.)
APOP = ["--apop"]

AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
LOGGED_IN = b"+OK Logged in.\r\n"
UNKNOWN = b"-ERR Unknown command.\r\n"
DELAY = 0.25  # --auth-failure-delay
PENALTY = 0.25  # --auth-penalty-initial (and max: the second failure waits this long more)


def ssha256(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA256}" + base64.b64encode(hashlib.sha256(password.encode() + salt).digest() + salt).decode()


def stamp_of(c: Conn) -> bytes:
    m = re.search(rb"<[^>]+>", c.greeting)
    assert m, c.greeting
    return m.group(0)


def apop(c: Conn, name: str, password: str) -> bytes:
    return c.cmd(f"APOP {name} {hashlib.md5(stamp_of(c) + password.encode()).hexdigest()}")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def scram(c: Conn, authcid: str, password: str, authzid: str | None = None, prep: bool = True) -> bytes:
    """A SCRAM-SHA-256 client written out (RFC 5802), so the gs2-header can carry an
    authzid as GNU SASL's does; returns the server's last line."""
    if prep:
        from scramp.utils import saslprep

        password = saslprep(password)
    escape = lambda s: s.replace("=", "=3D").replace(",", "=2C")  # noqa: E731
    gs2 = "n,," if authzid is None else f"n,a={escape(authzid)},"
    bare = f"n={escape(authcid)},r={base64.b64encode(os.urandom(18)).decode()}"
    line = c.cmd("AUTH SCRAM-SHA-256 " + b64(gs2 + bare))
    if not line.startswith(b"+ "):
        return line
    server_first = unb64(line).decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = _hmac(salted, b"Client Key")
    without_proof = f"c={b64(gs2)},r={attrs['r']}"
    auth_msg = f"{bare},{server_first},{without_proof}".encode()
    signature = _hmac(hashlib.sha256(client_key).digest(), auth_msg)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    line = c.cmd(b64(without_proof + ",p=" + b64(proof)))
    if not line.startswith(b"+ "):
        return line
    expected = "v=" + b64(_hmac(_hmac(salted, b"Server Key"), auth_msg))
    assert unb64(line).decode() == expected, "the server's signature does not verify"
    return c.cmd("")


def plain(c: Conn, name: str, password: str) -> bytes:
    return c.cmd("AUTH PLAIN " + b64(f"\0{name}\0{password}"))


def login_mech(c: Conn, name: str, password: str) -> bytes:
    assert unb64(c.cmd("AUTH LOGIN " + b64(name))) == b"Password:"
    return c.cmd(b64(password))


def user_pass(c: Conn, name: str, password: str) -> bytes:
    assert c.cmd("UTF8") == b"+OK UTF8 enabled.\r\n"
    assert c.cmd(f"USER {name}") == b"+OK\r\n"
    return c.cmd(f"PASS {password}")


def no_errors(srv: ServerProcess) -> None:
    log = srv.log()
    assert " ERROR " not in log and "failed with an error" not in log, log[-3000:]


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    """APOP on; 127.0.0.1 trusted (plaintext logins), other loopback addresses not, so
    penalties apply there (each test from addresses of its own)."""
    srv = ServerProcess(tmp_path_factory.mktemp("fastpop-hostile-auth"), PARSERS[request.param], extra_args=[
        *APOP, "--trusted-networks", "127.0.0.1/32", "--auth-failure-delay", str(DELAY),
        "--auth-penalty-initial", str(PENALTY), "--auth-penalty-max", str(PENALTY),
        "--max-connections-per-ip", "0", "--log-level", "info",
    ])
    srv.start()
    yield srv
    stop_clean(srv)


_sources = iter(range(10, 250))


def source() -> str:
    """A loopback address no earlier attempt was counted against."""
    return f"127.0.17.{next(_sources)}"


# ----------------------------------------------------------------- item 3: malformed APOP digests


MALFORMED = ["é", "xyz", "0" * 31, "0" * 33, "g" * 32, "\uff10" * 32, "0" * 30 + "é", "-" * 32]


def test_malformed_apop_digest_is_an_ordinary_failed_login(server):
    """Before: an existing user with a clear-text password answered ``APOP bob é``
    at once with [SYS/TEMP] (unknown users: [AUTH] after the delay), counted no
    failure (the 3-attempt close never came) and logged an ERROR each time."""
    clear = server.add_user(password="clear one")
    hashed = server.add_user(password="hashed one", stored=ssha256("hashed one"))
    names = {"clear-text": clear.name, "hashed": hashed.name, "unknown": "nobody-" + clear.name}
    digests = iter(MALFORMED * 3)
    timings: dict[str, list[float]] = {}
    for kind, name in names.items():
        c = Conn(server.port, source=source())
        assert c.cmd("UTF8") == b"+OK UTF8 enabled.\r\n"
        for _attempt in range(3):
            digest = next(digests)
            started = time.monotonic()
            reply = c.cmd(f"APOP {name} {digest}")
            elapsed = time.monotonic() - started
            assert reply == AUTH_FAILED, (kind, digest, reply)
            timings.setdefault(kind, []).append(elapsed)
        assert c.read_to_eof() == b"", kind  # the third failure closes: each was counted
        c.close()
    for kind, (first, second, third) in timings.items():
        assert first >= DELAY * 0.9, (kind, timings)  # after the failure delay
        assert second >= DELAY + PENALTY * 0.9, (kind, timings)  # and the penalty of the first failure
        assert third >= DELAY + PENALTY * 0.9, (kind, timings)
    for name in names.values():  # an ordinary failure's log line, for every kind of user
        assert len(re.findall(rf"auth failed rip=127\.0\.17\.\d+ user={re.escape(name)} ", server.log())) >= 3
    no_errors(server)
    # the right digest still works for the same users afterwards (another address)
    c = Conn(server.port, source=source())
    assert apop(c, clear.name, clear.password) == LOGGED_IN
    c.cmd("QUIT")


def test_malformed_apop_digest_is_penalised_per_user(server):
    """Failures with malformed digests feed the per-user penalty, as wrong ones do."""
    victim = server.add_user(password="victim's")
    for digest in ("é", "zz"):
        c = Conn(server.port, source=source())
        assert c.cmd("UTF8") == b"+OK UTF8 enabled.\r\n"
        assert c.cmd(f"APOP {victim.name} {digest}") == AUTH_FAILED
        c.close()
    c = Conn(server.port, source=source())  # a fresh address: only the user's count delays it
    started = time.monotonic()
    assert apop(c, victim.name, victim.password) == LOGGED_IN
    assert time.monotonic() - started >= PENALTY * 0.9
    c.cmd("QUIT")
    no_errors(server)


# ----------------------------------------------------------------- item 4: empty passwords


def empty_users(srv: ServerProcess) -> dict:
    stored = {
        "PLAIN": "{PLAIN}",
        "SSHA256": ssha256(""),
        "BLF-CRYPT": "{BLF-CRYPT}" + bcrypt.hashpw(b"", bcrypt.gensalt(4)).decode(),
        "scram_sha256 keys": f"{ssha256('')}::::::scram_sha256={make_scram_keys('')}",
        "SCRAM-SHA-256": "{SCRAM-SHA-256}" + make_scram_keys(""),
    }
    return {kind: srv.add_user(password="", stored=value) for kind, value in stored.items()}


# (mechanism, what the client sends as the password): all mean "empty"
ATTEMPTS = [
    ("APOP", ""),
    ("SCRAM-SHA-256", ""),
    ("SCRAM-SHA-256", "\u00ad"),  # SASLprep maps the soft hyphen to nothing
    ("PLAIN", "\u00ad"),
    ("PLAIN", "\u200b"),
    ("LOGIN", "\u00ad"),
    ("LOGIN", "\0"),  # bcrypt's key of "" is NULs: "\0" matched it
    ("USER", "\u00ad"),
]


def attempt(c: Conn, mechanism: str, name: str, password: str) -> bytes:
    if mechanism == "APOP":
        return apop(c, name, password)
    if mechanism == "SCRAM-SHA-256":
        return scram(c, name, password)
    if mechanism == "PLAIN":
        return plain(c, name, password)
    if mechanism == "LOGIN":
        return login_mech(c, name, password)
    return user_pass(c, name, password)


def test_empty_password_never_logs_in(server):
    """Before: a {PLAIN} (empty) user logged in over APOP and SCRAM-SHA-256, and
    over PLAIN, LOGIN and USER/PASS with a password SASLprep maps to nothing;
    a bcrypt hash of "" let LOGIN in with a NUL."""
    users = empty_users(server)

    def one(kind: str, user, mechanism: str, password: str):
        c = Conn(server.port)  # trusted: plaintext mechanisms allowed
        try:
            return kind, mechanism, password, attempt(c, mechanism, user.name, password)
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:  # each failure waits the failure delay: side by side
        results = list(pool.map(lambda args: one(*args), [
            (kind, user, mechanism, password) for kind, user in users.items() for mechanism, password in ATTEMPTS]))
    assert len(results) == len(users) * len(ATTEMPTS)
    assert [r for r in results if r[3] != AUTH_FAILED] == []
    no_errors(server)


def test_empty_password_failures_are_ordinary(server):
    """Counted (the third closes the connection), answered after the failure
    delay, logged as a failed login."""
    user = server.add_user(password="", stored="{PLAIN}")
    c = Conn(server.port, source=source())
    for mechanism, password in (("APOP", ""), ("SCRAM-SHA-256", ""), ("APOP", "")):
        started = time.monotonic()
        assert attempt(c, mechanism, user.name, password) == AUTH_FAILED
        assert time.monotonic() - started >= DELAY * 0.9
    assert c.read_to_eof() == b""
    assert len(re.findall(rf"auth failed rip=\S+ user={user.name} ", server.log())) >= 3
    no_errors(server)


def test_mechanisms_work_for_a_real_password(server):
    """The same clients log in with a non-empty password (the failures above are the
    empty password's, not the clients')."""
    users = {
        "PLAIN": server.add_user(password="pässword"),
        "scram_sha256 keys": server.add_user(
            password="pässword", stored=f"{ssha256('pässword')}::::::scram_sha256={make_scram_keys('pässword')}"),
    }
    for kind, user in users.items():
        for mechanism in ("APOP", "SCRAM-SHA-256", "PLAIN", "LOGIN", "USER"):
            if mechanism == "APOP" and kind != "PLAIN":
                continue
            c = Conn(server.port)
            assert attempt(c, mechanism, user.name, user.password) == LOGGED_IN, (kind, mechanism)
            c.cmd("QUIT")
            c.close()


# ----------------------------------------------------------------- the mutt (GNU SASL) authzid


def test_scram_authzid_equal_to_the_user_logs_in(server):
    """mutt's SCRAM-SHA-256 (GNU SASL) sends n,a=USER,n=USER,...: that is the user
    asking for their own identity.  Before: refused, after the failure delay."""
    for stored in ("{PLAIN}mutt pw", f"{ssha256('mutt pw')}::::::scram_sha256={make_scram_keys('mutt pw')}"):
        user = server.add_user(password="mutt pw", stored=stored)
        c = Conn(server.port, source=source())
        assert scram(c, user.name, user.password, authzid=user.name) == LOGGED_IN, stored
        c.cmd("QUIT")
        c.close()
    odd = server.add_user(name=f"a=b{os.getpid()}", password="odd pw")  # "=" escaped as =3D on both sides
    c = Conn(server.port, source=source())
    assert scram(c, odd.name, odd.password, authzid=odd.name) == LOGGED_IN
    c.cmd("QUIT")


def test_scram_other_authzid_is_refused(server):
    user = server.add_user(password="mutt pw")
    other = server.add_user(password="other pw")
    c = Conn(server.port, source=source())
    assert scram(c, user.name, user.password, authzid=other.name) == AUTH_FAILED
    assert scram(c, user.name, "wrong", authzid=user.name) == AUTH_FAILED  # a right authzid is no password
    c.close()
    c = Conn(server.port, source=source())
    # a malformed gs2-header ("b=" is no authzid; a bad escape) fails cleanly
    for header in ("n,b=x,", f"n,a={user.name}=2,"):
        assert c.cmd("AUTH SCRAM-SHA-256 " + b64(header + f"n={user.name},r=abcdefghijklmnop")) == AUTH_FAILED
    c.close()
    no_errors(server)


# ----------------------------------------------------------------- item 5: APOP off by default


@pytest.mark.parametrize("parser", ["cython"])
def test_apop_is_off_by_default(tmp_path, parser):
    """Before: every greeting carried an APOP timestamp and APOP logged in."""
    srv = ServerProcess(tmp_path, parser)
    srv.start()
    try:
        user = srv.add_user(password="clear")
        c = Conn(srv.port)
        assert c.greeting == b"+OK fastpop ready.\r\n"  # no <timestamp>: APOP is not offered
        capa = c.multi("CAPA")
        assert not any(line.upper().startswith(b"APOP") for line in capa), capa
        digest = hashlib.md5(b"<1.1@x>" + user.password.encode()).hexdigest()
        assert c.cmd(f"APOP {user.name} {digest}") == UNKNOWN
        assert c.cmd(f"APOP {user.name}") == UNKNOWN  # whatever its arguments
        assert c.cmd(f"USER {user.name}") == b"+OK\r\n"  # the session goes on
        assert c.cmd(f"PASS {user.password}") == LOGGED_IN
        c.cmd("QUIT")
        assert "auth failed" not in srv.log()  # not a login attempt at all
    finally:
        stop_clean(srv)


@pytest.mark.parametrize("parser", ["cython"])
def test_apop_on_by_config_file(tmp_path, parser):
    config = tmp_path / "fastpop.toml"
    config.write_text("[auth]\napop = true\n")
    srv = ServerProcess(tmp_path, parser, extra_args=["--config", str(config)])
    srv.start()
    try:
        user = srv.add_user(password="clear")
        c = Conn(srv.port)
        assert re.fullmatch(rb"\+OK fastpop ready\. <\d+\.\d+\.[0-9a-f]+@[^>]+>\r\n", c.greeting), c.greeting
        capa = c.multi("CAPA")
        assert not any(line.upper().startswith(b"APOP") for line in capa), capa  # RFC 2449 has none
        assert apop(c, user.name, user.password) == LOGGED_IN
        c.cmd("QUIT")
        # turned off by SIGHUP: new connections get no timestamp; one greeted before keeps it
        before = Conn(srv.port)
        config.write_text("[auth]\napop = false\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_log(srv, r"SIGHUP: configuration")
        c = Conn(srv.port)
        assert c.greeting == b"+OK fastpop ready.\r\n"
        assert c.cmd(f"APOP {user.name} {'0' * 32}") == UNKNOWN
        assert apop(before, user.name, user.password) == LOGGED_IN
        before.cmd("QUIT")
    finally:
        stop_clean(srv)


def test_apop_setting_parses():
    from fastpop.cli import build_parser, config_from_args
    from fastpop.config import Config

    assert Config().auth_apop is False
    assert config_from_args(build_parser().parse_args(["serve"])).auth_apop is False
    assert config_from_args(build_parser().parse_args(["serve", "--apop"])).auth_apop is True
