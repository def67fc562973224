"""The Prometheus endpoint (``--metrics-listen``, ``[metrics]``): what a scrape
says matches what the clients did, in one process and summed over workers."""

from __future__ import annotations

import asyncio
import base64
import poplib
import socket
import time
import urllib.error
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from support.server import ServerProcess, message  # noqa: E402

from fastpop.serve.validation import validate_all  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition text: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(port: int, check, timeout: float = 10.0):
    """Scrape until ``check(samples)`` holds (workers flush about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def metered_server(tmp_path, *extra: str) -> tuple[ServerProcess, int]:
    port = free_port()
    # --apop: tests read the worker's pid from the greeting's APOP timestamp
    srv = ServerProcess(tmp_path, "cython", extra_args=["--metrics-listen", f"127.0.0.1:{port}", "--apop", *extra])
    srv.start()
    return srv, port


def drive(srv: ServerProcess, logins: int, failures: int, retrs: int) -> tuple[int, list[int]]:
    """``logins`` sessions each RETRing ``retrs`` messages, ``failures`` wrong
    passwords; returns the message bytes sent and the worker pids seen."""
    user = srv.add_user([message(f"m{i}", size=300 + 100 * i) for i in range(retrs)])
    sent = 0
    pids = []
    for _ in range(logins):
        p = user.login_when_free()
        pids.append(int(p.getwelcome().split(b"<", 1)[1].split(b".", 1)[0]))
        for i in range(1, retrs + 1):
            _, lines, octets = p.retr(i)
            sent += octets
        p.quit()
    for _ in range(failures):
        p = srv.connect()
        p.user(user.name)
        with pytest.raises(poplib.error_proto, match="AUTH"):
            p.pass_("wrong")
        p.quit()
    return sent, pids


def test_counts_match_what_the_clients_did(tmp_path):
    srv, port = metered_server(tmp_path)
    try:
        assert f"metrics on http://127.0.0.1:{port}/metrics" in srv.log()
        sent, _ = drive(srv, logins=3, failures=2, retrs=2)
        # an AUTH PLAIN login counts under its mechanism
        user = srv.add_user([])
        p = srv.connect()
        token = base64.b64encode(f"\0{user.name}\0{user.password}".encode()).decode()
        assert p._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
        p.quit()
        # a single process flushes at the scrape: no waiting needed
        s = scrape(port)
        assert value(s, "fastpop_connections_total") == 3 + 2 + 1
        assert value(s, "fastpop_connections_open") == 0
        assert value(s, "fastpop_sessions_open") == 0
        assert value(s, "fastpop_logins_total", mechanism="USER") == 3
        assert value(s, "fastpop_logins_total", mechanism="PLAIN") == 1
        assert value(s, "fastpop_login_failures_total", mechanism="USER", reason="credentials") == 2
        assert value(s, "fastpop_sessions_total", end="quit") == 4
        assert value(s, "fastpop_commands_total", command="RETR") == 6
        assert value(s, "fastpop_commands_total", command="USER") == 5
        assert value(s, "fastpop_commands_total", command="PASS") == 5
        assert value(s, "fastpop_commands_total", command="AUTH") == 1
        assert value(s, "fastpop_commands_total", command="QUIT") == 6
        # poplib's octet count is the dot-stuffed body (it adds the CRLFs back)
        assert value(s, "fastpop_message_bytes_total", command="RETR") >= sent
        # the latency histogram: one observation per answered command
        assert value(s, "fastpop_command_duration_seconds_count", command="RETR") == 6
        assert value(s, "fastpop_command_duration_seconds_bucket", command="RETR", le="+Inf") == 6
        # a failed PASS is answered after the failure delay (0.05 s in the tests), and timed so
        assert value(s, "fastpop_command_duration_seconds_bucket", command="PASS", le="0.025") <= 4
        assert value(s, "fastpop_command_duration_seconds_sum", command="PASS") >= 2 * 0.05
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()
    # each session is logged once, metrics or not
    assert srv.log().count("disconnected rip=127.0.0.1 auth_failures=1") == 2
    assert srv.log().count(" end=quit") == 4


def test_an_open_session_shows_in_the_gauges(tmp_path):
    srv, port = metered_server(tmp_path)
    try:
        with pytest.raises(urllib.error.HTTPError, match="405"):
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x"), timeout=10)
        head = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/", method="HEAD"), timeout=10)
        assert head.status == 200 and head.read() == b""
        user = srv.add_user([message("x")])
        p = user.login()
        idle = srv.connect()
        s = scrape(port)
        assert value(s, "fastpop_connections_open") == 2
        assert value(s, "fastpop_sessions_open") == 1
        p.quit()
        idle.quit()
        s = scrape(port)
        assert value(s, "fastpop_connections_open") == 0
        assert value(s, "fastpop_sessions_open") == 0
    finally:
        assert srv.stop() == 0


def test_workers_are_summed_by_the_supervisor(tmp_path):
    srv, port = metered_server(tmp_path, "--workers", "2")
    try:
        logins, failures, retrs = 0, 2, 1
        pids: set[int] = set()
        sent = 0
        while len(pids) < 2 and logins < 60:  # until both workers served someone
            n, seen = drive(srv, logins=4, failures=0, retrs=retrs)
            sent += n
            logins += 4
            pids.update(seen)
        assert len(pids) == 2
        drive(srv, logins=0, failures=failures, retrs=0)
        expected = {
            ("fastpop_logins_total", (("mechanism", "USER"),)): logins,
            ("fastpop_login_failures_total", (("mechanism", "USER"), ("reason", "credentials"))): failures,
            ("fastpop_commands_total", (("command", "RETR"),)): logins * retrs,
            ("fastpop_connections_total", ()): logins + failures,
            ("fastpop_message_bytes_total", (("command", "RETR"),)): None,
        }
        s = wait_for(port, lambda s: all(v is None or s.get(k) == v for k, v in expected.items()))
        for key, want in expected.items():
            if want is not None:
                assert s.get(key) == want, (key, s.get(key), want)
        assert value(s, "fastpop_message_bytes_total", command="RETR") >= sent
        assert value(s, "fastpop_connections_open") == 0
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_a_dead_worker_leaves_its_counts_and_no_live_gauge(tmp_path):
    import os
    import signal

    srv, port = metered_server(tmp_path, "--workers", "2")
    try:
        user = srv.add_user([message("x")])
        p = user.login()
        victim = int(p.getwelcome().split(b"<", 1)[1].split(b".", 1)[0])
        p.stat()
        wait_for(port, lambda s: value(s, "fastpop_sessions_open") == 1)
        os.kill(victim, signal.SIGKILL)  # dies holding an open session
        s = wait_for(port, lambda s: value(s, "fastpop_sessions_open") == 0 and
                     value(s, "fastpop_connections_open") == 0)
        assert value(s, "fastpop_sessions_open") == 0  # marked dead: its live gauges are gone
        assert value(s, "fastpop_logins_total", mechanism="USER") == 1  # its counter stays
    finally:
        assert srv.stop() == 0


def test_the_multiprocess_directory_is_removed_at_stop(tmp_path):
    import glob
    import tempfile

    srv, port = metered_server(tmp_path, "--workers", "2")
    # named with the supervisor's pid (fastpop.serve.metrics): other servers' directories do not count
    mine = f"{tempfile.gettempdir()}/fastpop-metrics-{srv.proc.pid}-*"
    assert len(glob.glob(mine)) == 1
    assert srv.stop() == 0
    assert not glob.glob(mine)


def test_metrics_off_means_the_plain_protocol(tmp_path):
    """Without [metrics] listen the sessions are POP3Protocol: no counting at all."""
    from fastpop.config import Config
    from fastpop.serve.server import start
    from fastpop.session.protocol import POP3Protocol

    passwd = tmp_path / "passwd"
    passwd.write_text("")

    async def main():
        ctx, servers = await start(Config(listen=["127.0.0.1:0"], passwd_file=str(passwd)))
        try:
            assert ctx.metrics is None
            factory = servers[0]._protocol_factory if hasattr(servers[0], "_protocol_factory") else None
            if factory is not None:
                assert type(factory()) is POP3Protocol
        finally:
            for server in servers:
                server.close()

    asyncio.run(main())


def test_config_file_and_validation(tmp_path):
    from fastpop.config import load_toml

    path = tmp_path / "fastpop.toml"
    path.write_text('[metrics]\nlisten = "127.0.0.1:9110"\nflush_interval = 0.5\n')
    config = load_toml(str(path))
    assert config.metrics_listen == "127.0.0.1:9110" and config.metrics_flush_interval == 0.5
    config.passwd_file = str(path)
    validate_all(config)
    config.metrics_listen = "nowhere"
    with pytest.raises(ValueError, match="HOST:PORT"):
        validate_all(config)
    config.metrics_listen = None
    config.metrics_flush_interval = 0
    with pytest.raises(ValueError, match="flush_interval"):
        validate_all(config)


def test_overhead_benchmark_runs():
    """benchmarks/metrics_overhead.py (what metrics cost a session) keeps working."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "benchmarks" / "metrics_overhead.py"), "--sessions", "50",
                          "--rounds", "2"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr
    assert "us/session" in out.stdout and "overhead" in out.stdout


def test_sessions_behind_a_proxy_are_counted(tmp_path):
    """[proxy] listeners make their own session class: metered as well."""
    from support.server import Raw

    proxy_port = free_port()
    srv, port = metered_server(tmp_path, "--proxy-listen", f"127.0.0.1:{proxy_port}",
                               "--proxy-trusted-networks", "127.0.0.1/32")
    try:
        user = srv.add_user([message("via proxy")])
        sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
        sock.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 110\r\n")
        raw = Raw.__new__(Raw)
        raw.sock, raw.buf = sock, bytearray()
        assert raw.line().startswith(b"+OK")
        assert raw.cmd(f"USER {user.name}").startswith(b"+OK")
        assert raw.cmd(f"PASS {user.password}").startswith(b"+OK")
        raw.multi("RETR 1")
        assert raw.cmd("QUIT").startswith(b"+OK")
        raw.close()
        s = wait_for(port, lambda s: value(s, "fastpop_sessions_total", end="quit") == 1)
        assert value(s, "fastpop_logins_total", mechanism="USER") == 1
        assert value(s, "fastpop_commands_total", command="RETR") == 1
        assert value(s, "fastpop_connections_total") == 1
        assert value(s, "fastpop_connections_open") == 0
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()
