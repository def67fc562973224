"""Attacks on the proxies' master login at a backend (``proxy_master`` on its
line in [auth] master_passwd_file).

Every user's login through ``fastpop proxy`` is the same master's at the
backend (``alice*proxy``).  A failed master login counts against the master
(``*proxy``), whoever it names, and the next login naming that master waits
the penalty first.  A stranger who reaches the backend (any network, the
master's allow_nets notwithstanding: they are checked after the password)
could so make every user's login through the proxies wait, and wait past
the proxy's connect_timeout, which the proxy takes for a backend that is
down.  The penalty of a proxy master's failure is the address's alone.
"""

from __future__ import annotations

import poplib
import socket
import time
from pathlib import Path

import pytest
from support.server import PARSERS, POP3From, ServerProcess, message
from support.tls import Certs, TLSServer

BACKEND = "127.0.0.2"
MASTER_PW = "the proxies' master password"


class Proxy(ServerProcess):
    command = "proxy"



def stranger(backend: TLSServer, source: str, name: str, password: str) -> bytes:
    """A login straight at the backend, over STLS (a master logs in with its
    password: never in the clear), from an untrusted address."""
    p = POP3From(source, backend.port)
    p.stls(backend.certs.client_context())
    p.user(name)
    try:
        return p.pass_(password)
    except poplib.error_proto as exc:
        return exc.args[0]
    finally:
        p.close()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(params=list(PARSERS))
def farm(request, tmp_path: Path):
    """One backend trusting the proxy's master from the proxy's address, and
    a proxy that logs in there as that master."""
    masters = tmp_path / "masters"
    masters.write_text(f"proxy:{{PLAIN}}{MASTER_PW}::::::proxy_master allow_nets=127.0.0.1/32\n")
    masters.chmod(0o600)
    port = free_port(BACKEND)
    certs = Certs(tmp_path / "certs")
    backend = TLSServer(tmp_path / "backend", PARSERS[request.param], certs, implicit=False, extra_args=[
        "--proxy-listen", f"{BACKEND}:{port}", "--proxy-trusted-networks", "127.0.0.1/32",
        "--auth-master-passwd-file", str(masters),
        "--trusted-networks", "none"])  # (loopback is trusted by default: no penalties)
    secret = tmp_path / "master.pw"
    secret.write_text(MASTER_PW + "\n")
    secret.chmod(0o600)
    config = tmp_path / "proxy.toml"
    config.write_text(f'[backends]\nservers = ["{BACKEND}:{port}"]\nconnect_timeout = 2.0\n'
                      f'health_interval = 0\nmaster_user = "proxy"\nmaster_password_file = "{secret}"\n')
    (tmp_path / "proxy").mkdir()
    proxy = Proxy(tmp_path / "proxy", PARSERS[request.param], extra_args=["--config", str(config)])
    (proxy.passwd).write_text("alice:{PLAIN}secret\n")
    alice = backend.add_user(name="alice", password="secret")
    alice.deliver(message("alice's mail"))
    backend.start()
    proxy.start()
    try:
        yield backend, proxy
    finally:
        proxy.stop()
        backend.stop()
    for srv in (backend, proxy):
        assert "Traceback" not in srv.log(), srv.log()


def test_a_strangers_guesses_at_the_proxies_master_delay_no_user(farm):
    """A stranger straight at the backend fails the proxies' master login a few
    times; the users logging in through the proxy are not made to wait: their
    logins (the proxy's master's, from the proxy's address) are answered at
    once, and the proxy does not take the backend for down."""
    backend, proxy = farm
    for guess in range(3):  # each from another address (no penalty of its own yet), another password
        assert stranger(backend, f"127.0.0.{85 + guess}", f"victim{guess}*proxy", f"guess {guess}") \
            == b"-ERR [AUTH] Authentication failed."
    started = time.monotonic()
    p = POP3From("127.0.0.9", proxy.port)
    p.user("alice")
    assert p.pass_("secret").startswith(b"+OK")
    took = time.monotonic() - started
    assert b"Subject: alice's mail" in b"\r\n".join(p.retr(1)[1])
    assert p.quit().startswith(b"+OK")
    assert took < 1.0, f"the login through the proxy took {took:.2f} s"
    # each stranger's own address is still penalised
    started = time.monotonic()
    assert stranger(backend, "127.0.0.85", "alice*proxy", "another guess") == b"-ERR [AUTH] Authentication failed."
    assert time.monotonic() - started >= 1.5
