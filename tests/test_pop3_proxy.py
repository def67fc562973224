"""``fastpop proxy``: each user routed to their own backend (fastpop.proxy).

Three real fastpop backends with their own passwd-files and Maildirs, each
with a PROXY listener on its own address (127.0.0.2, 127.0.0.3, 127.0.0.4)
trusting the proxy, and one ``fastpop proxy`` in front of them (plain, STLS
and implicit TLS).  Users are pinned by a ``host``/``port`` field or placed by
the rendezvous hash over ``[backends] servers``; each has mail only on its
own backend, so reading the right mail proves the route.  Clients connect
from addresses of their own (127.0.0.9, ...), which the backends must log.
The backends also trust two masters: ``proxy`` (``proxy_master``, from the
proxies' address only), the master login of a second proxy (``master_proxy``)
that relays every mechanism it offers, SCRAM, APOP and OAuth included; and
``admin``, an administrator's.  Later tests reload a proxy's backends with
SIGHUP and watch the health checks of a proxy's two workers; the last one
stops a backend: only its users get ``-ERR [SYS/TEMP]``, and the health check
brings it back.
"""

from __future__ import annotations

import hashlib
import os
import poplib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.server import AS_ROOT, PARSERS, POP3From, Raw, ServerProcess, message
from support.tls import Certs, Conn, TLSServer, b64, stop_clean
from test_sasl import auth, oauthbearer, plain, scram_login, xoauth2

from fastpop.auth.oauth import make_token
from fastpop.auth.passwd_file import UserRecord
from fastpop.config import Config
from fastpop.proxy.routing import Router

BACKEND_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PROXY_ADDRESSES = ("127.0.0.6", "127.0.0.7")  # the proxies' PROXY listeners, for HAProxy
SYS_TEMP = b"-ERR [SYS/TEMP]"
HEALTH_INTERVAL = 0.3
MASTER_PW = "the proxies' master password"
ADMIN_PW = "adminpw"
OAUTH_SECRET = b"the proxies' oauth secret, 32+ bytes"


class ProxyServer(TLSServer):
    command = "proxy"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]



def wait_for(pattern: str, srv: ServerProcess, timeout: float = 10.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, srv.log())
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not logged:\n{srv.log()[-3000:]}")
        time.sleep(0.05)


class Farm:
    def __init__(self, root: Path, parser: str):
        self.root = root
        self.certs = Certs(root / "certs")
        self.ports = [free_port(a) for a in BACKEND_ADDRESSES]  # fixed: a backend restarts on its own port
        # the backends' masters: the proxies' own (their logins are the users', and only from the proxies'
        # address: the connections', not the clients' of the PROXY headers), and an administrator
        self.masters = root / "masters"
        self.masters.write_text(f"proxy:{{PLAIN}}{MASTER_PW}::::::proxy_master allow_nets=127.0.0.1/32\n"
                                f"admin:{{PLAIN}}{ADMIN_PW}\n")
        self.masters.chmod(0o600)
        self.backends = [
            ServerProcess(root / f"backend{i}", "cython", extra_args=[
                "--proxy-listen", f"{addr}:{port}", "--proxy-trusted-networks", "127.0.0.1/32",
                "--auth-master-passwd-file", str(self.masters)])
            for i, (addr, port) in enumerate(zip(BACKEND_ADDRESSES, self.ports, strict=True))]
        self.servers = [f"{a}:{p}" for a, p in zip(BACKEND_ADDRESSES, self.ports, strict=True)]
        config = root / "proxy.toml"
        config.write_text(
            "[backends]\n"
            f"servers = {self.servers!r}\n".replace("'", '"') +
            f"health_interval = {HEALTH_INTERVAL}\nconnect_timeout = 2.0\n")
        # two proxies, each also behind HAProxy on a PROXY listener of its own
        self.proxy_listen = [f"{a}:{free_port(a)}" for a in PROXY_ADDRESSES]
        self.proxies = [
            ProxyServer(root / f"proxy{i}", parser, self.certs, extra_args=[
                "--config", str(config), "--proxy-listen", listen, "--proxy-trusted-networks", "127.0.0.1/32"])
            for i, listen in enumerate(self.proxy_listen)]
        for proxy in self.proxies:  # the pure-Python session core on asyncio's own loop, the other on uvloop
            proxy.loop = "asyncio" if parser == "python" else "uvloop"
        self.proxy = self.proxies[0]
        self.proxies[1].passwd = self.proxy.passwd  # one user database
        # a backend that accepts and never answers, for the users pinned to it
        self.silent = socket.socket()
        self.silent.bind(("127.0.0.5", 0))
        self.silent.listen(16)
        self.users: dict[str, tuple[int, str]] = {}  # name -> (backend index, subject of its mail)

    def add_user(self, name: str, backend: int | None, password: str = "secret", size: int | None = None) -> int:
        """A user on a backend: pinned there by a host field, or (None) where the hash puts it."""
        if backend is None:
            router = Router(Config(backend_servers=self.servers))
            chosen = router.pick(name, UserRecord(name, ""))
            backend = self.servers.index(f"{chosen.host}:{chosen.port}")
            extra = ""
        elif backend < 0:  # the silent one: no mail anywhere
            with open(self.proxy.passwd, "a") as f:
                f.write(f"{name}:{{PLAIN}}{password}::::::host=127.0.0.5 port={self.silent.getsockname()[1]}\n")
            return backend
        else:
            extra = f"host={BACKEND_ADDRESSES[backend]} port={self.ports[backend]}"
        with open(self.proxy.passwd, "a") as f:
            f.write(f"{name}:{{PLAIN}}{password}::::::{extra}\n")
        user = self.backends[backend].add_user(name=name, password=password)
        subject = f"mail of {name} on backend {backend}"
        user.deliver(message(subject, size=size))
        self.users[name] = (backend, subject)
        return backend

    def start(self) -> None:
        for srv in [*self.backends, *self.proxies]:
            srv.start()

    def stop(self) -> None:
        for srv in [*self.proxies, *self.backends]:
            if srv.proc is not None:
                stop_clean(srv)
        self.silent.close()


PINNED = [f"pinned{i}" for i in range(3)]
HASHED = [f"hashed{i}" for i in range(9)]


@pytest.fixture(scope="module", params=list(PARSERS))
def farm(request, tmp_path_factory):
    """Three backends and two proxies (the proxies compiled on uvloop, or pure Python on asyncio)."""
    farm = Farm(tmp_path_factory.mktemp("pop3proxy"), PARSERS[request.param])
    for i, name in enumerate(PINNED):
        farm.add_user(name, i)
    placed = {farm.add_user(name, None) for name in HASHED}
    assert len(placed) >= 2, "the hash should spread nine users over more than one backend"
    farm.add_user("big", None, size=20 * 1024 * 1024)
    farm.add_user("silent", -1)
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


def read_mail(p: poplib.POP3, name: str, password: str = "secret") -> bytes:
    p.user(name)
    p.pass_(password)
    count, _ = p.stat()
    assert count == 1
    body = b"\r\n".join(p.retr(1)[1])
    assert p.quit().startswith(b"+OK")
    return body


def test_each_user_reaches_their_own_backend(farm):
    for _ in range(2):  # and again: the route does not change
        for name, (backend, subject) in farm.users.items():
            if name in ("big", "silent"):
                continue
            body = read_mail(POP3From("127.0.0.9", farm.proxy.port), name)
            assert f"Subject: {subject}".encode() in body, (name, backend)


def test_the_backend_logs_the_client_address(farm):
    read_mail(POP3From("127.0.0.11", farm.proxy.port), "pinned1")
    wait_for(r"session user=pinned1 rip=127\.0\.0\.11 .* end=quit", farm.backends[1])
    m = wait_for(r"proxy login user=pinned1 rip=127\.0\.0\.11 backend=(\S+)", farm.proxy)
    assert m.group(1) == farm.servers[1]


def test_sasl_plain_and_tls(farm):
    """AUTH PLAIN over STLS and over implicit TLS: the backend sees the client, the mail is the user's."""
    name = HASHED[0]
    backend, subject = farm.users[name]
    context = farm.certs.client_context()
    p = poplib.POP3("127.0.0.1", farm.proxy.port, timeout=10)
    p.stls(context)
    assert p._shortcmd("AUTH PLAIN " + __import__("base64").b64encode(f"\0{name}\0secret".encode()).decode()
                       ).startswith(b"+OK")
    assert p.stat()[0] == 1
    assert f"Subject: {subject}".encode() in b"\r\n".join(p.retr(1)[1])
    p.quit()
    s = poplib.POP3_SSL("127.0.0.1", farm.proxy.tls_port, context=context, timeout=10)
    assert f"Subject: {subject}".encode() in read_mail(s, name)


def test_pipelined_commands_after_the_login_reach_the_backend(farm):
    name = PINNED[2]
    raw = Raw(farm.proxy.port)
    raw.send(f"USER {name}\r\nPASS secret\r\nSTAT\r\nQUIT\r\n".encode())
    assert raw.line().startswith(b"+OK")  # USER
    assert raw.line().startswith(b"+OK")  # PASS: the backend's answer
    assert raw.line().startswith(b"+OK 1 ")  # STAT, answered by the backend
    assert raw.line().startswith(b"+OK")  # QUIT
    raw.assert_closed()


def test_fail2ban_reads_the_proxys_failed_logins(farm):
    """contrib/fail2ban's filter, as shipped, on the proxy's log: the addresses of
    wrong passwords (USER/PASS and AUTH PLAIN), never one that logged in."""
    import test_fail2ban

    if test_fail2ban.FAIL2BAN_REGEX is None or not test_fail2ban.SYSTEM_CONFIG.is_dir():
        pytest.skip("fail2ban is not installed (scripts/test installs it)")
    root = farm.root / "fail2ban"
    if not root.exists():
        shutil.copytree(test_fail2ban.SYSTEM_CONFIG, root)
        for sub in ("filter.d", "jail.d"):
            shutil.copy(test_fail2ban.CONTRIB / sub / "fastpop.conf", root / sub / "fastpop.conf")
    p = POP3From("127.0.0.21", farm.proxy.port)
    p.user(PINNED[0])
    with pytest.raises(poplib.error_proto):
        p.pass_("wrong")
    p.close()
    raw = Conn(farm.proxy.port, source="127.0.0.22")
    assert raw.cmd("AUTH PLAIN " + b64(f"\0{PINNED[1]}\0wrong")).startswith(b"-ERR [AUTH]")
    raw.close()
    assert farm.users[PINNED[2]][1].encode() in read_mail(POP3From("127.0.0.23", farm.proxy.port), PINNED[2])
    wait_for(r"auth failed rip=127\.0\.0\.22 ", farm.proxy)
    wait_for(r"proxy session user=\S+ rip=127\.0\.0\.23 ", farm.proxy)
    matched = test_fail2ban.matched_addresses(root, farm.proxy.log_path)
    assert "127.0.0.21" in matched and "127.0.0.22" in matched, matched
    assert "127.0.0.23" not in matched and "127.0.0.9" not in matched, matched


def test_a_long_burst_pipelined_behind_the_login(farm):
    """360 KB of commands sent with the login, before any reply: every one reaches
    the backend, in order, after the login (none lost, none run at the proxy)."""
    name = PINNED[2]
    raw = Raw(farm.proxy.port)
    count = 60000
    raw.send(f"USER {name}\r\nPASS secret\r\n".encode() + b"NOOP\r\n" * count + b"STAT\r\nQUIT\r\n")
    assert raw.line().startswith(b"+OK")
    assert raw.line() == b"+OK Logged in.\r\n"
    for _ in range(count):
        assert raw.line() == b"+OK\r\n"
    assert raw.line().startswith(b"+OK 1 ")
    assert raw.line().startswith(b"+OK")
    raw.assert_closed()


def test_a_wrong_password_fails_at_the_proxy(farm):
    before = [srv.log() for srv in farm.backends]
    p = POP3From("127.0.0.12", farm.proxy.port)
    p.user(PINNED[0])
    with pytest.raises(poplib.error_proto) as failed:
        p.pass_("wrong")
    assert failed.value.args[0] == b"-ERR [AUTH] Authentication failed."
    p.close()
    # the server's own line, the one contrib/fail2ban reads
    wait_for(rf"auth failed rip=127\.0\.0\.12 user={PINNED[0]} ", farm.proxy)
    time.sleep(0.2)
    for srv, log in zip(farm.backends, before, strict=True):
        assert "127.0.0.12" not in srv.log()[len(log):], "a wrong password reached a backend"


def test_a_backend_that_does_not_answer(farm):
    """Connected, never greeted: [SYS/TEMP] after [backends] connect_timeout (2 s), logged."""
    p = POP3From("127.0.0.14", farm.proxy.port)
    p.user("silent")
    started = time.monotonic()
    with pytest.raises(poplib.error_proto) as failed:
        p.pass_("secret")
    took = time.monotonic() - started
    assert failed.value.args[0].startswith(SYS_TEMP), failed.value.args[0]
    assert 1.8 < took < 5, took
    assert p.user("silent").startswith(b"+OK")  # the session goes on at the proxy: the client may retry
    p.quit()
    wait_for(r"backend 127\.0\.0\.5:\d+ unavailable user=silent rip=127\.0\.0\.14: no answer within 2 s", farm.proxy)


def test_a_client_that_leaves_during_the_backend_login(farm):
    """Gone while the backend has not answered: the proxy drops its backend
    connection at once (not after connect_timeout), and logs no error."""
    raw = Raw(farm.proxy.port)
    assert raw.cmd("USER silent").startswith(b"+OK")
    raw.send(b"PASS secret\r\n")
    farm.silent.settimeout(5)
    conn, _ = farm.silent.accept()
    with conn:
        conn.settimeout(1.5)  # under the 2 s connect_timeout
        header = conn.recv(4096)
        assert header.startswith(b"\r\n\r\n\x00\r\nQUIT\n")  # the PROXY v2 header, then nothing
        raw.close()
        assert conn.recv(4096) == b""  # closed by the proxy
    time.sleep(0.1)
    assert "Traceback" not in farm.proxy.log()


def test_a_login_after_utf8(farm):
    """UTF8 (RFC 6856) at the proxy is said to the backend too, before the login."""
    name = PINNED[1]
    raw = Raw(farm.proxy.port)
    assert raw.cmd("UTF8").startswith(b"+OK")
    assert raw.cmd(f"USER {name}").startswith(b"+OK")
    assert raw.cmd("PASS secret") == b"+OK Logged in.\r\n"  # the login's reply, not UTF8's
    assert raw.cmd("STAT").startswith(b"+OK 1 ")
    assert raw.cmd("QUIT").startswith(b"+OK")


def test_the_backends_refusal_reaches_the_client(farm):
    """The mailbox is in use on the backend: its -ERR [IN-USE] is what the client gets."""
    name = PINNED[0]
    first = POP3From("127.0.0.15", farm.proxy.port)
    first.user(name)
    first.pass_("secret")
    second = POP3From("127.0.0.15", farm.proxy.port)
    second.user(name)
    with pytest.raises(poplib.error_proto) as failed:
        second.pass_("secret")
    assert failed.value.args[0].startswith(b"-ERR [IN-USE]"), failed.value.args[0]
    second.quit()
    first.quit()
    wait_for(rf"backend \S+ refused login user={name} rip=127\.0\.0\.15", farm.proxy)


def test_metrics_count_relayed_sessions(farm, tmp_path):
    """A proxy with metrics on: a relayed session is a logged-in session while it lasts."""
    pytest.importorskip("prometheus_client")
    from test_metrics import scrape, value
    from test_metrics import wait_for as wait_scrape

    port = free_port("127.0.0.1")
    config = farm.root / "proxy.toml"
    metered = ProxyServer(tmp_path, "cython", farm.certs,
                          extra_args=["--config", str(config), "--metrics-listen", f"127.0.0.1:{port}"])
    metered.passwd = farm.proxy.passwd
    metered.start()
    try:
        p = POP3From("127.0.0.16", metered.port)
        p.user(PINNED[0])
        p.pass_("secret")
        samples = wait_scrape(port, lambda s: value(s, "fastpop_sessions_open") == 1)
        assert value(samples, "fastpop_sessions_open") == 1
        assert sum(v for (name, _), v in samples.items() if name == "fastpop_logins_total") == 1
        p.quit()
        samples = wait_scrape(port, lambda s: value(s, "fastpop_sessions_open") == 0)
        assert value(samples, "fastpop_sessions_open") == 0
        assert scrape(port)
    finally:
        stop_clean(metered)
    assert "fastpop.session: session user=" not in metered.log()  # the proxy's own line, not a mailbox's
    assert f"proxy session user={PINNED[0]} rip=127.0.0.16" in metered.log()


def test_sigterm_lets_relayed_sessions_finish_then_cuts_them(farm, tmp_path):
    """SIGTERM at the proxy: a relayed session may still finish (its QUIT
    deletes); one that does not within shutdown_timeout (2 s) is cut at both
    ends, and its backend deletes nothing."""
    config = farm.root / "proxy.toml"
    proxy = ProxyServer(tmp_path, "cython", farm.certs, extra_args=["--config", str(config)])
    proxy.passwd = farm.proxy.passwd
    proxy.start()
    finishing = POP3From("127.0.0.17", proxy.port)
    finishing.user(PINNED[0])
    finishing.pass_("secret")
    lingering = POP3From("127.0.0.18", proxy.port)
    lingering.user(PINNED[1])
    lingering.pass_("secret")
    assert lingering.dele(1).startswith(b"+OK")
    mail = farm.backends[1].mail / PINNED[1]
    before = sorted(p.name for p in (mail / "new").iterdir()) + sorted(p.name for p in (mail / "cur").iterdir())
    started = time.monotonic()
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    wait_for(r"sessions have up to 2 s to finish", proxy)
    assert finishing.stat()[0] == 1  # still relayed
    assert finishing.quit().startswith(b"+OK")
    assert proxy.proc.wait(10) == 0
    assert 1.5 < time.monotonic() - started < 8
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        lingering.stat()  # cut
    stop_clean(proxy)
    wait_for(rf"session user={PINNED[1]} rip=127\.0\.0\.18 .* end=disconnected", farm.backends[1])
    after = sorted(p.name for p in (mail / "new").iterdir()) + sorted(p.name for p in (mail / "cur").iterdir())
    assert len(after) == len(before) == 1  # the DELE was not applied


def test_users_from_an_sql_database(farm, tmp_path):
    """The proxy's users in SQLite (a network user database's path: lookups on a
    task): a host column pins, a NULL one leaves the user to the hash."""
    import sqlite3

    db = tmp_path / "users.sqlite"
    pinned, hashed = PINNED[2], HASHED[1]
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT, host TEXT, port TEXT)")
        conn.execute("INSERT INTO users VALUES (?, ?, ?, ?)",
                     (pinned, "{PLAIN}secret", BACKEND_ADDRESSES[2], str(farm.ports[2])))
        conn.execute("INSERT INTO users VALUES (?, ?, NULL, NULL)", (hashed, "{PLAIN}secret"))
    config = tmp_path / "proxy.toml"
    config.write_text((farm.root / "proxy.toml").read_text() + f"""
[userdb]
driver = "sqlite"
connect = "{db}"
password_query = "SELECT password, host, port FROM users WHERE userid = %u"
""")
    proxy = ProxyServer(tmp_path, "cython", farm.certs, extra_args=["--config", str(config)])
    proxy.start()
    try:
        for name in (pinned, hashed):
            assert farm.users[name][1].encode() in read_mail(POP3From("127.0.0.19", proxy.port), name)
        p = POP3From("127.0.0.19", proxy.port)
        p.user(pinned)
        with pytest.raises(poplib.error_proto, match="AUTH"):
            p.pass_("wrong")
        p.close()
        wait_for(rf"auth failed rip=127\.0\.0\.19 user={pinned} ", proxy)
        wait_for(rf"proxy login user={pinned} rip=127\.0\.0\.19 backend={re.escape(farm.servers[2])}", proxy)
    finally:
        stop_clean(proxy)


# ---------------------------------------------------------------- the proxy's master login at the backends


def start_master_proxy(farm, root: Path, settings: str, password: str = MASTER_PW, parser: str = "cython",
                       extra_args: list[str] | None = None) -> ProxyServer:
    """A proxy of its own in ``root`` with farm's configuration, ``settings``
    added to its [backends], and ``master_password_file`` holding ``password``."""
    secret = root / "master.pw"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    config = root / "proxy.toml"  # farm's, which ends in [backends]
    config.write_text((farm.root / "proxy.toml").read_text() + settings
                      + f'master_password_file = "{secret}"\n')
    proxy = ProxyServer(root, parser, farm.certs, extra_args=["--config", str(config), *(extra_args or [])])
    proxy.passwd = farm.proxy.passwd
    return proxy


@pytest.fixture(scope="module")
def master_proxy(farm):
    """A proxy that logs in at the backends as their master ``proxy``
    ([backends] master_user): it offers every mechanism, APOP and OAuth too.
    Its own masters' file has ``admin``, as the backends' has."""
    root = farm.root / "master-proxy"
    root.mkdir()
    (root / "oauth.key").write_bytes(OAUTH_SECRET + b"\n")
    (root / "oauth.key").chmod(0o600)  # (a secret others may read is refused)
    masters = root / "masters"
    masters.write_text(f"admin:{{PLAIN}}{ADMIN_PW}\n")
    masters.chmod(0o600)
    proxy = start_master_proxy(farm, root, 'master_user = "proxy"\n', parser=farm.proxy.parser, extra_args=[
        "--apop", "--oauth-validator", "hmac", "--oauth-secret-file", str(root / "oauth.key"),
        "--auth-master-passwd-file", str(masters)])
    proxy.loop = farm.proxy.loop
    proxy.start()
    yield proxy
    stop_clean(proxy)


def _user_pass(c: Conn, name: str) -> bytes:
    assert c.cmd(f"USER {name}").startswith(b"+OK")
    return c.cmd("PASS secret")


def _login(c: Conn, name: str) -> bytes:
    assert c.cmd("AUTH LOGIN") == b"+ " + b64("Username:").encode() + b"\r\n"
    assert c.cmd(b64(name)) == b"+ " + b64("Password:").encode() + b"\r\n"
    return c.cmd(b64("secret"))


LOGINS = {
    "USER": _user_pass,
    "PLAIN": lambda c, name: plain(c, name, "secret"),
    "LOGIN": _login,
    "SCRAM-SHA-256": lambda c, name: scram_login(c, name, "secret"),
    "OAUTHBEARER": lambda c, name: auth(c, "OAUTHBEARER", oauthbearer(name, make_token(OAUTH_SECRET, name))),
    "XOAUTH2": lambda c, name: auth(c, "XOAUTH2", xoauth2(name, make_token(OAUTH_SECRET, name))),
}


def test_a_proxy_offers_only_what_it_can_relay(farm, master_proxy):
    """Without a master login, PLAIN and LOGIN and no APOP timestamp; with one,
    every mechanism and APOP (fastpop.config refuses anything else)."""
    c = Conn(farm.proxy.port)
    assert b"<" not in c.greeting
    assert b"SASL PLAIN LOGIN\r\n" in b"\r\n".join(c.multi("CAPA")) + b"\r\n"
    assert c.cmd("AUTH SCRAM-SHA-256").startswith(b"-ERR")
    assert c.cmd("APOP pinned0 " + "0" * 32).startswith(b"-ERR")
    c.close()
    c = Conn(master_proxy.port)
    assert re.search(rb"<[^<>@]+@[^<>]+>\r\n$", c.greeting), c.greeting
    assert b"SASL PLAIN LOGIN SCRAM-SHA-256 OAUTHBEARER XOAUTH2" in c.multi("CAPA")
    c.close()


def test_every_mechanism_relays_with_the_proxys_master_login(farm, master_proxy):
    """SCRAM-SHA-256, APOP, OAUTHBEARER, XOAUTH2, USER/PASS, PLAIN and LOGIN at
    the proxy, each relayed by the proxy's master login to the user's own mail
    (pinned and hashed users); the backend logs the user, the master and the
    client's address, and the proxy's own password never went there."""
    sources = (f"127.0.0.{i}" for i in range(50, 80))
    for name in (PINNED[0], HASHED[2]):
        backend, subject = farm.users[name]
        for mechanism, login in LOGINS.items():
            source = next(sources)
            c = Conn(master_proxy.port, source=source)
            assert login(c, name) == b"+OK Logged in.\r\n", mechanism
            assert c.cmd("STAT").startswith(b"+OK 1 ")
            assert f"Subject: {subject}".encode() in b"\r\n".join(c.multi("RETR 1"))
            assert c.cmd("QUIT").startswith(b"+OK")
            c.close()
            wait_for(rf"session user={name} master=proxy rip={re.escape(source)} .* end=quit", farm.backends[backend])
        source = next(sources)
        p = POP3From(source, master_proxy.port)
        assert p.apop(name, "secret").startswith(b"+OK")
        assert f"Subject: {subject}".encode() in b"\r\n".join(p.retr(1)[1])
        p.quit()
        wait_for(rf"login user={name} master=proxy rip={re.escape(source)} ", farm.backends[backend])
        wait_for(rf"proxy login user={name} rip={re.escape(source)} backend=", master_proxy)
    assert "login not relayable" not in master_proxy.log()


def test_a_users_own_master_login_is_relayed_as_given(farm, master_proxy):
    """alice*admin at a proxy with a master login of its own: relayed as given
    (USER and AUTH PLAIN's authzid), so the backend applies and logs admin,
    not the proxy's master."""
    name = PINNED[1]
    subject = farm.users[name][1]
    assert subject.encode() in read_mail(POP3From("127.0.0.81", master_proxy.port), f"{name}*admin", ADMIN_PW)
    wait_for(rf"proxy login user={name} master=admin rip=127\.0\.0\.81 ", master_proxy)
    wait_for(rf"login user={name} master=admin rip=127\.0\.0\.81 ", farm.backends[1])
    c = Conn(master_proxy.port, source="127.0.0.82")
    assert plain(c, "admin", ADMIN_PW, authzid=name) == b"+OK Logged in.\r\n"
    assert c.cmd("QUIT").startswith(b"+OK")
    wait_for(rf"session user={name} master=admin rip=127\.0\.0\.82 .* end=quit", farm.backends[1])


def test_the_proxys_master_logs_in_as_the_user_would(farm, master_proxy):
    """At the backend, the proxy's master (``proxy_master`` on its line) logs in
    for the user: the user's LOGIN-DELAY applies and counts, and EXPIRE deletes
    what they retrieved; an administrator's master login does neither."""
    backend = farm.backends[0]
    name = "paced"
    user = backend.add_user(name=name, stored="{PLAIN}secret::::::login_delay=3600 pop3_expire=0")
    user.deliver(message("first"))
    user.deliver(message("second"))
    with open(farm.proxy.passwd, "a") as f:
        f.write(f"{name}:{{PLAIN}}secret::::::host={BACKEND_ADDRESSES[0]} port={farm.ports[0]}\n")
    admin = POP3From("127.0.0.83", backend.port)  # straight to the backend
    admin.user(f"{name}*admin")
    admin.pass_(ADMIN_PW)
    admin.retr(1)
    admin.quit()
    assert len(user.files()) == 2  # an administrator's RETR expires nothing
    c = Conn(master_proxy.port, source="127.0.0.84")
    assert scram_login(c, name, "secret") == b"+OK Logged in.\r\n"
    c.multi("RETR 1")
    assert c.cmd("QUIT").startswith(b"+OK")
    wait_for(rf"session user={name} master=proxy rip=127\.0\.0\.84 .* end=quit", backend)
    assert len(user.files()) == 1  # EXPIRE 0: what the user retrieved is gone at QUIT
    c = Conn(master_proxy.port, source="127.0.0.84")
    assert scram_login(c, name, "secret").startswith(b"-ERR [LOGIN-DELAY]")  # the backend's, passed on
    c.close()
    admin = POP3From("127.0.0.83", backend.port)  # not an administrator's
    admin.user(f"{name}*admin")
    assert admin.pass_(ADMIN_PW).startswith(b"+OK")
    admin.quit()


def test_the_master_login_as_user_and_pass(farm, tmp_path):
    """[backends] login = "user": the proxy's master logs in with USER alice*proxy
    (the separator of [auth] master_separator) and PASS, after UTF8 when the
    client said it; the backend logs the same as for AUTH PLAIN."""
    proxy = start_master_proxy(farm, tmp_path, 'login = "user"\nmaster_user = "proxy"\n')
    proxy.start()
    try:
        name = HASHED[3]
        backend, subject = farm.users[name]
        c = Conn(proxy.port, source="127.0.0.91")
        assert c.cmd("UTF8").startswith(b"+OK")
        assert scram_login(c, name, "secret") == b"+OK Logged in.\r\n"
        assert f"Subject: {subject}".encode() in b"\r\n".join(c.multi("RETR 1"))
        assert c.cmd("QUIT").startswith(b"+OK")
        wait_for(rf"session user={name} master=proxy rip=127\.0\.0\.91 .* end=quit", farm.backends[backend])
    finally:
        stop_clean(proxy)


def test_the_proxies_master_password_is_no_good_elsewhere(farm):
    """The proxies' master is allowed from their address only, and that is the
    connection's: from a client's own address, straight to a backend, its
    password logs nobody in."""
    backend = farm.backends[0]
    p = POP3From("127.0.0.85", backend.port)
    p.user(f"{PINNED[0]}*proxy")
    with pytest.raises(poplib.error_proto) as failed:
        p.pass_(MASTER_PW)
    assert failed.value.args[0] == b"-ERR [AUTH] Authentication failed."
    p.close()
    wait_for(rf"auth failed rip=127\.0\.0\.85 user={PINNED[0]}\*proxy .*reason=master: network not allowed", backend)


@pytest.mark.parametrize("master,password", [("stranger", MASTER_PW), ("proxy", "not the password")],
                         ids=["unknown-master", "wrong-password"])
def test_a_master_login_the_backend_refuses(farm, tmp_path, master, password):
    """A master the backend does not have, or its password wrong there: the
    client gets [SYS/TEMP] (its own login was right), the proxy logs the
    refusal as an error, the backend its failed master login; the backend
    stays up."""
    proxy = start_master_proxy(farm, tmp_path, f'master_user = "{master}"\n', password)
    proxy.start()
    try:
        name = PINNED[2]
        c = Conn(proxy.port, source="127.0.0.86")
        assert scram_login(c, name, "secret") == b"-ERR [SYS/TEMP] Mail server temporarily unavailable, " \
                                                  b"try again later.\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")
        wait_for(rf"ERROR fastpop\.proxy: backend {re.escape(farm.servers[2])} refused the proxy's master login "
                 rf"user={name} master={master} rip=127\.0\.0\.86: refused: .*AUTH", proxy)
        wait_for(rf"auth failed rip=127\.0\.0\.86 user={name}\*{master} .*reason=master: wrong password",
                 farm.backends[2])
        assert f"backend {farm.servers[2]} down" not in proxy.log()
    finally:
        stop_clean(proxy)


MASTER_FILE_PROBLEMS = {
    "group-readable": (lambda f: (f.write_text("pw\n"), f.chmod(0o640)), "is mode 0640: others may read it"),
    "world-readable": (lambda f: (f.write_text("pw\n"), f.chmod(0o604)), "is mode 0604: others may read it"),
    "missing": (lambda f: None, "No such file or directory"),
    "empty": (lambda f: (f.write_text("\n"), f.chmod(0o600)), "is empty"),
    "two-lines": (lambda f: (f.write_text("pw\nmore\n"), f.chmod(0o600)), "holds a control character"),
    "symlink": (lambda f: (f.with_name("real").write_text("pw"), f.with_name("real").chmod(0o600),
                           f.symlink_to(f.with_name("real"))), "is a symbolic link"),
    "directory": (lambda f: f.mkdir(mode=0o700), "is not a regular file"),
    "someone-elses": (lambda f: (f.write_text("pw"), f.chmod(0o600), os.chown(f, 65534, 65534)),
                      "not uid 65534"),
}


@pytest.mark.parametrize("problem", list(MASTER_FILE_PROBLEMS))
def test_a_bad_master_password_file_stops_the_proxy(tmp_path, problem):
    """[backends] master_password_file is checked as the server secret is: the
    proxy does not start, and says why in one line."""
    make, expected = MASTER_FILE_PROBLEMS[problem]
    if problem == "someone-elses" and os.geteuid() != 0:
        pytest.skip("giving a file away takes root")
    secret = tmp_path / "master.pw"
    make(secret)
    config = tmp_path / "proxy.toml"
    config.write_text(f'[backends]\nservers = ["127.0.0.2:1110"]\nmaster_user = "proxy"\n'
                      f'master_password_file = "{secret}"\n')
    (tmp_path / "passwd").touch()
    proc = subprocess.run([sys.executable, "-m", "fastpop", "proxy", "--config", str(config), "--listen",
                           "127.0.0.1:0", "--passwd-file", str(tmp_path / "passwd"), "--workers", "1", *AS_ROOT],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"fastpop: [backends] master_password_file {secret}"), proc.stderr
    assert expected in proc.stderr, proc.stderr


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "implicit-tls"])
def test_a_large_retr_to_a_slow_reader_is_intact_and_bounded(farm, tls):
    """20 MB through the proxy to a client that stops reading, then reads slowly:
    the message arrives intact and the proxy never holds more than its buffers
    (over TLS too, where the proxy decrypts and the backend's side is plain)."""
    backend, _ = farm.users["big"]
    expected = farm.backends[backend].mail.joinpath("big")
    files = sorted((expected / "new").iterdir()) + sorted((expected / "cur").iterdir())
    original = files[0].read_bytes()
    pid = farm.proxy.proc.pid
    base = rss_kib(pid)
    if tls:
        raw = Conn(farm.proxy.tls_port, timeout=30, tls=farm.certs.client_context())
    else:
        raw = Raw(farm.proxy.port, timeout=30)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    assert raw.cmd("USER big").startswith(b"+OK")
    assert raw.cmd("PASS secret").startswith(b"+OK")
    raw.send(b"RETR 1\r\n")
    time.sleep(1.0)  # not reading: without flow control the proxy would take the whole message meanwhile
    peak = rss_kib(pid)
    received = raw.buf  # (what came with the PASS reply)
    chunks = 0
    while not received.endswith(b"\r\n.\r\n"):
        chunk = raw.sock.recv(256 * 1024)
        assert chunk, "connection closed during RETR"
        received += chunk
        chunks += 1
        if chunks % 64 == 0:
            peak = max(peak, rss_kib(pid))
            time.sleep(0.005)  # a slow reader
    status, _, body = bytes(received).partition(b"\r\n")
    raw.buf.clear()
    assert status.startswith(b"+OK")
    body = body[: -len(b".\r\n")]
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n"))
    assert len(unstuffed) >= len(original)
    # (a message not ending in CRLF gets one before the terminator)
    assert hashlib.sha256(unstuffed.rstrip(b"\r\n")).digest() == hashlib.sha256(original.rstrip(b"\r\n")).digest()
    assert raw.cmd("QUIT").startswith(b"+OK")
    print(f"proxy RSS {base} KiB, peak {peak} KiB relaying 20 MB")
    assert peak - base < 8 * 1024, f"proxy RSS grew by {peak - base} KiB relaying 20 MB"


HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "docs" / "haproxy.cfg"


@pytest.fixture(scope="module")
def haproxy(farm, tmp_path_factory):
    """HAProxy running docs/haproxy.cfg as it is, its two servers the two proxies."""
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (apt-get install -y haproxy)")
    directory = tmp_path_factory.mktemp("haproxy")
    ports = {name: free_port("127.0.0.1") for name in ("POP3", "POP3S")}
    env = dict(os.environ, POP3S_CERT=str(farm.certs.server_pem), FASTPOP1=farm.proxy_listen[0],
               FASTPOP2=farm.proxy_listen[1], **{f"{k}_BIND": f"127.0.0.1:{p}" for k, p in ports.items()})
    log_path = directory / "haproxy.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(HAPROXY_CFG)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=directory)
    try:
        deadline = time.monotonic() + 20
        for port in ports.values():
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.05)
        yield ports
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.external
def test_haproxy_in_front_of_two_proxies(farm, haproxy):
    """Clients from many addresses through HAProxy (PROXY v2) to either proxy
    (PROXY v2 again) to the user's backend: each gets their own mail, both
    proxies take some, and the backend logs the client's own address."""
    names = [n for n in farm.users if n not in ("big", "silent")]
    for i in range(12):
        source = f"127.0.0.{30 + i}"
        name = names[i % len(names)]
        backend, subject = farm.users[name]
        assert subject.encode() in read_mail(POP3From(source, haproxy["POP3"]), name)
        wait_for(rf"session user={name} rip={re.escape(source)} .* end=quit", farm.backends[backend])
    for proxy in farm.proxies:
        wait_for(r"proxy login user=\S+ rip=127\.0\.0\.(3\d|4[01]) ", proxy)
    # TLS ended at HAProxy (send-proxy-v2-ssl): secure at the proxy, which vouches for it
    context = farm.certs.client_context()
    name = PINNED[1]
    s = poplib.POP3_SSL("127.0.0.1", haproxy["POP3S"], context=context, timeout=10)
    assert farm.users[name][1].encode() in read_mail(s, name)


def test_sighup_adds_a_backend_and_the_master_login(farm, tmp_path):
    """A fourth backend in [backends] servers and a master login, then SIGHUP:
    the users the hash now gives the new backend go there, every other user
    keeps theirs (rendezvous hashing moves about a quarter), the logins are
    the master's and SCRAM is offered; a session relayed before the reload
    goes on to its QUIT."""
    addr = "127.0.0.8"
    port = free_port(addr)
    new = ServerProcess(tmp_path / "backend3", "cython", extra_args=[
        "--proxy-listen", f"{addr}:{port}", "--proxy-trusted-networks", "127.0.0.1/32",
        "--auth-master-passwd-file", str(farm.masters)])
    secret = tmp_path / "master.pw"
    secret.write_text(MASTER_PW + "\n")
    secret.chmod(0o600)
    servers = [*farm.servers, f"{addr}:{port}"]
    before, after = Router(Config(backend_servers=farm.servers)), Router(Config(backend_servers=servers))
    proxy = ProxyServer(tmp_path / "proxy", "cython", farm.certs, extra_args=[
        "--config", str(tmp_path / "proxy.toml")])
    names = [f"moving{i}" for i in range(60)]
    home, moved = {}, []
    with open(proxy.passwd, "a") as f:
        for name in names:
            home[name] = farm.servers.index(str(before.pick(name, UserRecord(name, ""))))
            farm.backends[home[name]].add_user(name=name).deliver(message(f"{name} before"))
            if str(after.pick(name, UserRecord(name, ""))) == servers[3]:
                moved.append(name)
                new.add_user(name=name).deliver(message(f"{name} after"))  # (its mail moved there)
            f.write(f"{name}:{{PLAIN}}secret\n")
    assert 1 < len(moved) < len(names) / 2, len(moved)  # about 15
    toml = f"[backends]\nhealth_interval = {HEALTH_INTERVAL}\nconnect_timeout = 2.0\nservers = "
    (tmp_path / "proxy.toml").write_text(toml + repr(farm.servers).replace("'", '"') + "\n")
    new.start()
    proxy.start()
    try:
        for name in moved:
            assert f"{name} before".encode() in read_mail(POP3From("127.0.0.87", proxy.port), name)
        relayed = POP3From("127.0.0.88", proxy.port)  # a moving user's session on their old backend
        relayed.user(moved[0])
        relayed.pass_("secret")
        c = Conn(proxy.port)
        assert b"SASL PLAIN LOGIN\r\n" in b"\r\n".join(c.multi("CAPA")) + b"\r\n"
        c.close()
        (tmp_path / "proxy.toml").write_text(toml + repr(servers).replace("'", '"')
                                             + f'\nmaster_user = "proxy"\nmaster_password_file = "{secret}"\n')
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(r"SIGHUP: configuration, passwd-file.* reloaded", proxy)
        c = Conn(proxy.port)
        assert b"SASL PLAIN LOGIN SCRAM-SHA-256\r\n" in b"\r\n".join(c.multi("CAPA")) + b"\r\n"
        assert scram_login(c, moved[1], "secret") == b"+OK Logged in.\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")
        for name in names:
            expected = f"{name} after" if name in moved else f"{name} before"
            assert expected.encode() in read_mail(POP3From("127.0.0.89", proxy.port), name), name
            backend = new if name in moved else farm.backends[home[name]]
            wait_for(rf"session user={name} master=proxy rip=127\.0\.0\.89 .* end=quit", backend)
        assert relayed.stat()[0] == 1  # the session relayed before the reload, still there
        assert f"{moved[0]} before".encode() in b"\r\n".join(relayed.retr(1)[1])
        assert relayed.quit().startswith(b"+OK")
        wait_for(rf"proxy session user={moved[0]} rip=127\.0\.0\.88 backend={re.escape(farm.servers[home[moved[0]]])} "
                 r"end=(backend closed|disconnected)", proxy)  # (whichever side closed first)
    finally:
        stop_clean(proxy)
        stop_clean(new)


def test_each_worker_checks_the_backends_health(farm, tmp_path):
    """A proxy with two workers: a stopped backend is marked down by the health
    check of each (a line each) before any login tries it; its users then get
    [SYS/TEMP] at once, and when it is back each worker marks it up again."""
    down = 0
    target = re.escape(farm.servers[down])
    proxy = ProxyServer(tmp_path, "cython", farm.certs, extra_args=[
        "--config", str(farm.root / "proxy.toml"), "--workers", "2"])
    proxy.passwd = farm.proxy.passwd
    proxy.start()
    srv = farm.backends[down]
    try:
        wait_for(r"worker 1 started", proxy)
        time.sleep(3 * HEALTH_INTERVAL)  # (checks of the backend while up log nothing)
        assert not re.search(rf"backend {target} (down|up)", proxy.log())
        stop_clean(srv)
        deadline = time.monotonic() + 10
        while len(re.findall(rf"backend {target} down: ", proxy.log())) < 2:
            assert time.monotonic() < deadline, proxy.log()[-3000:]
            time.sleep(0.05)
        assert "unavailable user=" not in proxy.log()  # the health checks found it, no login
        name = PINNED[down]
        p = POP3From("127.0.0.90", proxy.port)
        p.user(name)
        started = time.monotonic()
        with pytest.raises(poplib.error_proto) as failed:
            p.pass_("secret")
        assert failed.value.args[0].startswith(SYS_TEMP), failed.value.args[0]
        assert time.monotonic() - started < 1  # no connect tried
        p.close()
        wait_for(rf"backend unavailable user={name} rip=127\.0\.0\.90: backend {target} is down", proxy)
        offsets = [len(other.log()) for other in farm.proxies]
        srv.start()
        while len(re.findall(rf"backend {target} up", proxy.log())) < 2:
            assert time.monotonic() < deadline + 10, proxy.log()[-3000:]
            time.sleep(0.05)
        assert len(re.findall(rf"backend {target} down", proxy.log())) == 2  # once each, however many checks
        assert farm.users[name][1].encode() in read_mail(POP3From("127.0.0.90", proxy.port), name)
        for other, offset in zip(farm.proxies, offsets, strict=True):  # the farm's proxies too, for the next tests
            while not re.search(rf"backend {target} up", other.log()[offset:]):
                assert time.monotonic() < deadline + 20
                time.sleep(0.05)
    finally:
        if srv.proc is None:
            srv.start()
        stop_clean(proxy)


def test_a_stopped_backend_affects_only_its_users(farm):
    down = 2
    srv = farm.backends[down]
    stop_clean(srv)
    mine = [n for n, (b, _) in farm.users.items() if b == down and n not in ("big", "silent")]
    others = [n for n, (b, _) in farm.users.items() if b != down and n not in ("big", "silent")]
    assert mine and others
    for name in mine:
        p = POP3From("127.0.0.13", farm.proxy.port)
        p.user(name)
        with pytest.raises(poplib.error_proto) as failed:
            p.pass_("secret")
        assert failed.value.args[0].startswith(SYS_TEMP), failed.value.args[0]
        p.close()
    wait_for(rf"backend {re.escape(farm.servers[down])} (unavailable|down)", farm.proxy)
    for name in others:
        assert farm.users[name][1].encode() in read_mail(POP3From("127.0.0.13", farm.proxy.port), name)
    srv.start()  # on its own address again: the health check marks it up
    wait_for(rf"backend {re.escape(farm.servers[down])} up", farm.proxy)
    for name in mine:
        assert farm.users[name][1].encode() in read_mail(POP3From("127.0.0.13", farm.proxy.port), name)


def test_master_logins_and_per_user_restrictions_at_the_proxy(tmp_path):
    """A master login (USER alice*admin) is checked at the proxy, routed by the
    user's own name and relayed as given, so the backend logs the master; a user
    whose allow_nets excludes the client fails at the proxy like a wrong password,
    without a word to the backend."""
    certs = Certs(tmp_path / "certs")
    masters = tmp_path / "masters"
    masters.write_text("admin:{PLAIN}masterpw\n")
    masters.chmod(0o600)
    addr = f"{BACKEND_ADDRESSES[0]}:{free_port(BACKEND_ADDRESSES[0])}"
    backend = ServerProcess(tmp_path / "backend", "cython", extra_args=[
        "--proxy-listen", addr, "--proxy-trusted-networks", "127.0.0.1/32",
        "--auth-master-passwd-file", str(masters)])
    backend.add_user(name="alice", password="secret").deliver(message("alice's mail"))
    backend.add_user(name="carol", password="secret").deliver(message("carol's mail"))
    config = tmp_path / "proxy.toml"
    config.write_text(f'[backends]\nservers = ["{addr}"]\n')
    proxy = ProxyServer(tmp_path / "proxy", "cython", certs, extra_args=[
        "--config", str(config), "--auth-master-passwd-file", str(masters)])
    with open(proxy.passwd, "w") as f:
        f.write("alice:{PLAIN}secret\ncarol:{PLAIN}secret::::::allow_nets=192.0.2.0/24\n")
    backend.start()
    proxy.start()
    try:
        assert b"alice's mail" in read_mail(POP3From("127.0.0.24", proxy.port), "alice*admin", "masterpw")
        wait_for(r"proxy login user=alice master=admin rip=127\.0\.0\.24 ", proxy)
        wait_for(r"session user=alice master=admin rip=127\.0\.0\.24 ", backend)
        before = len(backend.log())
        p = POP3From("127.0.0.25", proxy.port)
        p.user("carol")
        with pytest.raises(poplib.error_proto) as failed:
            p.pass_("secret")
        assert failed.value.args[0] == b"-ERR [AUTH] Authentication failed."
        p.close()
        wait_for(r"auth failed rip=127\.0\.0\.25 user=carol .*allow_nets", proxy)
        time.sleep(0.2)
        assert "127.0.0.25" not in backend.log()[before:]
    finally:
        stop_clean(proxy)
        stop_clean(backend)
