"""contrib/fail2ban against Debian's fail2ban: a real fastpop writes its log in
each format while clients fail to log in every way there is, each from its own
loopback address; ``fail2ban-regex`` with the shipped filter must find exactly
those addresses, once per failure, and never a client that logged in, nor an
address a client wrote into its user name."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.server import PARSERS, ServerProcess
from support.tls import Conn, b64, stop_clean

FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
FAIL2BAN_CLIENT = shutil.which("fail2ban-client")
CONTRIB = Path(__file__).resolve().parents[1] / "contrib" / "fail2ban"
SYSTEM_CONFIG = Path("/etc/fail2ban")

pytestmark = pytest.mark.skipif(FAIL2BAN_REGEX is None or not SYSTEM_CONFIG.is_dir(),
                                reason="fail2ban is not installed (scripts/test installs it)")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """Debian's fail2ban configuration with contrib/fail2ban installed in it,
    as README.md tells an operator to (a copy: the system's is not touched)."""
    root = tmp_path_factory.mktemp("fail2ban") / "fail2ban"
    shutil.copytree(SYSTEM_CONFIG, root)
    shutil.copy(CONTRIB / "filter.d" / "fastpop.conf", root / "filter.d" / "fastpop.conf")
    shutil.copy(CONTRIB / "jail.d" / "fastpop.conf", root / "jail.d" / "fastpop.conf")
    return root


def matched_addresses(config: Path, log: Path, mode: str = "normal") -> list[str]:
    """The address of every line the filter matches, in order."""
    spec = f"fastpop[mode={mode}]" if mode != "normal" else "fastpop"
    out = subprocess.run([FAIL2BAN_REGEX, "-c", str(config), "-o", "ip", str(log), spec], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


# The mechanism each kind of failure of fail_every_way logs (mech=), by the address's last number.
MECHANISMS = {1: "USER", 2: "USER", 3: "APOP", 4: "PLAIN", 5: "LOGIN", 6: "PLAIN", 7: "PLAIN", 8: "USER"}


def logged_failures(log: str, log_format: str) -> list[tuple[str, str]]:
    """(rip, mech) of every failed-login line of a log, read as a program reading that format would."""
    out = []
    for line in log.splitlines():
        if log_format == "json":
            record = json.loads(line)
            if record.get("event") == "auth failed":
                assert list(record)[-4:] == ["rip", "user", "mech", "reason"], record  # the documented order
                out.append((record["rip"], record["mech"]))
            continue
        m = re.search(r'auth failed"? rip=(\S+) user=.* mech=(\S+) reason=', line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def fail_every_way(port: int, user, prefix: str) -> dict[str, str]:
    """One failed attempt per kind, each from ``prefix``.N; the logins that
    succeed come from ``prefix``.200 and up.  Returns address -> kind."""
    kinds: dict[str, str] = {}

    def conn(n: int, kind: str) -> Conn:
        address = f"{prefix}.{n}"
        kinds[address] = kind
        return Conn(port, source=address)

    def refused(c: Conn, line: str) -> None:
        assert c.cmd(line).startswith(b"-ERR"), line

    c = conn(1, "USER/PASS, wrong password")
    c.cmd(f"USER {user.name}")
    refused(c, "PASS wrong")
    c = conn(2, "USER/PASS, unknown user")
    c.cmd("USER nobody-here")
    refused(c, "PASS wrong")
    c = conn(3, "APOP, wrong digest")
    stamp = re.search(rb"<[^>]+>", c.greeting).group(0)
    refused(c, f"APOP {user.name} {hashlib.md5(stamp + b'wrong').hexdigest()}")
    c = conn(4, "AUTH PLAIN, wrong password")
    refused(c, "AUTH PLAIN " + b64(f"\0{user.name}\0wrong"))
    c = conn(5, "AUTH LOGIN, wrong password")
    assert c.cmd("AUTH LOGIN").startswith(b"+ ")
    assert c.cmd(b64(user.name)).startswith(b"+ ")
    refused(c, b64("wrong"))
    c = conn(6, "AUTH PLAIN, malformed")
    refused(c, "AUTH PLAIN " + b64("no separators at all"))
    c = conn(7, "AUTH PLAIN, a name that writes another address into the line")
    refused(c, "AUTH PLAIN " + b64("\0x rip=192.0.2.66 user=y\0wrong"))
    c = conn(8, "USER/PASS, a name that writes another address into the line")
    c.cmd("USER rip=192.0.2.67")
    refused(c, "PASS wrong")
    for n in range(200, 203):  # logins that succeed never match
        ok = Conn(port, source=f"{prefix}.{n}")
        ok.cmd(f"USER {user.name}")
        assert ok.cmd(f"PASS {user.password}").startswith(b"+OK")
        ok.cmd("QUIT")
    return kinds


@pytest.mark.parametrize("log_format", ["text", "keyvalue", "json"])
def test_the_filter_finds_every_failed_login_and_nothing_else(tmp_path, config, log_format):
    srv = ServerProcess(tmp_path, PARSERS[next(iter(PARSERS))], extra_args=["--apop", "--log-format", log_format])
    srv.start()
    try:
        user = srv.add_user()
        kinds = fail_every_way(srv.port, user, "127.0.31")
    finally:
        stop_clean(srv)
    found = matched_addresses(config, srv.log_path)
    assert sorted(found) == sorted(kinds), (found, kinds, srv.log())
    assert not any(a.startswith("192.0.2.") for a in found)
    # each line names the mechanism the client failed with (docs/operations.md)
    logged = logged_failures(srv.log(), log_format)
    assert sorted(logged) == sorted((a, MECHANISMS[int(a.rsplit(".", 1)[1])]) for a in kinds), logged


def test_aggressive_mode_also_finds_connections_over_the_per_address_cap(tmp_path, config):
    srv = ServerProcess(tmp_path, PARSERS[next(iter(PARSERS))],
                        extra_args=["--max-connections-per-ip", "1", "--trusted-networks", "none"])
    srv.start()
    try:
        held = Conn(srv.port, source="127.0.32.1")
        over = Conn(srv.port, source="127.0.32.1", greeting=False)
        assert over.read_to_eof().startswith(b"-ERR")
        held.cmd("QUIT")
    finally:
        stop_clean(srv)
    assert matched_addresses(config, srv.log_path) == []
    assert matched_addresses(config, srv.log_path, mode="aggressive") == ["127.0.32.1"]


@pytest.mark.skipif(FAIL2BAN_CLIENT is None, reason="fail2ban-client is not installed")
def test_fail2ban_reads_the_jail_with_the_filter(config):
    """fail2ban-client -d: the configuration fail2ban would start with; the
    jail is there, on the POP3 ports, with the filter's patterns."""
    out = subprocess.run([FAIL2BAN_CLIENT, "-c", str(config), "-d"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dump = out.stdout
    assert "['add', 'fastpop', 'systemd']" in dump
    assert re.search(r"'fastpop', 'addfailregex', .*auth failed rip=<HOST>", dump)
    assert "['set', 'fastpop', 'addjournalmatch', '_SYSTEMD_UNIT=fastpop.service']" in dump
    assert re.search(r"\['set', 'fastpop', 'maxretry', 5\]", dump)
    assert "['port', 'pop3,pop3s']" in dump  # the ban covers both POP3 ports
