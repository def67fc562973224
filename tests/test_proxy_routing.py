"""Routing in fastpop proxy (fastpop.proxy.routing): the host field, the
rendezvous hash's stability, and what a down backend does to its users."""

from __future__ import annotations

import base64
import re

import pytest

from fastpop.auth.passwd_file import UserRecord
from fastpop.config import Config
from fastpop.proxy import routing
from fastpop.proxy.routing import NoBackend, Router

pytestmark = pytest.mark.unit

SERVERS = ["10.0.0.1:1110", "10.0.0.2:1110", "10.0.0.3:1110", "10.0.0.4:1110"]
NAMES = [f"user{i}@example.com" for i in range(2000)]


def placement(servers: list[str], **settings: object) -> tuple[Router, dict[str, str]]:
    router = Router(Config(backend_servers=servers, **settings))  # type: ignore[arg-type]
    return router, {n: str(router.pick(n, UserRecord(n, ""))) for n in NAMES}


def test_the_host_field_wins():
    router = Router(Config(backend_servers=SERVERS))
    record = UserRecord("alice", "", extra={"host": "10.0.0.9", "port": "2110"})
    assert str(router.pick("alice", record)) == "10.0.0.9:2110"
    assert str(router.pick("alice", UserRecord("alice", "", extra={"host": "10.0.0.9"}))) == "10.0.0.9:110"
    prefixed = UserRecord("alice", "", extra={"userdb_host": "10.0.0.8", "userdb_port": "3110"})
    assert str(router.pick("alice", prefixed)) == "10.0.0.8:3110"


def test_the_hash_spreads_users_and_moves_few_when_a_backend_is_added():
    _, before = placement(SERVERS)
    counts = {s: list(before.values()).count(s) for s in SERVERS}
    assert all(350 < c < 650 for c in counts.values()), counts  # about 500 each
    _, again = placement(list(reversed(SERVERS)))
    assert again == before  # the order of the list does not matter
    _, after = placement([*SERVERS, "10.0.0.5:1110"])
    moved = [n for n in NAMES if before[n] != after[n]]
    assert all(after[n] == "10.0.0.5:1110" for n in moved)  # only to the new one
    assert 250 < len(moved) < 550, len(moved)  # about a fifth


def test_a_down_backend_refuses_its_users_only_unless_rehash():
    router, before = placement(SERVERS)
    down = router.backends[0]
    router.failed(down, "test")
    assert not down.up
    for name in NAMES[:200]:
        if before[name] == str(down):
            with pytest.raises(NoBackend):
                router.pick(name, UserRecord(name, ""))
        else:
            assert str(router.pick(name, UserRecord(name, ""))) == before[name]
    rehashing, _ = placement(SERVERS, backend_rehash=True)
    rehashing.failed(rehashing.backends[0], "test")
    for name in NAMES[:200]:
        chosen = str(rehashing.pick(name, UserRecord(name, "")))
        assert chosen != str(down)
        if before[name] != str(down):
            assert chosen == before[name]  # the others stay where they were


def test_a_pinned_user_of_a_down_backend_is_refused():
    router = Router(Config(backend_servers=SERVERS))
    router.failed(router.backends[1], "test")
    with pytest.raises(NoBackend):
        router.pick("bob", UserRecord("bob", "", extra={"host": "10.0.0.2", "port": "1110"}))


def test_settings_are_checked():
    for bad in ({"backend_servers": ["nowhere"]}, {"backend_login": "apop"}, {"backend_connect_timeout": 0.0},
                {"backend_route": True, "auth_mechanisms": ["SCRAM-SHA-256"]},
                {"backend_route": True, "auth_mechanisms": ["PLAIN"], "auth_apop": True},
                {"backend_route": True, "auth_mechanisms": ["PLAIN"], "lmtp_listen": ["127.0.0.1:24"]}):
        with pytest.raises(ValueError):
            Config(**bad).validate()  # type: ignore[arg-type]
    Config(backend_route=True, auth_mechanisms=["PLAIN", "LOGIN"], backend_servers=SERVERS).validate()


def master_file(tmp_path, text: str = "the master's password\n", mode: int = 0o600) -> str:
    path = tmp_path / "master.pw"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_a_master_login_lets_a_proxy_offer_every_mechanism(tmp_path):
    """With [backends] master_user every mechanism relays: the default list and APOP are allowed;
    the name and the file go together, and the name cannot hold the master separator."""
    pw = master_file(tmp_path)
    config = Config(backend_route=True, auth_apop=True, backend_servers=SERVERS, backend_master_user="proxy",
                    backend_master_password_file=pw)
    config.validate()
    routing.validate(config)
    assert "SCRAM-SHA-256" in config.mechanisms()
    assert Router(config).master == ("proxy", "the master's password")
    assert Router(Config(backend_servers=SERVERS)).master is None
    for bad in ({"backend_master_user": "proxy"}, {"backend_master_password_file": pw}):
        with pytest.raises(ValueError, match="go together"):
            Config(**bad).validate()  # type: ignore[arg-type]
    for name in ("a*b", "", "x y", "../x"):
        with pytest.raises(ValueError, match="master_user"):
            routing.validate(Config(backend_master_user=name, backend_master_password_file=pw))
    with pytest.raises(ValueError, match="master_user"):  # another separator, another forbidden character
        routing.validate(Config(backend_master_user="a!b", backend_master_password_file=pw,
                                auth_master_separator="!"))


@pytest.mark.parametrize("text,mode,error", [
    ("pw\n", 0o640, "is mode 0640: others may read it"),
    ("pw\n", 0o606, "is mode 0606: others may read it"),
    ("  \n", 0o600, "is empty"),
    ("pw\rmore\n", 0o600, "holds a control character"),
    ("pw\0\n", 0o600, "holds a control character"),
    ("x" * 513, 0o600, "more than 512 bytes"),
    ("\udcff", 0o600, "not UTF-8"),
], ids=["group-readable", "world-readable", "blank", "two-lines", "nul", "too-long", "not-utf8"])
def test_the_master_password_file_is_checked(tmp_path, text, mode, error):
    path = tmp_path / "master.pw"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    path.chmod(mode)
    with pytest.raises(ValueError, match=re.escape(f"[backends] master_password_file {path}")) as refused:
        routing.read_master_password(str(path))
    assert error in str(refused.value)
    assert routing.read_master_password(master_file(tmp_path, " the password \n")) == "the password"
    assert routing.read_master_password(master_file(tmp_path, "x" * 512)) == "x" * 512


def test_the_master_password_file_may_be_the_serving_users(tmp_path):
    """Root's, the starting user's or [server] user's: a file of another uid is refused."""
    import os
    import pwd

    if os.geteuid() != 0:
        pytest.skip("giving a file away takes root")
    path = master_file(tmp_path, "pw\n")
    nobody = pwd.getpwuid(65534).pw_name
    os.chown(path, 65534, 65534)
    assert routing.read_master_password(path, nobody) == "pw"
    with pytest.raises(ValueError, match="must belong to uid 0 or root, not uid 65534"):
        routing.read_master_password(path)


def test_the_login_lines_at_the_backend():
    """The user's own login; the master's for a user: AUTH PLAIN's authzid, or USER user*master."""
    from fastpop.proxy.relay import _login_lines

    assert _login_lines("plain", "alice", "pw") == (b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n", 1)
    assert _login_lines("user", "alice", "pw") == (b"USER alice\r\nPASS pw\r\n", 2)
    master = _login_lines("plain", "proxy", "master pw", "alice")
    assert master == (b"AUTH PLAIN " + base64.b64encode(b"alice\0proxy\0master pw") + b"\r\n", 1)
    assert _login_lines("user", "proxy", "master pw", "alice", "!") == (b"USER alice!proxy\r\nPASS master pw\r\n", 2)


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str) -> object:
        return self.peer if name == "peername" else None


class _Session:
    def __init__(self, peer: str, port: int, secure: bool = False, trusted: bool = False) -> None:
        self._peer, self._secure, self._trusted = peer, secure, trusted
        self.transport = _Transport((peer, port))


@pytest.mark.parametrize("peer", ["192.0.2.7", "2001:db8::7"])
def test_the_header_to_the_backend_parses_back(peer):
    """The relay's own PROXY v2 builder reads back as the client's address (and TLS when vouched)."""
    from fastpop.proxy.relay import _header
    from fastpop.wire.proxy_protocol import build_v2, parse

    plain = parse(_header(_Session(peer, 40000)))
    assert plain is not None and plain.source == (peer, 40000) and not plain.tls
    vouched = parse(_header(_Session(peer, 40001, trusted=True)))
    assert vouched is not None and vouched.source == (peer, 40001) and vouched.tls
    zero = "::" if ":" in peer else "0.0.0.0"
    assert _header(_Session(peer, 40000)) == build_v2((peer, 40000), (zero, 0))
