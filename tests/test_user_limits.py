"""Limits that fit ISPs: exemptions from the per-address cap by network
(``max_connections_per_ip_exempt``: carrier-grade NAT, webmail, fetchers),
and per-user restrictions from the user database (Dovecot's ``allow_nets``
and ``nologin``, POP3 off for a user: ``allow_pop3=no``, ``pop3=no``,
``nopop3``), with the passwd-file and SQLite.

A login the user's fields forbid fails exactly as a wrong password does
(RFC 3206's [AUTH] covers "an attempt to authenticate in violation of
policy (such as from an invalid location)"): whoever holds the password
learns nothing; only the log names the reason.  Loopback addresses other
than 127.0.0.1 stand in for clients from other networks."""

from __future__ import annotations

import hashlib
import re
import socket
import sqlite3
import time

import pytest
from support.server import PARSERS, ServerProcess, message, serving
from support.tls import Conn, b64, wait_for_log

from fastpop.auth.passwd_file import UserRecord
from fastpop.auth.userdb import flag, login_refusal, record_from_row
from fastpop.config import Config

AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
FROM_ADDRESS = b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"


# ================================================================ unit


def rec(**extra: str) -> UserRecord:
    return UserRecord("alice", "{PLAIN}pw", extra=dict(extra))


@pytest.mark.unit
def test_login_refusal_reasons():
    assert login_refusal(rec(), "192.0.2.1") is None
    assert login_refusal(rec(nologin=""), "192.0.2.1") == "login disabled for the user (nologin)"
    for fields in ({"nopop3": ""}, {"nopop3": "y"}, {"allow_pop3": "no"}, {"pop3": "no"}, {"pop3": "0"}):
        assert login_refusal(rec(**fields), "192.0.2.1") == "pop3 disabled for the user", fields
    for fields in ({"nopop3": "0"}, {"nopop3": "no"}, {"allow_pop3": "yes"}, {"pop3": "1"}, {"nologin": "N"}):
        assert login_refusal(rec(**fields), "192.0.2.1") is None, fields
    nets = rec(allow_nets="192.0.2.0/24,2001:db8::/32 10.1.2.3")
    for ip in ("192.0.2.77", "2001:db8::5", "10.1.2.3", "::ffff:192.0.2.9"):
        assert login_refusal(nets, ip) is None, ip
    for ip in ("192.0.3.1", "2001:db9::1", "10.1.2.4", "-"):
        assert login_refusal(nets, ip) == "network not allowed for the user (allow_nets)", ip
    # fail closed: an empty or broken list opens the account to nobody, not to everybody
    assert login_refusal(rec(allow_nets=""), "192.0.2.1") == "network not allowed for the user (allow_nets)"
    assert login_refusal(rec(allow_nets="192.0.2.0/33"), "192.0.2.1") == "allow_nets unusable"
    assert login_refusal(rec(allow_nets="local"), "192.0.2.1") == "allow_nets unusable"


@pytest.mark.unit
def test_sql_columns_are_the_same_fields():
    row = {"user": "alice", "password": "{PLAIN}pw", "userdb_allow_nets": "10.0.0.0/8", "nopop3": None,
           "nologin": "Y"}
    record = record_from_row("alice", row)
    assert record.extra == {"allow_nets": "10.0.0.0/8", "nologin": "Y"}
    assert flag(record, "nologin") and not flag(record, "nopop3")
    assert login_refusal(record, "10.0.0.1") == "login disabled for the user (nologin)"


@pytest.mark.unit
def test_exempt_networks_setting_is_checked(tmp_path):
    config = Config(max_connections_per_ip_exempt=["100.64.0.0/10", "2001:db8::/48"])
    config._validate_security()
    with pytest.raises(ValueError, match="max_connections_per_ip_exempt"):
        Config(max_connections_per_ip_exempt=["100.64.0.0/99"])._validate_security()
    from fastpop.config import load_toml

    (tmp_path / "f.toml").write_text('[auth]\nmax_connections_per_ip_exempt = "100.64.0.0/10"\n'
                                     'master_passwd_file = "/etc/fastpop/masters"\n')
    loaded = load_toml(str(tmp_path / "f.toml"))
    assert loaded.max_connections_per_ip_exempt == ["100.64.0.0/10"]
    assert loaded.auth_master_passwd_file == "/etc/fastpop/masters"


# ================================================================ e2e: the per-address cap's exemptions


def greeting(port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, data


def test_exempt_networks_have_no_per_address_cap(tmp_path):
    srv = ServerProcess(tmp_path, "cython", extra_args=[
        "--workers", "2", "--trusted-networks", "none", "--max-connections-per-ip", "2",
        "--max-connections-per-ip-exempt", "127.0.0.64/26,10.0.0.0/8", "--apop"])
    srv.start()
    try:
        nat = [greeting(srv.port, "127.0.0.70") for _ in range(8)]  # a carrier-grade NAT's address
        assert all(line.startswith(b"+OK") for _, line in nat), [line for _, line in nat]
        other = [greeting(srv.port, "127.0.0.5") for _ in range(4)]  # everyone else keeps the cap
        assert [line.startswith(b"+OK") for _, line in other].count(True) == 2
        assert {line for _, line in other if not line.startswith(b"+OK")} == {FROM_ADDRESS}
        for s, _ in nat + other:
            s.close()
        # exempt from the cap, not from penalties: a failure delays the next attempt
        user = srv.add_user(password="pw")
        c = ConnFrom(srv.port, "127.0.0.71")
        stamp = c.greeting.split()[-1].decode()
        assert c.cmd(f"APOP {user.name} {'0' * 32}") == AUTH_FAILED
        started = time.monotonic()
        assert c.cmd(f"APOP {user.name} {hashlib.md5((stamp + 'pw').encode()).hexdigest()}").startswith(b"+OK")
        assert time.monotonic() - started >= 1.5, "the penalty (2 s after a failure) should apply to exempt addresses"
        c.cmd("QUIT")
        c.close()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_exempt_networks_change_on_sighup(tmp_path):
    import signal

    conf = tmp_path / "fastpop.toml"
    conf.write_text('[auth]\nmax_connections_per_ip = 1\ntrusted_networks = []\n')
    srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(conf)])
    srv.start()
    held = []
    try:
        held += [greeting(srv.port, "127.0.0.80") for _ in range(2)]
        assert [line for _, line in held][1] == FROM_ADDRESS
        conf.write_text('[auth]\nmax_connections_per_ip = 1\ntrusted_networks = []\n'
                        'max_connections_per_ip_exempt = ["127.0.0.80/32"]\n')
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_log(srv, "SIGHUP: configuration")
        more = [greeting(srv.port, "127.0.0.80") for _ in range(3)]
        held += more
        assert all(line.startswith(b"+OK") for _, line in more), [line for _, line in more]
        for s, _ in held:  # the connection counted before the reload is released as counted
            s.close()
        time.sleep(0.3)
        conf.write_text('[auth]\nmax_connections_per_ip = 1\ntrusted_networks = []\n')
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_log(srv, "(?s)SIGHUP: configuration.*SIGHUP: configuration")
        again = [greeting(srv.port, "127.0.0.80") for _ in range(2)]
        held += again
        assert [line.startswith(b"+OK") for _, line in again] == [True, False], "the cap is back, and counts right"
    finally:
        for s, _ in held:
            s.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


class ConnFrom(Conn):
    """A raw POP3 connection from a chosen loopback address."""

    def __init__(self, port: int, source: str, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.buf = bytearray()
        self.greeting = self.line()


# ================================================================ e2e: the user's own restrictions


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    yield from serving(ServerProcess(tmp_path_factory.mktemp("fastpop-userlimits"), PARSERS[request.param]))


def login_from(srv: ServerProcess, source: str, name: str, password: str, plain: bool = False) -> bytes:
    c = ConnFrom(srv.port, source)
    try:
        if plain:
            reply = c.cmd("AUTH PLAIN " + b64(f"\0{name}\0{password}"))
        else:
            c.cmd(f"USER {name}")
            reply = c.cmd(f"PASS {password}")
        if reply.startswith(b"+OK"):
            c.cmd("QUIT")
        return reply
    finally:
        c.close()


def test_allow_nets_from_the_passwd_file(server):
    user = server.add_user([message("x")], password="pw", stored="{PLAIN}pw::::::allow_nets=127.0.0.2/32,10.0.0.0/8")
    assert login_from(server, "127.0.0.2", user.name, "pw").startswith(b"+OK")
    # the attacker with the password, from elsewhere: the reply of a wrong password
    assert login_from(server, "127.0.0.3", user.name, "pw") == AUTH_FAILED
    assert login_from(server, "127.0.0.3", user.name, "wrong") == AUTH_FAILED
    assert login_from(server, "127.0.0.3", user.name, "pw", plain=True) == AUTH_FAILED
    wait_for_log(server, rf"auth failed rip=127\.0\.0\.3 user={user.name} mech=USER "
                         r"reason=network not allowed for the user \(allow_nets\)")
    assert login_from(server, "127.0.0.2", user.name, "pw", plain=True).startswith(b"+OK")


@pytest.mark.parametrize("field", ["nopop3", "pop3=no", "allow_pop3=no", "nologin"])
def test_pop3_disabled_for_a_user(server, field):
    user = server.add_user([message("x")], password="pw", stored=f"{{PLAIN}}pw::::::{field}")
    assert login_from(server, "127.0.0.1", user.name, "pw") == AUTH_FAILED
    assert login_from(server, "127.0.0.1", user.name, "pw", plain=True) == AUTH_FAILED
    reason = "login disabled for the user (nologin)" if field == "nologin" else "pop3 disabled for the user"
    wait_for_log(server, rf"auth failed rip=127\.0\.0\.1 user={user.name} mech=PLAIN reason={re.escape(reason)}")
    assert not any((user.maildir / "cur").iterdir()), "nothing of the mailbox was touched"


def test_a_refusal_answers_when_a_wrong_password_does(server):
    """Timing tells a right password from a wrong one no more than the reply does."""
    user = server.add_user(password="pw", stored="{PLAIN}pw::::::nopop3")
    times = {}
    for password in ("pw", "wrong"):
        started = time.monotonic()
        assert login_from(server, "127.0.0.1", user.name, password) == AUTH_FAILED
        times[password] = time.monotonic() - started
    assert min(times.values()) >= 0.04 and abs(times["pw"] - times["wrong"]) < 0.5, times


# ================================================================ e2e: the same fields from SQLite


def test_restrictions_from_sqlite(tmp_path):
    path = tmp_path / "users.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT, allow_nets TEXT, allow_pop3 TEXT)")
    db.executemany("INSERT INTO users VALUES (?, ?, ?, ?)", [
        ("free", "{PLAIN}pw", None, None),
        ("office", "{PLAIN}pw", "127.0.0.2/32", None),
        ("imaponly", "{PLAIN}pw", None, "0"),
    ])
    db.commit()
    db.close()
    (tmp_path / "fastpop.toml").write_text(f"""
[userdb]
driver = "sqlite"
connect = "{path}"
password_query = "SELECT userid AS user, password, allow_nets, allow_pop3 FROM users WHERE userid = '%u'"
""")
    srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(tmp_path / "fastpop.toml")])
    srv.start()
    try:
        assert login_from(srv, "127.0.0.1", "free", "pw").startswith(b"+OK")
        assert login_from(srv, "127.0.0.2", "office", "pw").startswith(b"+OK")
        assert login_from(srv, "127.0.0.1", "office", "pw") == AUTH_FAILED
        assert login_from(srv, "127.0.0.1", "imaponly", "pw") == AUTH_FAILED
        log = wait_for_log(srv, r"user=imaponly mech=USER reason=pop3 disabled for the user").string
        assert "user=office mech=USER reason=network not allowed for the user (allow_nets)" in log
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()



# ================================================================ e2e: PostgreSQL and LDAP (support.userdb_servers)


def _restricted_logins(srv: ServerProcess, free: str, office: str, disabled: str) -> None:
    """The same three users in any database: no restriction, allow_nets 127.0.0.2/32, POP3 off."""
    assert login_from(srv, "127.0.0.1", free, "pw").startswith(b"+OK")
    assert login_from(srv, "127.0.0.2", office, "pw").startswith(b"+OK")
    assert login_from(srv, "127.0.0.1", office, "pw") == AUTH_FAILED
    assert login_from(srv, "127.0.0.1", disabled, "pw") == AUTH_FAILED
    assert login_from(srv, "127.0.0.1", disabled, "pw", plain=True) == AUTH_FAILED
    log = wait_for_log(srv, rf"user={disabled} mech=PLAIN reason=pop3 disabled for the user").string
    assert f"user={office} mech=USER reason=network not allowed for the user (allow_nets)" in log


def test_restrictions_from_postgresql(tmp_path):
    """Boolean columns as flags: a nopop3 column false is no restriction, true is."""
    from support.userdb_servers import PostgresServer

    why = PostgresServer.available()
    if why:
        pytest.skip(why)
    db = PostgresServer()
    try:
        db.sql("CREATE TABLE isp (userid TEXT PRIMARY KEY, password TEXT, allow_nets TEXT, nopop3 BOOLEAN);"
               "INSERT INTO isp VALUES ('pgfree', '{PLAIN}pw', NULL, false), "
               "('pgoffice', '{PLAIN}pw', '127.0.0.2/32', false), ('pgoff', '{PLAIN}pw', NULL, true);")
        (tmp_path / "fastpop.toml").write_text(f"""
[userdb]
driver = "postgresql"
connect = "{db.dsn}"
password_query = "SELECT userid AS user, password, allow_nets, nopop3 FROM isp WHERE userid = '%u'"
""")
        srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(tmp_path / "fastpop.toml")])
        srv.start()
        try:
            _restricted_logins(srv, "pgfree", "pgoffice", "pgoff")
        finally:
            assert srv.stop() == 0
        assert "Traceback" not in srv.log()
    finally:
        db.close()


def test_restrictions_from_ldap(tmp_path):
    """Attributes mapped to the fields with [ldap] attrs."""
    from support.userdb_servers import SlapdServer

    why = SlapdServer.available()
    if why:
        pytest.skip(why)
    db = SlapdServer()
    try:
        db.add_user("ldfree", "pw", stored="{PLAIN}pw")
        db.add_user("ldoffice", "pw", stored="{PLAIN}pw", attributes={"departmentNumber": "127.0.0.2/32"})
        db.add_user("ldoff", "pw", stored="{PLAIN}pw", attributes={"employeeType": "no"})
        (tmp_path / "fastpop.toml").write_text(f"""
[userdb]
driver = "ldap"
[ldap]
uri = "{db.ldaps_uri}"
tls_ca_file = "{db.ca_file}"
bind_dn = "{db.SEARCH_DN}"
bind_password = "{db.SEARCH_PW}"
base = "{db.PEOPLE}"
filter = "(&(objectClass=posixAccount)(uid=%u))"
attrs = ["home=homeDirectory", "allow_nets=departmentNumber", "allow_pop3=employeeType"]
""")
        srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(tmp_path / "fastpop.toml")])
        srv.start()
        try:
            _restricted_logins(srv, "ldfree", "ldoffice", "ldoff")
        finally:
            assert srv.stop() == 0
        assert "Traceback" not in srv.log()
    finally:
        db.close()
