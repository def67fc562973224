"""User databases (fastpop.auth.userdb): SQLite, PostgreSQL, MariaDB and OpenLDAP
(fetching the password, and binding as the user), each a real server started
by a session fixture (tests/support/userdb_servers.py), behind a real fastpop, with
the auth cache in front; plus the pieces on their own (variables, rows, the
cache, the Authenticator's cache rules, the configuration).

The server fixtures skip only when the server's program is not installed
(scripts/test installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.server import AS_ROOT, ServerProcess, User, message
from support.tls import Conn, b64, unb64
from support.userdb_servers import (
    PASSWORD_QUERY,
    USERS_TABLE,
    MariaDBServer,
    PostgresServer,
    SlapdServer,
    ssha,
)

from fastpop.auth.authenticator import Authenticator, AuthUnavailable
from fastpop.auth.cache import MISSING, AuthCache
from fastpop.auth.passwd_file import UserRecord
from fastpop.auth.userdb import UserDB, expand_vars, record_from_row
from fastpop.auth.userdb_ldap import escape_dn, escape_filter
from fastpop.config import Config, load_toml
from fastpop.serve.validation import validate_all

SYS_TEMP = b"-ERR [SYS/TEMP] Authentication service is temporarily unavailable.\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
QUERY_TIMEOUT = 1.0
_names = itertools.count(1)


# ================================================================ pieces


def test_expand_vars_binds_values_and_drops_dovecot_quotes():
    sql, params = expand_vars("SELECT password FROM users WHERE userid = '%u' AND domain = %d AND x LIKE 'a%%'",
                              "alice@example.com", "192.0.2.1")
    assert sql == "SELECT password FROM users WHERE userid = \0 AND domain = \0 AND x LIKE 'a%'"
    assert params == ["alice@example.com", "example.com"]
    sql, params = expand_vars("%{username}/%{domain}/%{rip}/%n/%r", "bob", "::1")
    assert sql == "\0/\0/\0/\0/\0" and params == ["bob", "", "::1", "bob", "::1"]
    with pytest.raises(ValueError, match="unknown variable"):
        expand_vars("WHERE a = %x", "u", None)


def test_expand_vars_escaped_for_ldap():
    flt, params = expand_vars("(&(uid=%n)(o=%d))", "a*)(uid=*@x(y)", None, escape_filter)
    assert flt == "(&(uid=a\\2a\\29\\28uid=\\2a)(o=x\\28y\\29))" and params == []
    assert escape_dn("a,b=c+d") == "a\\,b\\=c\\+d"
    assert escape_dn(" #x ") == "\\ #x\\ "


def test_record_from_row():
    rec = record_from_row("alice", {"user": "Alice", "password": "{PLAIN}x", "uid": 5, "gid": "6",
                                    "home": "/h", "userdb_mail": "/m/%u", "login_delay": 30, "quota": None,
                                    "pic": b"\xc3\xa9"})
    assert rec == UserRecord("Alice", "{PLAIN}x", 5, 6, "/h", {"mail": "/m/%u", "login_delay": "30", "pic": "é"})
    assert record_from_row("bob", {"password": "p"}, password=False) == UserRecord("bob", "", extra={})


def test_auth_cache_ttls_size_and_flush():
    now = [0.0]
    cache = AuthCache(2, ttl=10, negative_ttl=2, clock=lambda: now[0])
    a, b, c = (UserRecord(n, "{PLAIN}x") for n in "abc")
    assert cache.get("a") is MISSING
    cache.put("a", a)
    cache.put("nobody", None)
    assert cache.get("a") is a and cache.get("nobody") is None
    now[0] = 3
    assert cache.get("nobody") is MISSING  # the negative TTL is over
    assert cache.get("a") is a
    cache.put("b", b)
    cache.get("a")  # a is now the most recently used: c pushes b out
    cache.put("c", c)
    assert len(cache) == 2 and cache.get("b") is MISSING and cache.get("a") is a
    now[0] = 10.5
    assert cache.get("a") is MISSING and cache.get("c") is c
    assert cache.flush() == 1 and len(cache) == 0
    off = AuthCache(0, 10, 10)
    off.put("a", a)
    assert off.get("a") is MISSING and not off.enabled


class FakeDB(UserDB):
    """An asynchronous database in memory that counts its queries."""

    is_async = True

    def __init__(self, users: dict[str, str], binds: bool = False) -> None:
        self.users = users
        self.auth_bind = binds
        self.queries = 0
        self.down = False

    async def fetch(self, name, remote_ip=None):
        self.queries += 1
        if self.down:
            raise AuthUnavailable("down")
        return UserRecord(name, "" if self.auth_bind else self.users[name]) if name in self.users else None

    async def bind(self, name, password, remote_ip=None):
        self.queries += 1
        if self.down:
            raise AuthUnavailable("down")
        return UserRecord(name, "") if self.users.get(name) == password else None


def test_cached_user_is_checked_against_the_hash_and_refetched_on_mismatch():
    db = FakeDB({"alice": "{PLAIN}old"})
    auth = Authenticator(None, "/m/%u", db, AuthCache(100, 60, 60))

    async def run():
        v = auth.verify_password_async
        assert (await v("alice", "old")).name == "alice" and db.queries == 1
        assert (await v("alice", "old")) is not None and db.queries == 1  # a hit: no query
        assert await v("alice", "wrong") is None and db.queries == 2  # never the name alone; asked again
        db.users["alice"] = "{PLAIN}new"
        assert (await v("alice", "new")) is not None and db.queries == 3  # works at once
        assert await v("alice", "old") is None  # the refetched hash replaced the old one
        assert await v("nobody", "x") is None and db.queries == 5
        assert await v("nobody", "x") is None and db.queries == 5  # negative hit
        db.users["nobody"] = "{PLAIN}x"
        assert await v("nobody", "x") is None  # until the negative TTL or a flush
        auth.flush_cache()
        assert await v("nobody", "x") is not None
        db.down = True
        assert await v("nobody", "x") is not None  # cached users keep logging in
        with pytest.raises(AuthUnavailable):
            await v("carol", "x")

    asyncio.run(run())


def test_a_query_with_the_client_address_is_cached_per_address():
    db = FakeDB({"alice": "{PLAIN}pw"})
    db.uses_remote_ip = True
    auth = Authenticator(None, "/m/%u", db, AuthCache(100, 60, 60))

    async def run():
        for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
            assert await auth.verify_password_async("alice", "pw", ip) is not None
        assert db.queries == 2 and set(auth.cache._entries) == {("alice", "192.0.2.1"), ("alice", "192.0.2.2")}

    asyncio.run(run())


def test_bind_mode_caches_a_hash_of_the_password_that_bound():
    db = FakeDB({"alice": "one"}, binds=True)
    auth = Authenticator(None, "/m/%u", db, AuthCache(100, 60, 60))

    async def run():
        v = auth.verify_password_async
        assert await v("alice", "one") is not None and db.queries == 1
        assert await v("alice", "one") is not None and db.queries == 1
        assert await v("alice", "two") is None and db.queries == 2  # a mismatch binds again
        db.users["alice"] = "two"
        assert await v("alice", "two") is not None and db.queries == 3
        assert await v("alice", "one") is None
        cached = auth.cache.get("alice")
        assert cached.password.startswith("{SSHA256}") and "two" not in cached.password

    asyncio.run(run())


def test_userdb_toml_and_validation(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text("""
[userdb]
driver = "postgresql"
connect = "postgresql://u:p@127.0.0.1/mail"
password_query = "SELECT password FROM users WHERE userid = '%u'"
pool_min = 2
pool_max = 20
query_timeout = 2.5
[ldap]
uri = "ldaps://ldap.example.com"
auth_bind = true
attrs = ["home=homeDirectory"]
[auth_cache]
size = 5
ttl = 10
negative_ttl = 1
""")
    c = load_toml(str(path))
    assert (c.userdb_driver, c.userdb_pool_min, c.userdb_pool_max, c.userdb_query_timeout) == ("postgresql", 2, 20, 2.5)
    assert c.ldap_uri == ["ldaps://ldap.example.com"] and c.ldap_auth_bind is True
    assert (c.auth_cache_size, c.auth_cache_ttl, c.auth_cache_negative_ttl) == (5, 10.0, 1.0)
    validate_all(c)  # no passwd_file needed
    for bad, match in [
        (dict(userdb_driver="oracle"), "driver must be"),
        (dict(userdb_driver="sqlite"), "needs \\[userdb\\] connect"),
        (dict(userdb_driver="sqlite", userdb_connect="/x"), "password_query"),
        (dict(userdb_driver="sqlite", userdb_connect="/x", userdb_password_query="WHERE u = %q"), "unknown variable"),
        (dict(userdb_driver="ldap"), "uri"),
        (dict(userdb_driver="ldap", ldap_uri=["ldap://x"], ldap_base="o=x", ldap_attrs=["home"]), "FIELD=ATTRIBUTE"),
        (dict(passwd_file="/p", userdb_pool_max=0), "pool"),
        (dict(passwd_file="/p", auth_cache_size=-1), "auth_cache"),
    ]:
        with pytest.raises(ValueError, match=match):
            validate_all(Config(**bad))


# ================================================================ real servers


@pytest.fixture(scope="session")
def postgres():
    why = PostgresServer.available()
    if why:
        pytest.skip(why)
    srv = PostgresServer()
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def mariadb():
    why = MariaDBServer.available()
    if why:
        pytest.skip(why)
    srv = MariaDBServer()
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def slapd():
    why = SlapdServer.available()
    if why:
        pytest.skip(why)
    srv = SlapdServer()
    yield srv
    srv.close()


class SQLiteDB:
    """SQLite has no server: "down" and "slow" are a writer holding an exclusive lock."""

    driver = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        with sqlite3.connect(path) as conn:
            conn.execute(USERS_TABLE)
        self._locker: sqlite3.Connection | None = None

    @property
    def dsn(self) -> str:
        return str(self.path)

    def add_users(self, rows: list[dict]) -> None:
        with sqlite3.connect(self.path) as conn:
            for r in rows:
                conn.execute("INSERT INTO users (userid, password, home, mail, login_delay, allow_apop) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             [r.get(k) for k in ("userid", "password", "home", "mail", "login_delay", "allow_apop")])

    def set_password(self, userid: str, stored: str) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.execute("UPDATE users SET password = ? WHERE userid = ?", (stored, userid))

    def stop(self) -> None:
        self._locker = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._locker.execute("BEGIN EXCLUSIVE")

    def start(self) -> None:
        if self._locker is not None:
            self._locker.execute("ROLLBACK")
            self._locker.close()
            self._locker = None


class Backend:
    """One user database as the tests see it: add users, change passwords,
    take it down, bring it back, make it hang."""

    def __init__(self, kind: str, db, root: Path) -> None:
        self.kind = kind
        self.db = db
        self.root = root

    def toml(self) -> str:
        common = f"""
[auth_cache]
size = 1000
ttl = 300
negative_ttl = 300
[userdb]
driver = "{'ldap' if self.kind.startswith('ldap') else self.db.driver}"
connect_timeout = {QUERY_TIMEOUT}
query_timeout = {QUERY_TIMEOUT}
retry_interval = 0.2
pool_max = 4
"""
        if self.kind.startswith("ldap"):
            s = self.db
            bind = self.kind == "ldap-bind"
            return common + f"""
[ldap]
uri = "{s.uri if bind else s.ldaps_uri}"
starttls = {'true' if bind else 'false'}
tls_ca_file = "{s.ca_file}"
bind_dn = "{s.SEARCH_DN}"
bind_password = "{s.SEARCH_PW}"
base = "{s.PEOPLE}"
filter = "(&(objectClass=posixAccount)(uid=%u))"
auth_bind = {'true' if bind else 'false'}
attrs = ["home=homeDirectory", "mail=description", "login_delay=employeeNumber", "allow_apop=employeeType"]
"""
        return common + f"""connect = "{self.db.dsn}"
password_query = "{PASSWORD_QUERY}"
"""

    def add_user(self, server: ServerProcess, password: str = "secret", mail: str | None = None,
                 plain: bool = False, **columns) -> User:
        name = f"{self.kind.replace('-', '')}{next(_names)}"
        if self.kind.startswith("ldap"):
            # fetch mode reads userPassword as it is; a bind needs a hash slapd knows
            stored = "{PLAIN}" + password if plain and self.kind == "ldap" else None
            attributes = {LDAP_ATTRS[k]: str(v) for k, v in columns.items() if v is not None}
            self.db.add_user(name, password, mail=mail, stored=stored, attributes=attributes)
        else:
            stored = "{PLAIN}" + password if plain else ssha(password)
            self.db.add_users([{"userid": name, "password": stored, "mail": mail, **columns}])
        user = User(server, name, password, Path(mail) if mail else server.mail / name)
        for sub in ("cur", "new", "tmp"):
            (user.maildir / sub).mkdir(parents=True, exist_ok=True)
        return user

    def set_password(self, user: User, password: str) -> None:
        if self.kind.startswith("ldap"):
            self.db.set_password(user.name, password)
        else:
            self.db.set_password(user.name, ssha(password))
        user.password = password

    def stop(self) -> None:
        self.db.stop()

    def start(self) -> None:
        self.db.start()

    @contextlib.contextmanager
    def frozen(self):
        """The database accepts connections but does not answer."""
        if self.kind == "sqlite":
            self.db.stop()
            try:
                yield
            finally:
                self.db.start()
            return
        pids = self._pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def _pids(self) -> list[int]:
        db = self.db
        if isinstance(db, PostgresServer):
            main = int((db.data / "postmaster.pid").read_text().split()[0])
            children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
            return [main, *map(int, children)]
        return [db.proc.pid]


LDAP_ATTRS = {"login_delay": "employeeNumber", "allow_apop": "employeeType"}  # as mapped in toml()
BACKENDS = ["sqlite", "postgresql", "mysql", "ldap", "ldap-bind"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"userdb-{kind}")
    if kind == "sqlite":
        db = SQLiteDB(root / "users.sqlite")
    else:
        db = request.getfixturevalue({"postgresql": "postgres", "mysql": "mariadb"}.get(kind, "slapd"))
    b = Backend(kind, db, root)
    (root / "fastpop.toml").write_text(b.toml())
    srv = ServerProcess(root, "cython", extra_args=["--config", str(root / "fastpop.toml"), "--apop"])
    srv.start()
    b.server = srv
    yield b
    if not getattr(db, "running", True):
        db.start()
    rc = srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log
    assert rc == 0, log


def login_reply(server: ServerProcess, name: str, password: str) -> bytes:
    c = Conn(server.port)
    try:
        c.cmd(f"USER {name}")
        return c.cmd(f"PASS {password}")
    finally:
        c.close()


def test_login_succeeds_and_fails(backend):
    srv = backend.server
    user = backend.add_user(srv)
    user.deliver(message("one"))
    p = user.login()
    assert p.stat() == (1, len(message("one")))
    p.quit()
    assert login_reply(srv, user.name, "wrong") == AUTH_FAILED
    assert login_reply(srv, f"nobody{next(_names)}", "secret") == AUTH_FAILED
    c = Conn(srv.port)
    assert c.cmd("AUTH PLAIN " + b64(f"\0{user.name}\0{user.password}")).startswith(b"+OK")
    c.close()


def test_mail_location_from_the_database(backend):
    srv = backend.server
    elsewhere = backend.root / "elsewhere" / f"box{next(_names)}"
    user = backend.add_user(srv, mail=str(elsewhere))
    user.deliver(message("kept elsewhere"))
    p = user.login()
    assert p.stat()[0] == 1
    assert b"kept elsewhere" in b"\r\n".join(p.retr(1)[1])
    p.quit()
    assert not (srv.mail / user.name / "new").exists() or not any((srv.mail / user.name / "new").iterdir())


def test_cache_hits_misses_and_flush(backend):
    srv = backend.server
    user = backend.add_user(srv, password="first")
    user.login().quit()  # a miss: now cached
    backend.set_password(user, "second")
    assert login_reply(srv, user.name, "first").startswith(b"+OK")  # a hit: the cached hash
    assert login_reply(srv, user.name, "wrong") == AUTH_FAILED  # a hit is still a password check
    assert login_reply(srv, user.name, "second").startswith(b"+OK")  # mismatch: asked again
    assert login_reply(srv, user.name, "first") == AUTH_FAILED  # the cache has the new hash now

    backend.set_password(user, "third")
    assert login_reply(srv, user.name, "second").startswith(b"+OK")
    assert subprocess.run([sys.executable, "-m", "fastpop", "user", "flush", "--pid",
                           str(srv.proc.pid)]).returncode == 0
    deadline = time.monotonic() + 5
    while "auth cache flushed" not in srv.log():
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.02)
    assert login_reply(srv, user.name, "second") == AUTH_FAILED
    assert login_reply(srv, user.name, "third").startswith(b"+OK")


def test_negative_cache(backend):
    srv = backend.server
    name = f"{backend.kind.replace('-', '')}{next(_names)}"
    assert login_reply(srv, name, "secret") == AUTH_FAILED
    if backend.kind.startswith("ldap"):
        backend.db.add_user(name, "secret")
    else:
        backend.db.add_users([{"userid": name, "password": ssha("secret")}])
    (srv.mail / name).mkdir()
    if backend.kind != "ldap-bind":  # a failed bind is not cached: the user may exist
        assert login_reply(srv, name, "secret") == AUTH_FAILED  # "no such user" is cached
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while login_reply(srv, name, "secret") == AUTH_FAILED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert login_reply(srv, name, "secret").startswith(b"+OK")


def test_database_down_and_back(backend):
    srv = backend.server
    cached = backend.add_user(srv)
    cached.deliver(message("while down"))
    fresh = backend.add_user(srv)
    session = cached.login()
    session.quit()
    session = cached.login_when_free()
    backend.stop()
    try:
        t0 = time.monotonic()
        assert login_reply(srv, fresh.name, fresh.password) == SYS_TEMP
        assert time.monotonic() - t0 < QUERY_TIMEOUT * 3
        assert b"while down" in b"\r\n".join(session.retr(1)[1])  # the logged-in session goes on
        session.quit()
        cached.login_when_free().quit()  # a cached user still logs in
    finally:
        backend.start()
    deadline = time.monotonic() + 15
    while (reply := login_reply(srv, fresh.name, fresh.password)) == SYS_TEMP:
        assert time.monotonic() < deadline, srv.log()[-3000:]
        time.sleep(0.1)
    assert reply.startswith(b"+OK"), reply
    log = srv.log()
    assert "user database unavailable" in log and "available again" in log


def test_hanging_database_blocks_nobody(backend):
    srv = backend.server
    other = backend.add_user(srv)
    waiting = backend.add_user(srv)
    session = other.login()
    result: dict = {}

    def attempt():
        t0 = time.monotonic()
        result["reply"] = login_reply(srv, waiting.name, waiting.password)
        result["took"] = time.monotonic() - t0

    with backend.frozen():
        t = threading.Thread(target=attempt)
        t.start()
        time.sleep(0.2)  # the login is waiting for the database now
        for _ in range(5):  # meanwhile everyone else is served at once
            t0 = time.monotonic()
            session.noop()
            c = Conn(srv.port)
            assert c.cmd("CAPA").startswith(b"+OK")
            c.close()
            assert time.monotonic() - t0 < 0.3
        t.join(QUERY_TIMEOUT * 5)
    assert result["reply"] == SYS_TEMP
    assert QUERY_TIMEOUT * 0.8 < result["took"] < QUERY_TIMEOUT * 4
    session.quit()
    deadline = time.monotonic() + 15
    while (reply := login_reply(srv, waiting.name, waiting.password)) == SYS_TEMP:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert reply.startswith(b"+OK"), reply


def apop(srv: ServerProcess, name: str, password: str) -> bytes:
    c = Conn(srv.port)
    try:
        stamp = c.greeting.split()[-1].decode()
        return c.cmd(f"APOP {name} {hashlib.md5((stamp + password).encode()).hexdigest()}")
    finally:
        c.close()


def test_apop_and_scram_need_a_clear_text_password(backend):
    """APOP and SCRAM-SHA-256 (keys derived from {PLAIN}) look the user up through
    the same asynchronous path; with auth_bind there is no password to use."""
    srv = backend.server
    user = backend.add_user(srv, password="clear secret", plain=True)
    works = backend.kind != "ldap-bind"
    reply = apop(srv, user.name, user.password)
    assert reply.startswith(b"+OK") if works else reply == AUTH_FAILED, reply
    for password, ok in ((user.password, works), ("wrong", False)):
        c = Conn(srv.port)
        reply = scram_login(c, user.name, password)
        assert reply.startswith(b"+OK") if ok else reply == AUTH_FAILED, (password, reply)
        c.close()


def test_per_user_settings(backend):
    """login_delay and allow_apop from a column (SQL) or a mapped attribute (LDAP)."""
    srv = backend.server
    delayed = backend.add_user(srv, password="pw", plain=True, login_delay=3600)
    no_apop = backend.add_user(srv, password="pw", plain=True, allow_apop="no")
    assert login_reply(srv, delayed.name, "pw").startswith(b"+OK")
    assert login_reply(srv, delayed.name, "pw").startswith(b"-ERR [LOGIN-DELAY]")
    assert apop(srv, no_apop.name, "pw") == AUTH_FAILED
    assert login_reply(srv, no_apop.name, "pw").startswith(b"+OK")  # only APOP is refused


def scram_login(c: Conn, name: str, password: str) -> bytes:
    from scramp import ScramClient

    client = ScramClient(["SCRAM-SHA-256"], name, password)
    line = c.cmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
    client.set_server_first(unb64(line).decode())
    line = c.cmd(b64(client.get_client_final()))
    if not line.startswith(b"+ "):
        return line
    client.set_server_final(unb64(line).decode())
    return c.cmd("")


def test_asyncio_loop_and_python_parser_with_postgresql(postgres, tmp_path):
    """The same asynchronous lookups on the stdlib loop (the fixtures above use uvloop)."""
    b = Backend("postgresql", postgres, tmp_path)
    (tmp_path / "fastpop.toml").write_text(b.toml())
    srv = ServerProcess(tmp_path, "python", loop="asyncio", extra_args=["--config", str(tmp_path / "fastpop.toml")])
    srv.start()
    try:
        user = b.add_user(srv)
        user.login().quit()
        assert login_reply(srv, user.name, "wrong") == AUTH_FAILED
        fresh = b.add_user(srv)
        postgres.stop()
        try:
            assert login_reply(srv, fresh.name, fresh.password) == SYS_TEMP
        finally:
            postgres.start()
        deadline = time.monotonic() + 15
        while (reply := login_reply(srv, fresh.name, fresh.password)) == SYS_TEMP:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert reply.startswith(b"+OK"), reply
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


# ================================================================ LMTP and deliver with SQL


def test_lmtp_and_deliver_find_users_in_sqlite(tmp_path):
    db = SQLiteDB(tmp_path / "users.sqlite")
    db.add_users([{"userid": "alice@example.com", "password": ssha("pw")}])
    conf = tmp_path / "fastpop.toml"
    conf.write_text(f"""
[userdb]
driver = "sqlite"
connect = "{db.path}"
password_query = "SELECT password FROM users WHERE userid = %u"
[mail]
location = "{tmp_path}/mail/%d/%n"
""")
    srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(conf), "--lmtp-listen", "127.0.0.1:0"])
    srv.start()
    try:
        import re

        port = int(re.search(r"LMTP listening on 127\.0\.0\.1:(\d+)", srv.log()).group(1))
        lmtp = smtplib.LMTP("127.0.0.1", port, timeout=30)
        lmtp.ehlo("test")
        lmtp.mail("a@example.org")
        assert lmtp.rcpt("alice+tag@example.com")[0] == 250
        assert lmtp.rcpt("bob@example.com")[0] == 550
        assert lmtp.data(message("over lmtp"))[0] == 250
        lmtp.quit()
    finally:
        srv.stop()
    out = subprocess.run([sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, "--config", str(conf), "--user",
                          "alice@example.com"], input=message("by deliver"), capture_output=True)
    assert out.returncode == 0, out.stderr
    assert subprocess.run([sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, "--config", str(conf), "--user",
                           "bob@example.com"], input=message("x"), capture_output=True).returncode == 67
    db.path.rename(tmp_path / "gone.sqlite")  # the database unreadable: try again later (EX_TEMPFAIL)
    out = subprocess.run([sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, "--config", str(conf), "--user",
                          "alice@example.com"], input=message("x"), capture_output=True)
    assert out.returncode == 75 and b"unavailable" in out.stderr, out.stderr
    # the server's --mail-location (conftest's) wins over the file's; deliver has the file's
    [by_lmtp] = (srv.mail / "alice@example.com" / "new").iterdir()
    [by_deliver] = (tmp_path / "mail/example.com/alice/new").iterdir()
    assert b"over lmtp" in by_lmtp.read_bytes() and b"by deliver" in by_deliver.read_bytes()
    assert "Traceback" not in srv.log()


# ================================================================ the passwd-file has the same per-user fields


def test_per_user_allow_fields_in_the_passwd_file(fresh_server):
    server = fresh_server
    server.extra_args = ["--apop"]
    server.start()
    only_apop = server.add_user(password="pw", stored="{PLAIN}pw::::::allow_plaintext=no")
    no_apop = server.add_user(password="pw", stored="{PLAIN}pw::::::allow_apop=no")
    assert login_reply(server, only_apop.name, "pw") == AUTH_FAILED
    for u, ok in ((only_apop, True), (no_apop, False)):
        c = Conn(server.port)
        stamp = c.greeting.split()[-1].decode()
        reply = c.cmd(f"APOP {u.name} {hashlib.md5((stamp + 'pw').encode()).hexdigest()}")
        assert reply.startswith(b"+OK") if ok else reply == AUTH_FAILED, reply
        c.cmd("QUIT")
        c.close()
    assert login_reply(server, no_apop.name, "pw").startswith(b"+OK")


def test_user_flush_needs_a_live_process(tmp_path):
    from fastpop.cli import main

    assert main(["user", "flush", "--pid", str(2**22 + 12345)]) == 1
    (tmp_path / "pid").write_text("garbage\n")
    assert main(["user", "flush", "--pid-file", str(tmp_path / "pid")]) == 1
