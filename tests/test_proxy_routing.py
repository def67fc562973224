"""Routing in fastpop proxy (fastpop.proxy.routing): the host field, the
rendezvous hash's stability, and what a down backend does to its users."""

from __future__ import annotations

import pytest

from fastpop.auth.passwd_file import UserRecord
from fastpop.config import Config
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
