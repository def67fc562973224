"""Defence against attackers, each a test: user names that try to climb out
of the mail root, overlong and invalid SASL data, AUTH in the wrong state,
the per-connection attempt cap, the per-address connection cap, LOGIN-DELAY,
and the failure penalty (1,000 wrong passwords from one address: the delay
grows, while a login from another address completes at once and the server
keeps answering everybody).  STLS twice, STLS after login, commands
pipelined behind STLS and a handshake that never finishes are in
test_tls.py.  The penalty's arithmetic is tested here on a fake clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import statistics
import time

import pytest
from support.server import ServerProcess, message
from support.tls import Conn, b64, stop_clean, unb64

from fastpop.auth.penalty import LastLogins, PenaltyBox
from fastpop.limits import ConnectionTable
from fastpop.net import Networks, address_key

AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, fs in os.walk(root) for f in fs + dirs}


def apop_digest(conn: Conn, password: str) -> str:
    stamp = re.search(rb"<[^>]+>", conn.greeting).group(0)
    return hashlib.md5(stamp + password.encode()).hexdigest()


# ----------------------------------------------------------------- user names


TRAVERSALS = [
    "../../etc/passwd", "..", "../x", "a/../../b", "/etc/passwd", "a/b", "..\\..\\x", ".hidden", "x/..",
    "a@../b", "a@b/c", "%2e%2e/x", "a\\b",
    "..\uff0fx", "a\u2215b", "\uff0e\uff0e", "a\u2044b",  # look-alikes of "/" and "."
]


def test_path_traversal_user_names(server):
    before = files_under(server.root)
    victim = server.add_user()  # so the traversals have somewhere to aim next to
    after_add = files_under(server.root)
    c = Conn(server.port)
    assert c.cmd("UTF8") == b"+OK UTF8 enabled.\r\n"
    for name in TRAVERSALS:
        if " " not in name:
            reply = c.cmd(f"USER {name}".encode())
            assert reply in (b"-ERR [AUTH] Invalid user name.\r\n", b"-ERR Invalid characters in command.\r\n"), (name,
                                                                                                                  reply)
    c.close()
    for name in TRAVERSALS:
        c = Conn(server.port)
        assert c.cmd("AUTH PLAIN " + b64(f"\0{name}\0{victim.password}")) == AUTH_FAILED, name
        escaped = name.replace("=", "=3D").replace(",", "=2C")
        line = c.cmd("AUTH SCRAM-SHA-256 " + b64(f"n,,n={escaped},r=abcdefghijklmnop"))
        if line.startswith(b"+ "):  # a server-first, as for any unknown user
            assert c.cmd(b64("c=biws,r=abcdefghijklmnop" + "x" * 24 + ",p=" + b64(b"\0" * 32))) == AUTH_FAILED
        else:
            assert line == AUTH_FAILED, (name, line)
        c.close()
    # nothing was created or opened anywhere but the victim's own Maildir
    assert files_under(server.root) - after_add <= {"server.log"}, files_under(server.root) - after_add
    assert before <= after_add
    log = server.log()
    assert "cannot lock mailbox" not in log and "no mail location" not in log


def test_sasl_user_names_cannot_forge_log_lines(server):
    c = Conn(server.port)
    forged = "x\n2026-01-01 00:00:00,000 INFO fastpop.session: session user=root rip=10.0.0.1 end=quit"
    assert c.cmd("AUTH PLAIN " + b64(f"\0{forged}\0pw")) == AUTH_FAILED
    c.close()
    assert "\n2026-01-01" not in server.log()
    # shown quoted, on the failure's own line
    assert re.search(r"auth failed rip=\S+ user='x\\n2026-01-01", server.log())


# ----------------------------------------------------------------- SASL input


def test_overlong_and_invalid_sasl_responses(server):
    user = server.add_user()
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    c.send(b"A" * 100_000 + b"\r\n")  # far beyond the 16 KiB continuation limit
    assert c.line() == b"-ERR [AUTH] Response too long.\r\n"
    # the rest of that line was skipped, not read as commands
    assert c.cmd("NOOP") == b"-ERR Command not valid in this state.\r\n"
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    assert c.cmd("not base64!") == b"-ERR [AUTH] Invalid base64 data in continued response.\r\n"
    assert c.cmd("AUTH PLAIN AB=C") == b"-ERR [AUTH] Invalid base64 data in continued response.\r\n"
    assert c.read_to_eof() == b""  # three failed attempts: the connection is closed
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    c.send(b"=" * 16000 + b"\r\n")  # long but within the limit: decoded, invalid
    assert c.line() == b"-ERR [AUTH] Invalid base64 data in continued response.\r\n"
    assert c.cmd("AUTH PLAIN " + b64(f"\0{user.name}\0{user.password}")) == b"+OK Logged in.\r\n"
    c.cmd("QUIT")


def test_auth_during_transaction(server):
    user = server.add_user()
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN " + b64(f"\0{user.name}\0{user.password}")) == b"+OK Logged in.\r\n"
    for line in ("AUTH", "AUTH PLAIN", "AUTH PLAIN " + b64(f"\0{user.name}\0{user.password}"), "STLS", "UTF8"):
        assert c.cmd(line) == b"-ERR Command not valid in this state.\r\n", line
    assert c.cmd("STAT") == b"+OK 0 0\r\n"
    c.cmd("QUIT")


def test_sasl_failures_count_toward_the_attempt_cap(server):
    user = server.add_user()
    c = Conn(server.port)
    assert c.cmd("AUTH PLAIN " + b64(f"\0{user.name}\0bad1")) == AUTH_FAILED
    assert unb64(c.cmd("AUTH LOGIN")) == b"Username:"
    assert unb64(c.cmd(b64(user.name))) == b"Password:"
    assert c.cmd(b64("bad2")) == AUTH_FAILED
    assert c.cmd("CAPA").startswith(b"+OK")  # still open after two
    while c.line() != b".\r\n":
        pass
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd("PASS bad3") == AUTH_FAILED
    assert c.read_to_eof() == b""  # auth_max_attempts (3) reached: closed


# ----------------------------------------------------------------- connections per address


@pytest.mark.parametrize("parser", ["cython"])
def test_connection_cap_per_address(tmp_path, parser):
    srv = ServerProcess(tmp_path, parser,
                        extra_args=["--trusted-networks", "127.0.0.3/32", "--max-connections-per-ip", "3"])
    srv.start()
    try:
        held = [Conn(srv.port) for _ in range(3)]
        assert all(c.greeting.startswith(b"+OK") for c in held)
        extra = Conn(srv.port, greeting=False)
        assert extra.read_to_eof() == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
        other = Conn(srv.port, source="127.0.0.2")  # another address is not affected
        assert other.greeting.startswith(b"+OK")
        trusted = [Conn(srv.port, source="127.0.0.3") for _ in range(6)]  # trusted networks: no cap
        assert all(c.greeting.startswith(b"+OK") for c in trusted)
        held.pop().cmd("QUIT")
        time.sleep(0.1)
        again = Conn(srv.port)  # a slot was freed
        assert again.greeting.startswith(b"+OK")
        for c in held + trusted + [other, again]:
            c.close()
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- LOGIN-DELAY


@pytest.mark.parametrize("parser", ["cython"])
def test_login_delay(tmp_path, parser):
    srv = ServerProcess(tmp_path, parser, extra_args=["--login-delay", "1"])
    srv.start()
    try:
        everyone = srv.add_user()
        slow = srv.add_user(password="pw", stored="{PLAIN}pw::::::login_delay=3600")
        free = srv.add_user(password="pw", stored="{PLAIN}pw::::::login_delay=0")
        for user, again_ok in ((everyone, False), (slow, False), (free, True)):
            c = Conn(srv.port)
            assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
            assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
            # RFC 2449: after login, CAPA gives the delay that applies to this user
            expect = {everyone.name: 1, slow.name: 3600, free.name: 0}[user.name]
            assert b"LOGIN-DELAY %d" % expect in c.multi("CAPA")
            c.cmd("QUIT")
            c = Conn(srv.port)
            c.cmd(f"USER {user.name}")
            reply = c.cmd(f"PASS {user.password}")
            if again_ok:
                assert reply == b"+OK Logged in.\r\n", user.name
            else:
                assert reply == b"-ERR [LOGIN-DELAY] Minimum time between logins has not passed.\r\n", user.name
                # not a failed login: the attempt cap is untouched, other commands work
                assert c.cmd("CAPA").startswith(b"+OK")
            c.close()
        time.sleep(1.1)  # the global delay has passed, the per-user one has not
        c = Conn(srv.port)
        assert c.cmd("AUTH PLAIN " + b64(f"\0{everyone.name}\0{everyone.password}")) == b"+OK Logged in.\r\n"
        c.cmd("QUIT")
        c = Conn(srv.port)
        assert c.cmd("AUTH PLAIN " + b64(f"\0{slow.name}\0pw")).startswith(b"-ERR [LOGIN-DELAY]")
        c.close()
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- the failure penalty, for real


async def _apop(reader, writer, name: str, digest: str) -> tuple[bytes, float]:
    started = time.monotonic()
    writer.write(f"APOP {name} {digest}\r\n".encode())
    reply = await reader.readline()
    return reply, time.monotonic() - started


async def _connect(port: int, source: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    greeting = await reader.readline()
    assert greeting.startswith(b"+OK"), greeting
    return reader, writer, re.search(rb"<[^>]+>", greeting).group(0)


async def _attack(port: int, victim: str, connections: int, attempts: int, results: list):
    async def one(k: int):
        reader, writer, _ = await _connect(port, "127.0.0.1")
        for i in range(attempts):
            started = time.monotonic()
            reply, elapsed = await _apop(reader, writer, victim, f"{k:04d}{i:04d}".ljust(32, "0"))
            results.append((started, elapsed, reply))
        writer.close()

    await asyncio.gather(*(one(k) for k in range(connections)))


async def _login(port: int, source: str, name: str, password: str) -> tuple[bytes, float]:
    reader, writer, stamp = await _connect(port, source)
    reply, elapsed = await _apop(reader, writer, name, hashlib.md5(stamp + password.encode()).hexdigest())
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()
    return reply, elapsed


async def _penalty_scenario(port: int, victim, bystander, neighbour):
    results: list = []
    # A session that is open throughout: its NOOPs must stay fast.
    reader, writer, stamp = await _connect(port, "127.0.0.2")
    reply, _ = await _apop(reader, writer, bystander.name, hashlib.md5(stamp + bystander.password.encode()).hexdigest())
    assert reply == b"+OK Logged in.\r\n"
    attack = asyncio.ensure_future(_attack(port, victim.name, connections=50, attempts=20, results=results))
    noop_worst = 0.0
    probes = {}
    while not attack.done():
        started = time.monotonic()
        writer.write(b"NOOP\r\n")
        assert await reader.readline() == b"+OK\r\n"
        noop_worst = max(noop_worst, time.monotonic() - started)
        if len(results) > 300 and not probes:
            # Mid-attack: a login from another address is prompt; the same
            # login from the attacked address waits; the attacked user waits
            # wherever they come from.
            probes["other address"] = await _login(port, "127.0.0.4", neighbour.name, neighbour.password)
            probes["attacked address"] = await _login(port, "127.0.0.1", neighbour.name, neighbour.password)
            probes["attacked user"] = await _login(port, "127.0.0.5", victim.name, victim.password)
        await asyncio.sleep(0.05)
    await attack
    writer.write(b"QUIT\r\n")
    await reader.readline()
    return results, noop_worst, probes


@pytest.mark.parametrize("parser", ["cython"])
def test_thousand_wrong_passwords_from_one_address(tmp_path, parser):
    initial, maximum = 0.05, 0.5
    srv = ServerProcess(tmp_path, parser, extra_args=[
        "--apop", "--trusted-networks", "none",
        "--auth-penalty-initial", str(initial), "--auth-penalty-max", str(maximum),
        "--auth-max-attempts", "100", "--max-connections-per-ip", "0", "--log-level", "info",
    ])
    srv.start()
    try:
        victim = srv.add_user(password="the real one")
        bystander = srv.add_user(messages=[message()])
        neighbour = srv.add_user()
        started = time.monotonic()
        results, noop_worst, probes = asyncio.run(_penalty_scenario(srv.port, victim, bystander, neighbour))
        elapsed = time.monotonic() - started
        assert len(results) == 1000
        assert all(reply == AUTH_FAILED for _, _, reply in results)
        results.sort()
        first = [e for _, e, _ in results[:5]]  # the first attempts: no failure counted yet
        last = [e for _, e, _ in results[-200:]]
        assert statistics.median(first) < maximum * 0.6, first
        assert min(last) >= maximum * 0.95, sorted(last)[:10]  # the penalty grew to its maximum
        assert probes["other address"][0] == b"+OK Logged in.\r\n"
        assert probes["other address"][1] < maximum * 0.8, probes  # promptly, during the attack
        assert probes["attacked address"][0] == b"+OK Logged in.\r\n"
        assert probes["attacked address"][1] >= maximum * 0.95, probes  # the address's penalty
        assert probes["attacked user"][0] == b"+OK Logged in.\r\n"
        assert probes["attacked user"][1] >= maximum * 0.95, probes  # the user's penalty
        assert noop_worst < 0.2, noop_worst  # nobody else was stalled
        assert elapsed < 45, elapsed
    finally:
        stop_clean(srv)


@pytest.mark.parametrize("parser", ["cython"])
def test_default_penalty_is_dovecots(tmp_path, parser):
    """Defaults: no delay before a first failure, then 2 s (doubling to 15 s);
    none for the trusted networks (loopback)."""
    srv = ServerProcess(tmp_path, parser, extra_args=["--apop", "--trusted-networks", "127.0.0.2/32"])
    srv.start()
    try:
        user = srv.add_user()
        c = Conn(srv.port)
        t = time.monotonic()
        assert c.cmd(f"APOP {user.name} {'0' * 32}") == AUTH_FAILED
        assert time.monotonic() - t < 1.0
        t = time.monotonic()
        assert c.cmd(f"APOP {user.name} {'1' * 32}") == AUTH_FAILED
        assert 2.0 <= time.monotonic() - t < 4.0
        c.close()
        trusted = Conn(srv.port, source="127.0.0.2")
        for i in range(3):
            t = time.monotonic()
            assert trusted.cmd(f"APOP {user.name} {str(i) * 32}") == AUTH_FAILED
            assert time.monotonic() - t < 1.0
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- PenaltyBox on a fake clock


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_penalty_curve_decay_and_repeats():
    clock = Clock()
    box = PenaltyBox(clock=clock)
    assert box.delay("192.0.2.1", "alice") == 0
    delays = []
    for i in range(6):
        box.failed("192.0.2.1", "alice", f"guess {i}".encode())
        delays.append(box.delay("192.0.2.1", "alice"))
    assert delays == [2, 4, 8, 15, 15, 15]  # Dovecot's auth_penalty
    # the same wrong credentials again do not raise it
    box2 = PenaltyBox(clock=clock)
    for _ in range(5):
        box2.failed("192.0.2.9", "bob", b"old password")
    assert box2.delay("192.0.2.9", "bob") == 2
    # per user: another address trying alice is delayed, an unrelated login is not
    assert box.delay("198.51.100.7", "alice") == 15
    assert box.delay("198.51.100.7", "carol") == 0
    # decay: the count halves every half-life
    clock.now += 300
    assert box.delay("192.0.2.1", None) == 8  # 6 -> 3
    clock.now += 600
    assert box.delay("192.0.2.1", None) == 2  # 3 -> 0.75, rounded to 1
    clock.now += 300
    assert box.delay("192.0.2.1", None) == 0  # 0.375
    # a success clears the user's count, not the address's
    box.failed("192.0.2.1", "alice", b"x")
    box.failed("192.0.2.1", "alice", b"y")
    box.succeeded("192.0.2.1", "alice")
    assert box.delay("198.51.100.7", "alice") == 0
    assert box.delay("192.0.2.1", None) > 0
    assert PenaltyBox(initial=0, clock=clock).delay("192.0.2.1", "alice") == 0


def test_penalty_memory_is_bounded():
    clock = Clock()
    box = PenaltyBox(max_entries=1000, clock=clock)
    for i in range(20_000):
        box.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"user{i}")
    assert len(box._ips) <= 1000 and len(box._users) <= 1000
    assert box.delay("10.0.78.31", None) == 2  # the most recent are kept


def test_address_keys_and_networks():
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    nets = Networks(["127.0.0.0/8", "::1/128", "10.1.0.0/16"])
    assert "127.0.0.1" in nets and "::1" in nets and "::ffff:127.0.0.1" in nets and "10.1.2.3" in nets
    assert "10.2.0.1" not in nets and "192.0.2.1" not in nets and "nonsense" not in nets
    assert "127.0.0.1" not in Networks([])
    limiter = ConnectionTable(2, 0, 1000)
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    assert limiter.acquire("a") == "address" and limiter.acquire("b") is None
    limiter.release("a")
    assert limiter.acquire("a") is None and limiter.count("a") == 2
    unlimited = ConnectionTable(0, 0, 1000)
    assert all(unlimited.acquire("x") is None for _ in range(100))
    clock = Clock()
    logins = LastLogins(clock=clock)
    logins.record("alice", 60)
    assert logins.too_soon("alice", 60) and not logins.too_soon("bob", 60) and not logins.too_soon("alice", 0)
    clock.now += 61
    assert not logins.too_soon("alice", 60)


class _OneSlot(LastLogins):
    SLOTS = 1  # every user in the same slot: the 64-bit key must tell them apart


@pytest.mark.parametrize("table", [LastLogins, _OneSlot])
def test_last_logins_shared_between_workers(table):
    """A login recorded in one worker's row is seen by the other's; never another user's."""
    logins = table(workers=2)
    logins.use_row(0)
    pid = os.fork()
    if pid == 0:  # worker 1
        logins.use_row(1)
        logins.record("alice", 60)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert logins.too_soon("alice", 60) and not logins.too_soon("alice", 0)
    assert not logins.too_soon("bob", 60)  # same slot in _OneSlot, another key
    assert not logins.too_soon("alice", 1e-9)  # the delay counts from the login
    logins.record("bob", 60)  # this worker's row
    assert logins.too_soon("bob", 60) and logins.too_soon("alice", 60)
    pid = os.fork()
    if pid == 0:
        logins.use_row(1)
        ok = logins.too_soon("bob", 60) and logins.too_soon("alice", 60)
        logins.record("carol", 60)  # in _OneSlot: overwrites alice in row 1
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert logins.too_soon("carol", 60) and logins.too_soon("bob", 60)
    assert logins.too_soon("alice", 60) is (table is LastLogins)  # overwritten: a miss, never a wrong refusal
