"""TLS: STLS (RFC 2595) and implicit TLS (RFC 8314) against a real fastpop,
with poplib, raw sockets, curl, fetchmail and mpop; certificates from trustme.

Also: what STLS must refuse (twice, after login), what the client sent before
the handshake is never executed (CVE-2011-0411), a handshake that never ends
is cut off, the minimum TLS version, a SIGHUP reload that keeps every session,
and plaintext logins refused on an unencrypted connection from outside the
trusted networks.
"""

from __future__ import annotations

import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings

import pytest
from support.server import PARSERS, message
from support.tls import (
    Certs,
    Conn,
    TLSServer,
    b64,
    stop_clean,
    tls_server_fixture,
    wait_for_log,
)

from fastpop.serve.validation import validate_all

CURL = shutil.which("curl")
FETCHMAIL = shutil.which("fetchmail")
MPOP = shutil.which("mpop")
TIMEOUT = 60


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def tls_server(request, tmp_path_factory):
    srv = tls_server_fixture(request, tmp_path_factory)
    yield srv
    stop_clean(srv)


def pop3_ssl(srv, **kw) -> poplib.POP3_SSL:
    return poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=srv.certs.client_context(), timeout=10, **kw)


# ----------------------------------------------------------------- poplib


def test_pop3_ssl_login_and_retr(tls_server):
    msgs = [message("one"), message("two", "Second.\r\n.dot line\r\n")]
    user = tls_server.add_user(messages=msgs)
    p = pop3_ssl(tls_server)
    assert p.getwelcome().startswith(b"+OK fastpop ready.")
    caps = p.capa()
    assert "STLS" not in caps and "USER" in caps  # already secure
    assert caps["SASL"] == ["PLAIN", "LOGIN", "SCRAM-SHA-256"]
    p.user(user.name)
    assert p.pass_(user.password) == b"+OK Logged in."
    assert p.stat() == (2, sum(map(len, msgs)))
    assert b"\r\n".join(p.retr(2)[1]) + b"\r\n" == msgs[1]
    assert p.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert p.quit().startswith(b"+OK")


def test_stls_upgrade_then_login(tls_server):
    user = tls_server.add_user(messages=[message("one")])
    p = tls_server.connect()
    assert "STLS" in p.capa()
    assert p.stls(tls_server.certs.client_context()) == b"+OK Begin TLS negotiation now."
    assert "STLS" not in p.capa()
    p.user(user.name)
    p.pass_(user.password)
    assert p.stat() == (1, len(message("one")))
    p.quit()


def test_stls_twice_is_refused(tls_server):
    c = Conn(tls_server.port)
    assert c.cmd("STLS") == b"+OK Begin TLS negotiation now.\r\n"
    c.starttls(tls_server.certs.client_context())
    assert c.cmd("STLS") == b"-ERR TLS is already active.\r\n"
    assert c.cmd("CAPA").startswith(b"+OK")  # the session goes on
    c.close()
    # and on the implicit-TLS port
    c = Conn(tls_server.tls_port, tls=tls_server.certs.client_context())
    assert c.cmd("STLS") == b"-ERR TLS is already active.\r\n"
    c.close()


def test_stls_after_login_is_refused(tls_server):
    user = tls_server.add_user()
    c = Conn(tls_server.port)
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"  # loopback is trusted: plaintext allowed
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("STLS") == b"-ERR Command not valid in this state.\r\n"
    assert c.cmd("STAT") == b"+OK 0 0\r\n"
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"


def test_commands_pipelined_behind_stls_are_discarded(tls_server):
    """CVE-2011-0411: commands sent in the same packet as STLS, before the
    handshake, must not run inside the TLS session."""
    user = tls_server.add_user()
    c = Conn(tls_server.port)
    c.send(f"STLS\r\nUSER {user.name}\r\nPASS {user.password}\r\nCAPA\r\n".encode())
    assert c.line() == b"+OK Begin TLS negotiation now.\r\n"
    time.sleep(0.1)  # let the server read everything before the handshake starts
    c.starttls(tls_server.certs.client_context())
    # Nothing of the injected USER/PASS/CAPA was kept: the first reply in TLS
    # is the answer to the first command sent in TLS.
    assert c.cmd(f"PASS {user.password}") == b"-ERR No username given.\r\n"
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    assert c.read_to_eof() == b""


def test_plaintext_after_stls_reply_breaks_the_handshake(tls_server):
    """A command sent in clear after the +OK is not a command: it is fed to
    TLS, which fails; the server never answers it."""
    user = tls_server.add_user()
    c = Conn(tls_server.port)
    assert c.cmd("STLS") == b"+OK Begin TLS negotiation now.\r\n"
    c.send(f"USER {user.name}\r\n".encode())
    rest = c.read_to_eof()  # perhaps a TLS alert, never a POP3 reply
    assert b"+OK" not in rest and b"-ERR" not in rest, rest
    c.close()
    m = wait_for_log(tls_server, r"TLS handshake failed rip=127\.0\.0\.1")
    assert m


def test_stls_without_tls_configured(server):
    c = Conn(server.port)
    assert b"STLS" not in b"".join(c.multi("CAPA"))
    assert c.cmd("STLS") == b"-ERR TLS support isn't enabled.\r\n"
    assert c.cmd("STLS x") == b"-ERR Wrong number of arguments.\r\n"
    c.close()


def test_tls_version_floor(tls_server):
    ctx = tls_server.certs.client_context()
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    p = poplib.POP3_SSL("127.0.0.1", tls_server.tls_port, context=ctx, timeout=10)
    assert p.sock.version() == "TLSv1.2"
    p.quit()
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(tls_server.certs.ca_pem))
    old.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        poplib.POP3_SSL("127.0.0.1", tls_server.tls_port, context=old, timeout=10)


@pytest.mark.parametrize("parser", ["cython"])
def test_tls13_only(tmp_path, parser):
    certs = Certs(tmp_path / "certs")
    srv = TLSServer(tmp_path, parser, certs, ["--tls-min-version", "TLSv1.3"])
    srv.start()
    try:
        ctx = certs.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=ctx, timeout=10)
        p = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=certs.client_context(), timeout=10)
        assert p.sock.version() == "TLSv1.3"
        p.quit()
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- a handshake that never ends


@pytest.fixture(params=list(PARSERS), ids=list(PARSERS))
def short_handshake_server(request, tmp_path):
    certs = Certs(tmp_path / "certs")
    srv = TLSServer(tmp_path, PARSERS[request.param], certs, ["--tls-handshake-timeout", "1"])
    srv.start()
    yield srv
    stop_clean(srv)


def _closed_within(sock: socket.socket, seconds: float) -> float:
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_silent_client_after_stls_is_timed_out(short_handshake_server):
    srv = short_handshake_server
    c = Conn(srv.port)
    assert c.cmd("STLS") == b"+OK Begin TLS negotiation now.\r\n"
    elapsed = _closed_within(c.sock, 10)  # sends no ClientHello at all
    assert 0.8 < elapsed < 5, elapsed
    wait_for_log(srv, r"TLS handshake failed rip=127\.0\.0\.1")
    # a half-sent ClientHello fares no better
    c = Conn(srv.port)
    assert c.cmd("STLS").startswith(b"+OK")
    c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert 0.8 < _closed_within(c.sock, 10) < 5


def test_silent_client_on_implicit_port_is_timed_out(short_handshake_server):
    srv = short_handshake_server
    sock = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
    elapsed = _closed_within(sock, 10)
    assert 0.8 < elapsed < 5, elapsed
    sock.close()
    # the server is still fine
    p = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=srv.certs.client_context(), timeout=10)
    p.quit()


# ----------------------------------------------------------------- SIGHUP reload


@pytest.mark.parametrize("parser", ["cython"])
def test_sighup_reloads_certificate_without_dropping_sessions(tmp_path, parser):
    first = Certs(tmp_path / "first", "first")
    second = Certs(tmp_path / "second", "second")
    live_cert, live_key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    shutil.copy(first.cert, live_cert)
    shutil.copy(first.key, live_key)
    srv = TLSServer(tmp_path, parser, first)
    srv.extra_args[srv.extra_args.index(str(first.cert))] = str(live_cert)
    srv.extra_args[srv.extra_args.index(str(first.key))] = str(live_key)
    srv.start()
    try:
        user = srv.add_user(messages=[message("kept")])
        other = srv.add_user(messages=[message("other")])
        implicit = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=first.client_context(), timeout=10)
        implicit.user(user.name)
        implicit.pass_(user.password)
        upgraded = srv.connect()
        upgraded.stls(first.client_context())
        upgraded.user(other.name)
        upgraded.pass_(other.password)

        shutil.copy(second.cert, live_cert)
        shutil.copy(second.key, live_key)
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_log(srv, r"TLS certificate reloaded .* \(generation 2\)")

        # Sessions made before the reload go on.
        assert implicit.stat()[0] == 1 and upgraded.stat()[0] == 1
        assert implicit.noop().startswith(b"+OK") and upgraded.noop().startswith(b"+OK")
        # New connections, both kinds, get the new certificate.
        with pytest.raises(ssl.SSLCertVerificationError):
            poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=first.client_context(), timeout=10)
        p = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=second.client_context(), timeout=10)
        p.quit()
        p = srv.connect()
        with pytest.raises(ssl.SSLCertVerificationError):
            p.stls(first.client_context())
        p = srv.connect()
        p.stls(second.client_context())
        p.quit()

        # A certificate that does not load is refused; the current one stays.
        live_cert.write_text("not a certificate\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_log(srv, r"TLS reload failed, still serving the previous certificate")
        p = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=second.client_context(), timeout=10)
        p.quit()
        assert implicit.quit().startswith(b"+OK") and upgraded.quit().startswith(b"+OK")
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- plaintext on untrusted networks

PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def untrusted_server(request, tmp_path_factory):
    srv = tls_server_fixture(request, tmp_path_factory, ["--trusted-networks", "none", "--apop"])
    yield srv
    stop_clean(srv)


def test_plaintext_login_refused_without_tls(untrusted_server):
    srv = untrusted_server
    user = srv.add_user(messages=[message()])
    c = Conn(srv.port)
    caps = c.multi("CAPA")
    assert b"USER" not in caps and b"STLS" in caps, caps
    assert b"SASL SCRAM-SHA-256" in caps  # PLAIN and LOGIN are not offered in clear
    assert c.cmd(f"USER {user.name}") == PLAINTEXT_REFUSED
    assert c.cmd(f"PASS {user.password}") == b"-ERR No username given.\r\n"
    assert c.cmd("AUTH PLAIN " + b64(f"\0{user.name}\0{user.password}")) == PLAINTEXT_REFUSED
    assert c.cmd("AUTH LOGIN") == PLAINTEXT_REFUSED
    c.send(b"AUTH\r\n")
    assert c.line() == b"+OK\r\n" and c.line() == b"SCRAM-SHA-256\r\n" and c.line() == b".\r\n"
    # After STLS everything is offered and works.
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(srv.certs.client_context())
    caps = c.multi("CAPA")
    assert b"USER" in caps and b"SASL PLAIN LOGIN SCRAM-SHA-256" in caps, caps
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("QUIT").startswith(b"+OK")


def test_plaintext_login_allowed_over_implicit_tls(untrusted_server):
    user = untrusted_server.add_user(messages=[message()])
    p = pop3_ssl(untrusted_server)
    p.user(user.name)
    p.pass_(user.password)
    assert p.stat()[0] == 1
    p.quit()


def test_apop_is_not_plaintext(untrusted_server):
    import hashlib
    import re

    user = untrusted_server.add_user()
    c = Conn(untrusted_server.port)
    stamp = re.search(rb"<[^>]+>", c.greeting).group(0)
    digest = hashlib.md5(stamp + user.password.encode()).hexdigest()
    assert c.cmd(f"APOP {user.name} {digest}") == b"+OK Logged in.\r\n"
    c.cmd("QUIT")


# ----------------------------------------------------------------- real clients

needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
needs_fetchmail = pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed")
needs_mpop = pytest.mark.skipif(MPOP is None, reason="mpop is not installed")


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, **kw)


def describe(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]!r}\nstderr:\n{res.stderr[-5000:]!r}"


CLIENT_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LC_ALL": "C"}


@needs_curl
@pytest.mark.external
def test_curl_pop3s_and_ssl_reqd(tls_server):
    msgs = [message("one"), message("two", "..two dots\r\n")]
    user = tls_server.add_user(messages=msgs)
    ca = str(tls_server.certs.ca_pem)
    for url in (f"pop3s://127.0.0.1:{tls_server.tls_port}/2", f"pop3://127.0.0.1:{tls_server.port}/2"):
        res = run([CURL, "-q", "-sS", "-v", "--max-time", str(TIMEOUT), "--noproxy", "*", "--cacert", ca,
                   "--ssl-reqd", "-u", f"{user.name}:{user.password}", url], env=CLIENT_ENV)
        assert res.returncode == 0, describe(res)
        assert res.stdout == msgs[1], describe(res)
        if url.startswith("pop3://"):
            assert b"> STLS" in res.stderr, describe(res)
        assert b"> AUTH PLAIN" in res.stderr, describe(res)  # curl prefers SASL when offered
    # A certificate curl cannot verify is refused by curl.
    other = Certs(tls_server.root / "other-ca", "other")
    res = run([CURL, "-q", "-sS", "--max-time", str(TIMEOUT), "--noproxy", "*", "--cacert", str(other.ca_pem),
               "-u", f"{user.name}:{user.password}", f"pop3s://127.0.0.1:{tls_server.tls_port}/"], env=CLIENT_ENV)
    assert res.returncode == 60, describe(res)  # CURLE_PEER_FAILED_VERIFICATION


@needs_fetchmail
@pytest.mark.external
@pytest.mark.parametrize("mode", ["implicit", "stls"])
def test_fetchmail_over_tls(tls_server, tmp_path, mode):
    import getpass

    msgs = [message("one"), message("two", ".dot\r\n")]
    user = tls_server.add_user(messages=msgs)
    out = tmp_path / "out"
    out.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text('#!/bin/sh\nn=$(ls "$1" | wc -l)\ncat > "$1/$n.eml"\n')
    port = tls_server.tls_port if mode == "implicit" else tls_server.port
    tls_opts = "ssl" if mode == "implicit" else "sslproto 'TLS1.2+'"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no showdots\n"
        f"poll 127.0.0.1 via 127.0.0.1 with proto POP3 port {port} auth password timeout 30 no dns\n"
        f'  user "{user.name}" there with password "{user.password}" is "{getpass.getuser()}" here\n'
        f"  {tls_opts} sslcertck sslcertfile {tls_server.certs.ca_pem} sslcommonname localhost\n"
        f'  no keep mda "/bin/sh {mda} {out}"\n'
    )
    rc.chmod(0o600)
    env = dict(CLIENT_ENV, HOME=str(home), FETCHMAILHOME=str(home), FETCHMAILUSER=getpass.getuser())
    res = run([FETCHMAIL, "-f", str(rc), "--nosyslog", "-v", "-N", "-d0", "--pidfile", str(tmp_path / "pid"),
               "-i", str(tmp_path / "ids")], env=env, cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    text = res.stdout + res.stderr
    if mode == "stls":
        assert b"POP3> STLS" in text, describe(res)
    assert b"SSL/TLS: using protocol TLSv1." in text or b"TLSv1." in text, describe(res)
    assert len(list(out.iterdir())) == 2, describe(res)
    assert user.files() == []


@needs_mpop
@pytest.mark.external
@pytest.mark.parametrize("mode, auth", [("implicit", "plain"), ("stls", "user"), ("stls", "scram-sha-256")])
def test_mpop_over_tls(tls_server, tmp_path, mode, auth):
    msgs = [message("one"), message("two", ".dot\r\n")]
    user = tls_server.add_user(messages=msgs)
    maildir = tmp_path / "maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    conf = tmp_path / "mpoprc"
    conf.write_text(
        "defaults\naccount test\nhost 127.0.0.1\n"
        f"port {tls_server.tls_port if mode == 'implicit' else tls_server.port}\n"
        "timeout 30\ntls on\n"
        f"tls_starttls {'off' if mode == 'implicit' else 'on'}\n"
        f"tls_trust_file {tls_server.certs.ca_pem}\n"
        f"auth {auth}\nuser {user.name}\npassword {user.password}\n"
        f"delivery maildir {maildir}\nkeep off\nuidls_file {tmp_path / 'uidls'}\n"
    )
    conf.chmod(0o600)
    home = tmp_path / "home"
    home.mkdir()
    res = run([MPOP, "-C", str(conf), "--debug", "test"], env=dict(CLIENT_ENV, HOME=str(home)), cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    if mode == "stls":
        assert b"--> STLS" in res.stdout, describe(res)
    if auth == "scram-sha-256":
        assert b"--> AUTH SCRAM-SHA-256" in res.stdout, describe(res)
    delivered = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    assert len(delivered) == 2, describe(res)
    assert user.files() == []


# ----------------------------------------------------------------- configuration


def test_security_settings_from_toml_and_their_errors(tmp_path):
    from fastpop.config import Config, load_toml

    certs = Certs(tmp_path / "certs")
    (tmp_path / "key").write_text("x" * 32 + "\n")
    (tmp_path / "key").chmod(0o600)  # (an OAuth secret others may read is refused)
    (tmp_path / "passwd").touch()
    toml = tmp_path / "fastpop.toml"
    toml.write_text(f"""
[auth]
passwd_file = "{tmp_path / 'passwd'}"
trusted_networks = ["10.0.0.0/8"]
mechanisms = ["SCRAM-SHA-256", "OAUTHBEARER"]
penalty_initial = 1.5
penalty_max = 10
penalty_half_life = 60
penalty_per_user = false
max_connections_per_ip = 7

[tls]
cert = "{certs.cert}"
key = "{certs.key}"
min_version = "TLSv1.3"
handshake_timeout = 5
listen = ["127.0.0.1:995"]

[oauth]
validator = "hmac"
secret_file = "{tmp_path / 'key'}"
""")
    config = load_toml(str(toml))
    validate_all(config)
    assert config.trusted_networks == ["10.0.0.0/8"] and config.mechanisms() == ["SCRAM-SHA-256", "OAUTHBEARER"]
    assert (config.auth_penalty_initial, config.auth_penalty_max, config.auth_penalty_half_life) == (1.5, 10.0, 60.0)
    assert config.auth_penalty_per_user is False and config.max_connections_per_ip == 7
    assert (config.tls_min_version, config.tls_handshake_timeout, config.listen_tls) == ("TLSv1.3", 5.0,
                                                                                         ["127.0.0.1:995"])

    def refused(text: str, **changes) -> None:
        c = Config(passwd_file=str(tmp_path / "passwd"), **changes)
        with pytest.raises(ValueError, match=text):
            validate_all(c)

    refused("need a certificate", listen_tls=["127.0.0.1:995"])
    refused("cannot use certificate", tls_cert=str(tmp_path / "missing.pem"))
    refused("cannot use certificate", tls_cert=str(certs.cert))  # the key is not in that file
    refused("min_version", tls_cert=str(certs.server_pem), tls_min_version="TLSv1.0")
    refused("trusted_networks", trusted_networks=["not a network"])
    refused("unknown SASL mechanism", auth_mechanisms=["CRAM-MD5"])
    refused("needs an oauth validator", auth_mechanisms=["XOAUTH2"])
    refused("module:function", oauth_validator="nonsense")
    refused("No module named", oauth_validator="no_such_module_here:f")
    refused("at least 16 bytes", oauth_validator="hmac", oauth_secret="short")
    refused("needs \\[oauth\\] command", oauth_validator="command")
    refused("must not be negative", auth_penalty_max=-1.0)
    validate_all(Config(passwd_file=str(tmp_path / "passwd"), tls_cert=str(certs.server_pem)))  # key in the cert file
