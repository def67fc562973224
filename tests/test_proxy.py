"""fastpop behind HAProxy: the PROXY protocol listeners (fastpop.session.proxied).

Two fastpop hosts share one passwd-file and one mail store, each with a
PROXY listener (127.0.0.2 and 127.0.0.3) that trusts only 127.0.0.1, where
HAProxy connects from.  HAProxy runs docs/haproxy.cfg as it is (the file
docs/deploy.md quotes: PROXY v2 to both hosts, TLS ended at HAProxy for
pop3s), docs/haproxy-tls-passthrough.cfg (TLS passed through to the hosts'
implicit-TLS PROXY listeners) and tests/haproxy-v1.cfg (a frontend whose
backend, the first host, gets PROXY v1).  Clients connect from addresses of their own (127.0.0.9,
127.0.0.21, ...), and the hosts must see those: in the session log (rip=),
for the trusted networks (127.0.0.8/29 may log in without TLS, HAProxy's
127.0.0.1 may not), for penalties and for the per-address connection cap.
Without HAProxy, raw connections check the refusals (an untrusted proxy, a
malformed header, no header in time) and a header that arrives in pieces
or together with the first commands (or the TLS ClientHello).
"""

from __future__ import annotations

import hashlib
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.server import PARSERS, POP3From, Raw, ServerProcess, message
from support.tls import Certs, stop_clean

from fastpop.wire.proxy_protocol import build_v1, build_v2

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "docs" / "haproxy.cfg"
HAPROXY_PASSTHROUGH_CFG = REPO / "docs" / "haproxy-tls-passthrough.cfg"
HAPROXY_V1_CFG = REPO / "tests" / "haproxy-v1.cfg"
HAPROXY = shutil.which("haproxy") or (shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))
needs_haproxy = [
    pytest.mark.external,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install -y haproxy)"),
]

PROXY_HOST = "127.0.0.1"  # where HAProxy (and the raw tests' "proxy") connect from
HOST_ADDRESSES = ("127.0.0.2", "127.0.0.3")
TRUSTED = "127.0.0.8/29"  # [auth] trusted_networks: 127.0.0.8 to 127.0.0.15
PENALTY = 1.0
PER_IP = 2
HEADER_TIMEOUT = 1.0
TOO_MANY = b"-ERR [SYS/TEMP] Too many connections from your address."
PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pattern: str, *servers: ServerProcess, timeout: float = 10.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        for srv in servers:
            m = re.search(pattern, srv.log())
            if m:
                return m
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not logged:\n" + "\n----\n".join(s.log()[-3000:] for s in servers))
        time.sleep(0.05)


class Hosts:
    def __init__(self, a: ServerProcess, b: ServerProcess, certs: Certs):
        self.a, self.b = a, b
        self.all = (a, b)
        self.certs = certs
        self.proxy_port, self.tls_port = {}, {}
        for srv, addr in zip(self.all, HOST_ADDRESSES, strict=True):
            m = re.search(rf"PROXY protocol listening on {re.escape(addr)}:(\d+) \(proxies: 127\.0\.0\.1/32\)",
                          srv.log())
            assert m, srv.log()
            self.proxy_port[srv] = int(m.group(1))
            m = re.search(rf"PROXY protocol listening on {re.escape(addr)}:(\d+) \(implicit TLS; proxies: ", srv.log())
            assert m, srv.log()
            self.tls_port[srv] = int(m.group(1))

    def address(self, srv: ServerProcess, tls: bool = False) -> str:
        return f"{HOST_ADDRESSES[self.all.index(srv)]}:{(self.tls_port if tls else self.proxy_port)[srv]}"


VARIANTS = {"c-parser-uvloop": ("cython", "uvloop"), "py-parser-asyncio": ("python", "asyncio")}


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def hosts(request, tmp_path_factory):
    """Two fastpop hosts sharing the passwd-file and the Maildirs, as behind a
    load balancer (on each event loop, with each parser)."""
    parser, loop = VARIANTS[request.param]
    root = tmp_path_factory.mktemp("proxy")
    certs = Certs(root / "certs")
    common = [
        "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
        "--proxy-trusted-networks", f"{PROXY_HOST}/32", "--proxy-timeout", str(HEADER_TIMEOUT),
        "--trusted-networks", TRUSTED, "--auth-penalty-initial", str(PENALTY),
        "--max-connections-per-ip", str(PER_IP), "--apop",
    ]
    servers = []
    for name, addr in zip("ab", HOST_ADDRESSES, strict=True):
        srv = ServerProcess(root / name, parser, loop,
                            extra_args=["--proxy-listen", f"{addr}:0", "--proxy-listen-tls", f"{addr}:0", *common])
        if servers:  # one store: the second host uses the first one's passwd-file and mail
            srv.passwd, srv.mail = servers[0].passwd, servers[0].mail
        servers.append(srv)
    try:
        for srv in servers:
            srv.start()
        yield Hosts(*servers, certs)
    finally:
        for srv in servers:
            stop_clean(srv)


class HAProxy:
    def __init__(self, hosts: Hosts, directory: Path):
        self.certs = hosts.certs
        self.ports = {name: free_port() for name in ("POP3", "POP3S", "POP3_V1", "POP3S_PASSTHROUGH")}
        env = dict(os.environ)
        env.update({f"{name}_BIND": f"127.0.0.1:{port}" for name, port in self.ports.items()})
        env.update(POP3S_CERT=str(self.certs.server_pem), FASTPOP1=hosts.address(hosts.a),
                   FASTPOP2=hosts.address(hosts.b), FASTPOP1_TLS=hosts.address(hosts.a, tls=True),
                   FASTPOP2_TLS=hosts.address(hosts.b, tls=True))
        self.log_path = directory / "haproxy.log"
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen([HAPROXY, "-db",
                                      *(arg for cfg in (HAPROXY_CFG, HAPROXY_PASSTHROUGH_CFG,
                                                        HAPROXY_V1_CFG) for arg in ("-f", str(cfg)))],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=directory)
        deadline = time.monotonic() + 20
        for port in self.ports.values():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("haproxy exited:\n" + self.log())
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("haproxy did not start:\n" + self.log()) from None
                    time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()

    def client_context(self) -> ssl.SSLContext:
        return self.certs.client_context()


@pytest.fixture(scope="module")
def haproxy(hosts, tmp_path_factory):
    proxy = HAProxy(hosts, tmp_path_factory.mktemp("haproxy"))
    yield proxy
    proxy.stop()



class POP3SFrom(poplib.POP3_SSL):
    def __init__(self, source: str, port: int, context: ssl.SSLContext, timeout: float = 10):
        self.source = source
        super().__init__("127.0.0.1", port, context=context, timeout=timeout)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def apop_digest(greeting: bytes, password: str) -> str:
    stamp = re.search(rb"<[^>]+>", greeting).group(0)
    return hashlib.md5(stamp + password.encode()).hexdigest()


def full_session(p: poplib.POP3, user) -> None:
    """Log in (USER/PASS), read everything, delete it, QUIT."""
    p.user(user.name)
    p.pass_(user.password)
    count, _ = p.stat()
    for i in range(1, count + 1):
        assert p.retr(i)[0].startswith(b"+OK")
        p.dele(i)
    assert p.quit().startswith(b"+OK")


def session_logged(hosts: Hosts, user, rip: str) -> ServerProcess:
    """The host whose log has the user's session line with rip=; it ended with QUIT."""
    m = wait_for(rf"session user={user.name} rip=(\S+) .* end=(\w+)", *hosts.all)
    assert m.group(1) == rip and m.group(2) == "quit", m.group(0)
    return next(srv for srv in hosts.all if m.group(0) in srv.log())


# ----------------------------------------------------------------- through HAProxy


def haproxy_test(fn):
    for mark in needs_haproxy:
        fn = mark(fn)
    return fn


@haproxy_test
def test_sessions_through_haproxy_v1_and_v2(hosts, haproxy):
    # PROXY v1: the v1 frontend's backend is the first host
    user = hosts.a.add_user([message("one"), message("two")])
    with_header = POP3From("127.0.0.9", haproxy.ports["POP3_V1"])
    full_session(with_header, user)
    assert session_logged(hosts, user, "127.0.0.9") is hosts.a
    wait_for(r"proxy rip=127\.0\.0\.9 port=\d+ via=127\.0\.0\.1 v1\n", hosts.a)
    assert user.files() == []
    # PROXY v2, balanced by source address over both hosts: clients from
    # enough addresses reach each host at least once
    served = set()
    for last in range(9, 16):
        source = f"127.0.0.{last}"
        user = hosts.a.add_user([message(source)])
        full_session(POP3From(source, haproxy.ports["POP3"]), user)
        srv = session_logged(hosts, user, source)
        wait_for(rf"proxy rip={re.escape(source)} port=\d+ via=127\.0\.0\.1 v2\n", srv)
        served.add(srv)
        assert user.files() == []
    assert served == set(hosts.all), "balance source sent every client to one host"
    assert "Traceback" not in hosts.a.log() + hosts.b.log()


@haproxy_test
def test_trusted_networks_see_the_client_address(hosts, haproxy):
    """127.0.0.9 is trusted (plaintext logins without TLS); 127.0.0.20 is not,
    though both come through the same HAProxy at 127.0.0.1."""
    user = hosts.a.add_user([message()])
    p = POP3From("127.0.0.20", haproxy.ports["POP3"])
    assert "USER" not in p.capa()
    with pytest.raises(poplib.error_proto, match=re.escape(PLAINTEXT_REFUSED.decode())):
        p.user(user.name)
    p.quit()
    p = POP3From("127.0.0.9", haproxy.ports["POP3"])
    assert "USER" in p.capa()
    p.user(user.name)
    p.pass_(user.password)
    p.quit()
    session_logged(hosts, user, "127.0.0.9")


@haproxy_test
def test_tls_ended_at_haproxy_counts_as_secure(hosts, haproxy):
    """pop3s: HAProxy does TLS and sends PROXY v2 with the SSL TLV; from an
    address outside the trusted networks, plaintext logins are then allowed."""
    user = hosts.a.add_user([message(size=300_000)])  # big enough for the sendfile path
    p = POP3SFrom("127.0.0.20", haproxy.ports["POP3S"], haproxy.client_context())
    assert "USER" in p.capa() and "STLS" not in p.capa()
    full_session(p, user)
    srv = session_logged(hosts, user, "127.0.0.20")
    wait_for(r"proxy rip=127\.0\.0\.20 port=\d+ via=127\.0\.0\.1 v2 tls=TLSv1\.[23]\n", srv)


@haproxy_test
def test_tls_passed_through_haproxy(hosts, haproxy):
    """The pass-through frontend: HAProxy sends the PROXY header, then the
    client's TLS goes to fastpop's implicit-TLS PROXY listener."""
    user = hosts.a.add_user([message(size=100_000)])
    p = POP3SFrom("127.0.0.25", haproxy.ports["POP3S_PASSTHROUGH"], hosts.certs.client_context())
    assert "USER" in p.capa() and "STLS" not in p.capa()
    full_session(p, user)
    srv = session_logged(hosts, user, "127.0.0.25")
    wait_for(r"proxy rip=127\.0\.0\.25 port=\d+ via=127\.0\.0\.1 v2\n", srv)


@haproxy_test
def test_penalty_follows_the_client_address(hosts, haproxy):
    """A failed login from 127.0.0.21 delays 127.0.0.21's next attempt, not
    127.0.0.22's, though HAProxy connects for both (to the same host)."""
    port = haproxy.ports["POP3_V1"]  # one host: penalties are per host
    victim, other = hosts.a.add_user(), hosts.a.add_user()

    def apop(source: str, user, password: str) -> tuple[bool, float]:
        p = POP3From(source, port)
        started = time.monotonic()
        try:
            p.apop(user.name, password)
            ok = True
        except poplib.error_proto:
            ok = False
        elapsed = time.monotonic() - started
        p.quit()
        return ok, elapsed

    assert apop("127.0.0.21", victim, "wrong")[0] is False
    wait_for(rf"auth failed rip=127\.0\.0\.21 user={victim.name} ", hosts.a)
    ok, elapsed = apop("127.0.0.21", victim, "wrong again")
    assert not ok and elapsed >= PENALTY * 0.9, elapsed
    ok, elapsed = apop("127.0.0.22", other, other.password)
    assert ok and elapsed < PENALTY * 0.5, elapsed


@haproxy_test
def test_connection_cap_counts_the_client_address(hosts, haproxy):
    port = haproxy.ports["POP3_V1"]
    held = [POP3From("127.0.0.23", port) for _ in range(PER_IP)]
    with pytest.raises(poplib.error_proto, match=re.escape(TOO_MANY.decode())):
        POP3From("127.0.0.23", port)
    wait_for(r"refused rip=127\.0\.0\.23: 2 connections open from it", hosts.a)
    other = POP3From("127.0.0.24", port)  # another client behind the same proxy is fine
    assert other.welcome.startswith(b"+OK fastpop ready.")
    other.quit()
    for p in held:
        p.quit()


# ----------------------------------------------------------------- raw, without HAProxy


class Proxied(Raw):
    """A raw connection to a PROXY listener: sends ``preamble`` (a header, maybe
    with commands after it) before reading anything."""

    def __init__(self, hosts: Hosts, srv: ServerProcess, preamble: bytes = b"", source: str = PROXY_HOST,
                 greeting: bool = True, timeout: float = 10):
        host = HOST_ADDRESSES[hosts.all.index(srv)]
        self.sock = socket.create_connection((host, hosts.proxy_port[srv]), timeout=timeout,
                                             source_address=(source, 0))
        self.buf = bytearray()
        if preamble:
            self.sock.sendall(preamble)
        self.greeting = self.line() if greeting else b""

    def read_to_eof(self) -> bytes:
        try:
            return super().read_to_eof()
        except ConnectionResetError:
            return bytes(self.buf)


CLIENT = ("192.0.2.7", 40000)
DEST = ("198.51.100.1", 110)


def test_untrusted_proxy_is_refused_without_greeting(hosts):
    c = Proxied(hosts, hosts.a, build_v2(CLIENT, DEST), source="127.0.0.5", greeting=False)
    assert c.read_to_eof() == b""
    wait_for(r"refused proxy connection from 127\.0\.0\.5: not a trusted proxy", hosts.a)


@pytest.mark.parametrize("data, why", [
    (b"USER alice\r\n", "not a PROXY protocol header"),  # a client that does not know it is proxied
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110 extra\r\n", "single spaces"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 40000 110\r\n", "bad TCP4 address"),
    (b"PROXY UNKNOWN " + b"x" * 100, "no CRLF within 107 bytes"),
    (build_v2(CLIENT, DEST)[:13] + b"\x41" + build_v2(CLIENT, DEST)[14:], "bad family"),
    (build_v2(CLIENT, DEST)[:14] + b"\xff\xff", "at most"),
    (b"\x16\x03\x01\x00\xa0\x01", "not a PROXY protocol header"),  # a TLS ClientHello
], ids=["pop3", "v1-fields", "v1-address", "v1-long", "v2-family", "v2-length", "tls"])
def test_malformed_header_is_refused_without_greeting(hosts, data, why):
    c = Proxied(hosts, hosts.b, data, greeting=False)
    assert c.read_to_eof() == b""
    wait_for(rf"refused proxy connection from 127\.0\.0\.1: malformed PROXY header: .*{re.escape(why)}", hosts.b)


def test_no_header_in_time_is_refused(hosts):
    started = time.monotonic()
    c = Proxied(hosts, hosts.a, b"PROXY TCP4 192.0.2.7 ", greeting=False)  # and then nothing
    assert c.read_to_eof() == b""
    assert HEADER_TIMEOUT * 0.9 <= time.monotonic() - started < HEADER_TIMEOUT + 3
    wait_for(r"refused proxy connection from 127\.0\.0\.1: no PROXY header within 1 s \(received b'PROXY TCP4 ",
             hosts.a)


@pytest.mark.parametrize("version", [1, 2])
def test_header_in_pieces_then_a_session(hosts, version):
    user = hosts.a.add_user([message()])
    header = (build_v1 if version == 1 else build_v2)(CLIENT, DEST)
    c = Proxied(hosts, hosts.a, greeting=False)
    for i in range(len(header)):  # one byte at a time: no greeting until the last
        c.send(header[i : i + 1])
        time.sleep(0.002)
    c.greeting = c.line()
    assert c.greeting.startswith(b"+OK fastpop ready.")
    # 192.0.2.7 is not in the trusted networks: no plaintext login, APOP works
    assert c.cmd(f"USER {user.name}").startswith(PLAINTEXT_REFUSED)
    assert c.cmd(f"APOP {user.name} {apop_digest(c.greeting, user.password)}").startswith(b"+OK")
    assert c.cmd("QUIT").startswith(b"+OK")
    c.close()
    wait_for(rf"session user={user.name} rip=192\.0\.2\.7 ", hosts.a)


@pytest.mark.parametrize("version", [1, 2])
def test_header_with_pipelined_commands(hosts, version):
    """The first commands in the same packet as the header are kept for the parser."""
    user = hosts.b.add_user([message("a"), message("b")])
    header = (build_v1 if version == 1 else build_v2)(("2001:db8::7", 1234), ("2001:db8::1", 110))
    c = Proxied(hosts, hosts.b, header + b"CAPA\r\nNOOP\r\n")
    assert c.greeting.startswith(b"+OK fastpop ready.")
    assert c.line().startswith(b"+OK Capability list follows")
    assert c.body()  # CAPA's lines
    assert c.line().startswith(b"-ERR")  # NOOP before login: wrong state
    digest = apop_digest(c.greeting, user.password)
    c.send(f"APOP {user.name} {digest}\r\nSTAT\r\nQUIT\r\n".encode())
    assert c.line().startswith(b"+OK")
    assert c.line().startswith(b"+OK 2 ")
    assert c.line().startswith(b"+OK")
    c.close()
    wait_for(rf"session user={user.name} rip=2001:db8::7 ", hosts.b)


@pytest.mark.parametrize("header", [build_v2(None, None, local=True), build_v1(None, None)],
                         ids=["v2-local", "v1-unknown"])
def test_local_and_unknown_keep_the_proxy_address(hosts, header):
    user = hosts.a.add_user()
    c = Proxied(hosts, hosts.a, header)
    assert c.cmd(f"APOP {user.name} {apop_digest(c.greeting, user.password)}").startswith(b"+OK")
    assert c.cmd("QUIT").startswith(b"+OK")
    c.close()
    wait_for(rf"session user={user.name} rip=127\.0\.0\.1 ", hosts.a)


class BioTLS:
    """A TLS client over a plain socket through memory BIOs, so that its first
    flight goes out in the same send() as the bytes before it (the header)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, preamble: bytes):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.buf = bytearray()
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(preamble + self.outgoing.read())
                preamble = b""
                self._recv()
        self.sock.sendall(self.outgoing.read())

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("closed")
        self.incoming.write(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            try:
                self.buf += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._recv()
        i = self.buf.index(b"\r\n") + 2
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    def cmd(self, text: str) -> bytes:
        self.tls.write(text.encode() + b"\r\n")
        self.sock.sendall(self.outgoing.read())
        return self.line()


def tls_proxy_socket(hosts: Hosts, srv: ServerProcess) -> socket.socket:
    return socket.create_connection((HOST_ADDRESSES[hosts.all.index(srv)], hosts.tls_port[srv]), timeout=10,
                                    source_address=(PROXY_HOST, 0))


@pytest.mark.parametrize("version", [1, 2])
def test_implicit_tls_after_the_header_in_one_segment(hosts, version):
    """Header and ClientHello in one send(): the header is consumed exactly,
    the handshake gets every byte after it; the session counts as secure."""
    user = hosts.b.add_user([message()])
    header = (build_v1 if version == 1 else build_v2)(CLIENT, DEST)
    c = BioTLS(tls_proxy_socket(hosts, hosts.b), hosts.certs.client_context(), header)
    assert c.line().startswith(b"+OK fastpop ready.")
    assert c.cmd(f"USER {user.name}").startswith(b"+OK")  # plaintext login allowed: TLS is up
    assert c.cmd(f"PASS {user.password}").startswith(b"+OK")
    assert c.cmd("QUIT").startswith(b"+OK")
    c.sock.close()
    wait_for(rf"session user={user.name} rip=192\.0\.2\.7 ", hosts.b)


def test_implicit_tls_after_a_header_in_pieces(hosts):
    user = hosts.a.add_user([message()])
    sock = tls_proxy_socket(hosts, hosts.a)
    header = build_v2(("2001:db8::9", 5), ("2001:db8::1", 995), tlvs=b"\x04\x00\x10" + bytes(16))
    for i in range(0, len(header), 7):
        sock.sendall(header[i : i + 7])
        time.sleep(0.03)
    tls = hosts.certs.client_context().wrap_socket(sock, server_hostname="127.0.0.1")
    p = poplib.POP3.__new__(poplib.POP3)  # poplib over the socket we made
    p.host, p.port, p._tls_established, p.sock = "127.0.0.1", 0, True, tls
    p.file = tls.makefile("rb")
    p._debugging = 0
    p.welcome = p._getresp()
    p.user(user.name)
    p.pass_(user.password)
    assert p.stat()[0] == 1
    p.quit()
    wait_for(rf"session user={user.name} rip=2001:db8::9 ", hosts.a)


def test_implicit_tls_listener_refusals(hosts):
    """The implicit-TLS PROXY listener refuses like the plain one: an untrusted
    proxy, and no complete header in time."""
    sock = socket.create_connection((HOST_ADDRESSES[0], hosts.tls_port[hosts.a]), timeout=10,
                                    source_address=("127.0.0.6", 0))
    sock.sendall(build_v2(CLIENT, DEST))
    assert _read_to_eof(sock) == b""
    wait_for(r"refused proxy connection from 127\.0\.0\.6: not a trusted proxy", hosts.a)
    started = time.monotonic()
    sock = tls_proxy_socket(hosts, hosts.a)
    sock.sendall(build_v2(CLIENT, DEST)[:20])
    assert _read_to_eof(sock) == b""
    assert HEADER_TIMEOUT * 0.9 <= time.monotonic() - started < HEADER_TIMEOUT + 3
    wait_for(r"refused proxy connection from 127\.0\.0\.1: no PROXY header within 1 s \(received b'\\r\\n\\r\\n",
             hosts.a)


def _read_to_eof(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(4096):
            out += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return out


def test_implicit_tls_without_a_header_is_refused(hosts):
    sock = tls_proxy_socket(hosts, hosts.a)
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        hosts.certs.client_context().wrap_socket(sock, server_hostname="127.0.0.1").recv(10)
    # repr() quotes with " when the random ClientHello bytes hold a '
    wait_for(r"refused proxy connection from 127\.0\.0\.1: malformed PROXY header: not a PROXY protocol header "
             r"\(received b['\"]\\x16\\x03", hosts.a)


def test_plain_listener_ignores_proxy_headers(hosts):
    """A PROXY header sent to an ordinary listener is just a bad command: nobody
    can claim an address there."""
    c = Raw(hosts.a.port)
    assert c.cmd(build_v1(CLIENT, DEST)[:-2]).startswith(b"-ERR")
    c.close()


def test_workers_serve_proxy_listeners(tmp_path):
    certs = Certs(tmp_path / "certs")
    srv = ServerProcess(tmp_path, PARSERS["c-parser"], extra_args=[
        "--workers", "2", "--proxy-listen", "127.0.0.2:0", "--proxy-listen-tls", "127.0.0.3:0",
        "--proxy-trusted-networks", "127.0.0.1/32", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
        "--auth-penalty-initial", "0", "--apop"])  # eight failed logins from one address: no waiting
    srv.start()
    try:
        port = int(wait_for(r"PROXY protocol listening on 127\.0\.0\.2:(\d+) \(proxies", srv).group(1))
        tls_port = int(wait_for(r"PROXY protocol listening on 127\.0\.0\.3:(\d+) \(implicit TLS", srv).group(1))
        user = srv.add_user([message()])
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.3", tls_port), timeout=10, source_address=(PROXY_HOST, 0))
            c = BioTLS(sock, certs.client_context(), build_v1(CLIENT, DEST))
            assert c.line().startswith(b"+OK fastpop ready.")
            assert c.cmd(f"APOP {user.name} x").startswith(b"-ERR [AUTH]")
            assert c.cmd("QUIT").startswith(b"+OK")
            sock.close()
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.2", port), timeout=10, source_address=(PROXY_HOST, 0))
            sock.sendall(build_v2(CLIENT, DEST) + f"APOP {user.name} x\r\nQUIT\r\n".encode())
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            sock.close()
            assert data.startswith(b"+OK fastpop ready.") and data.endswith(b"+OK Logging out.\r\n"), data
        wait_for(rf"auth failed rip=192\.0\.2\.7 user={user.name} ", srv)
    finally:
        stop_clean(srv)


@pytest.mark.parametrize("args, error", [
    (["--proxy-listen", "127.0.0.2:0"], "PROXY listeners need the proxies' addresses"),
    (["--proxy-listen", "127.0.0.2:0", "--proxy-trusted-networks", "10.0.0.0/33"], "proxy trusted_networks"),
    (["--proxy-listen", "nowhere", "--proxy-trusted-networks", "10.0.0.1"], "listen address must be HOST:PORT"),
    (["--proxy-listen", "127.0.0.2:0", "--proxy-trusted-networks", "10.0.0.1", "--proxy-timeout", "0"],
     "proxy timeout must be positive"),
    (["--proxy-listen-tls", "127.0.0.2:0", "--proxy-trusted-networks", "10.0.0.1"],
     "implicit-TLS PROXY listeners need a certificate"),
    (["--listen", "127.0.0.2:1110", "--proxy-listen", "127.0.0.2:1110", "--proxy-trusted-networks", "10.0.0.1"],
     "is given as two listeners"),
])
def test_config_errors(tmp_path, args, error):
    (tmp_path / "passwd").touch()
    out = subprocess.run([sys.executable, "-m", "fastpop", "serve", "--passwd-file", str(tmp_path / "passwd"), *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and error in out.stderr, out.stderr


def test_toml_proxy_section(tmp_path):
    from fastpop.config import load_toml

    path = tmp_path / "fastpop.toml"
    path.write_text('[proxy]\nlisten = ["10.0.0.5:1110"]\nlisten_tls = "10.0.0.5:1995"\n'
                    'trusted_networks = ["10.0.0.2/32"]\ntimeout = 3\n')
    config = load_toml(str(path))
    assert (config.proxy_listen, config.proxy_listen_tls, config.proxy_trusted_networks, config.proxy_timeout) == (
        ["10.0.0.5:1110"], ["10.0.0.5:1995"], ["10.0.0.2/32"], 3.0)


def test_deploy_doc_quotes_the_haproxy_configs():
    """docs/deploy.md shows the HAProxy configurations exactly as the tests run them."""
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert HAPROXY_CFG.read_text() in doc
    assert HAPROXY_PASSTHROUGH_CFG.read_text() in doc
