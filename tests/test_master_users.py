"""Master users (Dovecot's ``auth_master_user_separator``): an administrator
logs in as a user with the master's own password, ``USER alice*admin`` or
AUTH PLAIN with authzid alice and authcid admin (RFC 4616).  Masters come
only from ``[auth] master_passwd_file``; the feature is off without it.

Against a real fastpop over loopback (poplib and raw lines), each weakness
attacked: a wrong master password, a normal user used as a master, the
separator without a master file, a master past the target's own
restrictions.  The pure parts (the name split, the penalty's name, the
PLAIN forms) are unit tests that drive fastpop.auth.sasl's generators."""

from __future__ import annotations

import poplib
import re

import pytest
from support.server import PARSERS, ServerProcess, message, serving
from support.tls import Conn, b64, wait_for_log

from fastpop.auth import sasl
from fastpop.auth.passwd_file import UserRecord
from fastpop.config import Config

AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
MASTER_PW = "master secret"


# ================================================================ unit: the sasl exchanges, driven by hand


class FakeServices:
    """sasl.Services answering from dicts at once (no I/O: the generators are pure)."""

    def __init__(self, users: dict[str, str], masters: dict[str, str] | None, separator: str = "*") -> None:
        self.users, self.masters, self.separator = users, masters, separator
        self.secret = b"s" * 32

    @property
    def master_separator(self) -> str | None:
        return self.separator if self.masters is not None else None

    def valid_username(self, name: str) -> bool:
        from fastpop.auth.authenticator import valid_username

        return valid_username(name)

    def lookup(self, name: str) -> UserRecord | None:
        return UserRecord(name, self.users[name]) if name in self.users else None

    def verify_password(self, name: str, password: str) -> UserRecord | None:
        return UserRecord(name, password) if self.users.get(name) == password else None

    def verify_master(self, name: str, password: str) -> UserRecord | None:
        assert self.masters is not None
        return UserRecord(name, password) if self.masters.get(name) == password else None


def drive(exchange) -> tuple[sasl.Outcome, list]:
    """Run an exchange that needs no client line; the steps it yielded and its outcome."""
    steps = []
    try:
        step = next(exchange)
        while True:
            steps.append(step)
            assert type(step) in (sasl.Gate, sasl.Hold), step
            step = exchange.send(None)
    except StopIteration as stop:
        return stop.value, steps


USERS = {"alice": "alice pw", "bob": "bob pw", "x*y": "star pw"}


@pytest.mark.unit
def test_split_master_uses_the_last_separator_and_only_when_on():
    assert sasl.split_master("alice*admin", "*") == ("alice", "admin")
    assert sasl.split_master("a*b*admin", "*") == ("a*b", "admin")
    assert sasl.split_master("alice", "*") is None
    assert sasl.split_master("alice*admin", None) is None  # off: just a name
    assert sasl.penalty_name("alice*admin", "*") == "*admin" == sasl.penalty_name("bob*admin", "*")
    assert sasl.penalty_name("alice*admin", None) == "alice*admin"
    assert sasl.penalty_name("alice", "*") == "alice"


@pytest.mark.unit
def test_master_login_outcomes():
    svc = FakeServices(USERS, {"admin": MASTER_PW})
    out, steps = drive(sasl.password_login(svc, "alice*admin", MASTER_PW))
    assert out.record is not None and out.record.name == "alice" and out.master == "admin"
    assert steps == [sasl.Gate("*admin")]
    # spreading guesses over users: every one is counted against the master
    for target in ("alice", "bob", "nobody"):
        out, steps = drive(sasl.password_login(svc, f"{target}*admin", "guess"))
        assert out.record is None and steps == [sasl.Gate("*admin")] and out.user == f"{target}*admin"
        assert out.reason.startswith("master: wrong password")
    # the user's own password is not the master's
    assert drive(sasl.password_login(svc, "alice*admin", "alice pw"))[0].record is None
    # a normal user is no master, even with its right password
    assert drive(sasl.password_login(svc, "alice*bob", "bob pw"))[0].record is None
    # no such target
    out, _ = drive(sasl.password_login(svc, "nobody*admin", MASTER_PW))
    assert out.record is None and out.reason == "master: no such user to log in as"
    # empty parts, empty password
    for name in ("*admin", "alice*", "*"):
        out, steps = drive(sasl.password_login(svc, name, MASTER_PW))
        assert out.record is None and steps == [sasl.Gate(None)], name
    assert drive(sasl.password_login(svc, "alice*admin", ""))[0].record is None
    # while masters are on, a name holding the separator is never an ordinary login
    assert drive(sasl.password_login(svc, "x*y", "star pw"))[0].record is None


@pytest.mark.unit
def test_separator_is_just_a_name_when_masters_are_off():
    svc = FakeServices(USERS, None)
    out, steps = drive(sasl.password_login(svc, "x*y", "star pw"))
    assert out.record is not None and out.record.name == "x*y" and out.master is None
    assert steps == [sasl.Gate("x*y")]
    assert drive(sasl.password_login(svc, "alice*admin", MASTER_PW))[0].record is None


@pytest.mark.unit
def test_plain_authzid_is_the_user_authcid_the_master():
    on, off = FakeServices(USERS, {"admin": MASTER_PW}), FakeServices(USERS, None)
    out, _ = drive(sasl.plain(on, b"alice\0admin\0" + MASTER_PW.encode()))
    assert out.record is not None and out.record.name == "alice" and out.master == "admin"
    # the credentials as USER alice*admin gives them: a relay logs in to a backend the same way
    assert out.credentials == drive(sasl.password_login(on, "alice*admin", MASTER_PW))[0].credentials
    assert out.credentials == b"alice*admin\0" + MASTER_PW.encode()
    out, _ = drive(sasl.plain(off, b"alice\0admin\0" + MASTER_PW.encode()))
    assert out.record is None and out.reason == "authorization identity differs (not supported)"
    # a normal user's credentials acting as another user
    assert drive(sasl.plain(on, b"alice\0bob\0bob pw"))[0].record is None
    # separators inside the PLAIN form: refused, never re-split
    out, _ = drive(sasl.plain(on, b"alice\0bob*admin\0" + MASTER_PW.encode()))
    assert out.record is None and out.malformed
    # authzid equal to authcid: an ordinary login, as before
    assert drive(sasl.plain(on, b"alice\0alice\0alice pw"))[0].record is not None
    # the separator form inside authcid works as with USER
    out, _ = drive(sasl.plain(on, b"\0alice*admin\0" + MASTER_PW.encode()))
    assert out.master == "admin"


@pytest.mark.unit
def test_separator_setting_is_checked():
    for bad in ("", "**", "a", "@", ".", "-", " ", "/"):
        config = Config(passwd_file="/dev/null", auth_master_separator=bad)
        with pytest.raises(ValueError, match="master_separator"):
            config._validate_security()
    Config(passwd_file="/dev/null", auth_master_separator="%")._validate_security()


# ================================================================ e2e: a real fastpop


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fastpop-masters")
    (root / "masters").write_text(f"admin:{{PLAIN}}{MASTER_PW}\n"
                                  f"netadmin:{{PLAIN}}{MASTER_PW}::::::allow_nets=10.9.0.0/16\n")
    yield from serving(ServerProcess(root, PARSERS[request.param],
                                     extra_args=["--auth-master-passwd-file", str(root / "masters")]))


def login(srv: ServerProcess, name: str, password: str) -> bytes:
    c = Conn(srv.port)
    try:
        c.cmd(f"USER {name}")
        reply = c.cmd(f"PASS {password}")
        if reply.startswith(b"+OK"):
            c.cmd("QUIT")
        return reply
    finally:
        c.close()


def failure_logged(srv: ServerProcess, name: str) -> str:
    found = re.findall(rf"auth failed rip=127\.0\.0\.1 user={re.escape(name)} mech=(?:USER|PLAIN) reason=(.*)",
                       srv.log())
    assert found, srv.log()[-2000:]
    return found[-1]


def test_master_logs_in_as_the_user_with_user_pass(server):
    alice = server.add_user([message("for alice")], password="alice pw")
    p = server.connect()
    p.user(f"{alice.name}*admin")
    assert p.pass_(MASTER_PW).startswith(b"+OK")
    assert p.stat() == (1, len(message("for alice")))
    assert b"for alice" in b"\r\n".join(p.retr(1)[1])
    p.quit()
    assert f"login user={alice.name} master=admin rip=127.0.0.1" in server.log()
    wait_for_log(server, rf"session user={alice.name} master=admin rip=127\.0\.0\.1 .* end=quit")
    assert alice.login().stat()[0] == 1  # the user's own login still works (and the mail is there)


def test_master_logs_in_with_plain_authzid(server):
    alice = server.add_user([message("plain")], password="alice pw")
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN " + b64(f"{alice.name}\0admin\0{MASTER_PW}")).startswith(b"+OK")
    assert c.cmd("STAT").startswith(b"+OK 1 ")
    c.cmd("QUIT")
    c.close()
    assert f"login user={alice.name} master=admin" in server.log()
    c = Conn(server.port)  # LOGIN (draft-murchison-sasl-login) takes the user*master form, as USER does
    assert c.cmd("AUTH LOGIN " + b64(f"{alice.name}*admin")).startswith(b"+ ")
    assert c.cmd(b64(MASTER_PW)).startswith(b"+OK")
    c.cmd("QUIT")
    c.close()


def test_wrong_master_password_fails_and_names_the_attempt(server):
    alice = server.add_user(password="alice pw")
    assert login(server, f"{alice.name}*admin", "not the master's") == AUTH_FAILED
    assert failure_logged(server, f"{alice.name}*admin").startswith("master: wrong password")
    # the user's own password is not a master's
    assert login(server, f"{alice.name}*admin", "alice pw") == AUTH_FAILED


def test_a_normal_user_cannot_act_as_a_master(server):
    alice = server.add_user(password="alice pw")
    mallory = server.add_user(password="mallory pw")
    assert login(server, f"{alice.name}*{mallory.name}", "mallory pw") == AUTH_FAILED
    assert failure_logged(server, f"{alice.name}*{mallory.name}").startswith("master: wrong password")
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN " + b64(f"{alice.name}\0{mallory.name}\0mallory pw")) == AUTH_FAILED
    c.close()
    # and a master is not a user: "admin" logs in as nobody
    assert login(server, "admin", MASTER_PW) == AUTH_FAILED


def test_master_login_to_no_such_user_fails(server):
    assert login(server, "nosuchuser*admin", MASTER_PW) == AUTH_FAILED
    assert failure_logged(server, "nosuchuser*admin") == "master: no such user to log in as"


def test_master_never_bypasses_the_targets_restrictions(server):
    """POP3 off or logins off for the user: the master is refused as the user is."""
    for extra in ("nopop3", "allow_pop3=no", "nologin", "allow_nets=10.0.0.0/8"):
        user = server.add_user(password="pw", stored=f"{{PLAIN}}pw::::::{extra}")
        assert login(server, f"{user.name}*admin", MASTER_PW) == AUTH_FAILED, extra
        reason = failure_logged(server, f"{user.name}*admin")
        assert not reason.startswith("master:") and ("pop3" in reason or "nologin" in reason
                                                     or "allow_nets" in reason), reason


def test_masters_own_allow_nets_applies(server):
    alice = server.add_user(password="alice pw")
    assert login(server, f"{alice.name}*netadmin", MASTER_PW) == AUTH_FAILED
    assert failure_logged(server, f"{alice.name}*netadmin") == "master: network not allowed for the user (allow_nets)"


def test_master_and_user_sessions_share_the_mailbox_lock(server):
    alice = server.add_user(password="alice pw")
    own = alice.login()
    p = server.connect()
    p.user(f"{alice.name}*admin")
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        p.pass_(MASTER_PW)
    p.close()
    own.quit()


def test_separator_without_a_master_file_is_just_a_name(tmp_path):
    """Feature off: ``*`` is a character of user names, no master login exists."""
    srv = ServerProcess(tmp_path, "cython")
    srv.start()
    try:
        starred = srv.add_user(password="star pw", name="team*lead")
        alice = srv.add_user(password="alice pw")
        srv.add_user(password=MASTER_PW, name="admin")  # a user named like a master: still only a user
        assert login(srv, "team*lead", "star pw").startswith(b"+OK")
        assert login(srv, f"{alice.name}*admin", MASTER_PW) == AUTH_FAILED
        assert login(srv, f"{alice.name}*{starred.name}", "star pw") == AUTH_FAILED
        c = Conn(srv.port)
        assert c.cmd("AUTH PLAIN " + b64(f"{alice.name}\0admin\0{MASTER_PW}")) == AUTH_FAILED
        c.close()
        assert "reason=authorization identity differs (not supported)" in srv.log()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_master_lines_in_json_logs(tmp_path):
    """The structured formats read key=value pairs from the format strings: master is a field of its own."""
    import json

    (tmp_path / "masters").write_text(f"admin:{{PLAIN}}{MASTER_PW}\n")
    srv = ServerProcess(tmp_path, "cython", extra_args=["--auth-master-passwd-file", str(tmp_path / "masters"),
                                                         "--log-format", "json"])
    srv.start()
    try:
        alice = srv.add_user(password="alice pw")
        assert login(srv, f"{alice.name}*admin", MASTER_PW).startswith(b"+OK")
        assert login(srv, f"{alice.name}*admin", "wrong") == AUTH_FAILED
        wait_for_log(srv, r'"event": ?"session"')
        wait_for_log(srv, r'"event": ?"auth failed"')
    finally:
        assert srv.stop() == 0
    lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    by_event = {line.get("event"): line for line in lines}
    assert by_event["login"]["user"] == alice.name and by_event["login"]["master"] == "admin"
    assert by_event["session"]["user"] == alice.name and by_event["session"]["master"] == "admin"
    assert by_event["auth failed"]["user"] == f"{alice.name}*admin"


def test_guesses_spread_over_users_are_penalised_against_the_master(tmp_path):
    """The attack: guess a master's password from many addresses, naming a
    different user each time.  The per-user penalty counts them all against
    the master, so a fresh address and a fresh user still wait."""
    import ssl
    import time

    from support.tls import Certs, TLSServer

    (tmp_path / "masters").write_text(f"admin:{{PLAIN}}{MASTER_PW}\n")
    certs = Certs(tmp_path / "certs")
    srv = TLSServer(tmp_path, "cython", certs, ["--auth-master-passwd-file", str(tmp_path / "masters"),
                                                "--trusted-networks", "none", "--auth-penalty-initial", "1",
                                                "--auth-penalty-max", "2"])
    srv.start()
    ctx: ssl.SSLContext = certs.client_context()

    def attempt(source: str, name: str, password: str) -> tuple[bytes, float]:
        c = Conn(srv.tls_port, tls=ctx, source=source)
        try:
            c.cmd(f"USER {name}")
            started = time.monotonic()
            return c.cmd(f"PASS {password}"), time.monotonic() - started
        finally:
            c.close()

    try:
        users = [srv.add_user(password="pw") for _ in range(3)]
        assert attempt("127.0.0.21", f"{users[0].name}*admin", "guess 1")[0] == AUTH_FAILED
        assert attempt("127.0.0.22", f"{users[1].name}*admin", "guess 2")[0] == AUTH_FAILED
        reply, waited = attempt("127.0.0.23", f"{users[2].name}*admin", MASTER_PW)
        assert reply.startswith(b"+OK")
        assert waited >= 1.5, f"a third guess at the master, from a fresh address and user, waited only {waited:.2f} s"
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_a_master_file_others_may_write_is_refused(tmp_path):
    """Whoever can write the masters' file can make a master: fastpop does not start on one."""
    import os
    import subprocess
    import sys

    masters = tmp_path / "masters"
    masters.write_text(f"admin:{{PLAIN}}{MASTER_PW}\n")
    (tmp_path / "passwd").write_text("")
    (tmp_path / "late.toml").write_text('[server]\nlog_format = "nonesuch"\n')  # checked after the masters' file
    for mode, refused in ((0o666, True), (0o620, True), (0o600, False), (0o644, False)):
        os.chmod(masters, mode)
        out = subprocess.run([sys.executable, "-m", "fastpop", "serve", "--passwd-file", str(tmp_path / "passwd"),
                              "--auth-master-passwd-file", str(masters), "--config", str(tmp_path / "late.toml")],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out
        assert refused or "log_format" in out.stderr, out.stderr
        assert ("others may write it" in out.stderr) == refused, (oct(mode), out.stderr)


def test_login_delay_paces_the_user_not_the_master(server):
    """A support login neither waits for the user's LOGIN-DELAY nor makes the user's client wait."""
    user = server.add_user(password="pw", stored="{PLAIN}pw::::::login_delay=3600")
    assert login(server, f"{user.name}*admin", MASTER_PW).startswith(b"+OK")
    assert login(server, user.name, "pw").startswith(b"+OK"), "the master's login made the user wait"
    assert login(server, f"{user.name}*admin", MASTER_PW).startswith(b"+OK"), "the master waited for LOGIN-DELAY"
    assert login(server, user.name, "pw").startswith(b"-ERR [LOGIN-DELAY]")  # the user's own pace holds


def test_masters_file_is_reread_when_it_changes(server):
    """A master added (or removed) takes effect at once, as a user in the passwd-file does."""
    alice = server.add_user(password="alice pw")
    masters = server.root / "masters"
    before = masters.read_text()
    assert login(server, f"{alice.name}*helpdesk", "helpdesk pw") == AUTH_FAILED
    masters.write_text(before + "helpdesk:{PLAIN}helpdesk pw\n")
    try:
        assert login(server, f"{alice.name}*helpdesk", "helpdesk pw").startswith(b"+OK")
    finally:
        masters.write_text(before)
    assert login(server, f"{alice.name}*helpdesk", "helpdesk pw") == AUTH_FAILED
