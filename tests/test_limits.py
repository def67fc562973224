"""Connection limits, running out of descriptors, graceful SIGTERM, SIGHUP reloads."""

from __future__ import annotations

import os
import poplib
import resource
import signal
import socket
import time

import pytest
from support.server import Raw, ServerProcess, mailbox_held, message

SERVER_FULL = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
FROM_ADDRESS = b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
SHUTDOWN = b"-ERR [SYS/TEMP] Server shutting down.\r\n"


def _greeting(port: int, source: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    """Connect (from ``source``) and read the first line; the socket stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, data


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def _server(tmp_path, *args: str, name: str = "srv") -> ServerProcess:
    srv = ServerProcess(tmp_path / name, "cython", extra_args=list(args))
    return srv


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("workers", [1, 2])
def test_total_limit_over_all_workers(tmp_path, workers):
    srv = _server(tmp_path, "--max-connections", "4", "--workers", str(workers))
    srv.start()
    try:
        held, answers = [], []
        for _ in range(10):
            sock, line = _greeting(srv.port)
            answers.append(line)
            held.append(sock)
        assert sum(a.startswith(b"+OK") for a in answers) == 4
        refused = [s for s, a in zip(held, answers, strict=True) if not a.startswith(b"+OK")]
        assert all(a == SERVER_FULL for a in answers if not a.startswith(b"+OK"))
        assert all(_closed(s) for s in refused)
        for s in held:
            s.close()
        time.sleep(0.3)
        again = [_greeting(srv.port) for _ in range(4)]  # the slots came back
        assert all(line.startswith(b"+OK") for _, line in again)
        for s, _ in again:
            s.close()
        assert "refusing connections: 4 open (max_connections limit)" in srv.log()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_per_address_limit_over_workers_sees_each_address(tmp_path):
    srv = _server(tmp_path, "--workers", "2", "--trusted-networks", "none", "--max-connections-per-ip", "3")
    srv.start()
    try:
        first = [_greeting(srv.port, "127.0.0.5") for _ in range(8)]
        assert sum(line.startswith(b"+OK") for _, line in first) == 3
        assert {line for _, line in first if not line.startswith(b"+OK")} == {FROM_ADDRESS}
        other = [_greeting(srv.port, "127.0.0.6") for _ in range(3)]
        assert all(line.startswith(b"+OK") for _, line in other)
        for s, _ in first + other:
            s.close()
    finally:
        assert srv.stop() == 0


def test_killed_workers_connections_are_no_longer_counted(tmp_path):
    # 20 connections: the kernel's SO_REUSEPORT hash puts all on one worker
    # once in 2**19 (with 6 it happened in a few runs of ten)
    srv = _server(tmp_path, "--workers", "2", "--max-connections", "20", "--apop")  # (pids: APOP timestamps)
    srv.start()
    try:
        held = [_greeting(srv.port) for _ in range(20)]
        pids = {int(line.split(b"<", 1)[1].split(b".", 1)[0]) for _, line in held}
        assert len(pids) == 2, "both workers should hold some of the connections"
        victim = min(pids)
        lost = [s for s, line in held if line.split(b"<", 1)[1].startswith(b"%d." % victim)]
        os.kill(victim, signal.SIGKILL)
        assert all(_closed(s) for s in lost)
        _wait_for(lambda: srv.log().count("worker ") >= 3 and "starting a new one" in srv.log())
        time.sleep(1.0)  # the new worker is up
        again = [_greeting(srv.port) for _ in range(len(lost))]
        assert all(line.startswith(b"+OK") for _, line in again), [line for _, line in again]
        _, extra = _greeting(srv.port)
        assert extra == SERVER_FULL
        for s, _ in held + again:
            s.close()
    finally:
        assert srv.stop() == 0


def test_idle_session_holds_only_its_socket(tmp_path):
    srv = _server(tmp_path)
    srv.start()
    try:
        users = [srv.add_user([message("m")]) for _ in range(100)]
        time.sleep(0.2)
        before = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        sessions = [u.login() for u in users]
        time.sleep(0.3)
        during = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        assert during - before == 100  # one descriptor each: the mailbox lock holds none
        for u in users:
            assert mailbox_held(u.maildir)
        for p in sessions:
            assert p.quit().startswith(b"+OK")
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_running_out_of_descriptors_never_stops_accepting(tmp_path, loop):
    """With 32 descriptors the server meets EMFILE in accept for real (40
    connections are offered); it must log (briefly), go on, and serve again once
    descriptors are free.  (24 left too few for a login's own files beside the
    descriptors a server now holds from its start: the control socket, the
    passwd-file's inotify watch; the login then got [SYS/TEMP], rightly.)"""
    srv = ServerProcess(tmp_path / "srv", "cython", loop=loop)
    srv.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    user = srv.add_user([message("still here")])
    srv.start()
    try:
        held = []
        for _ in range(40):
            try:
                held.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
            except OSError:
                break
        time.sleep(1.5)
        for s in held:
            s.close()
        time.sleep(1.5)  # asyncio retries accepting after 1 s
        p = user.login_when_free(timeout=10)
        assert p.stat()[0] == 1
        assert p.retr(1)[1][-1] == b"Hello."
        assert p.quit().startswith(b"+OK")
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log
    if loop == "asyncio":
        assert 1 <= log.count("accept failed: [Errno 24] Too many open files") <= 5


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_lets_logged_in_sessions_finish(tmp_path):
    srv = _server(tmp_path, "--shutdown-timeout", "20")
    finisher = srv.add_user([message("a"), message("b")])
    srv.start()
    port = srv.port
    p = finisher.login()
    p.dele(1)
    waiting = Raw(port)  # connected, not logged in
    srv.proc.send_signal(signal.SIGTERM)
    assert waiting.read_to_eof() == SHUTDOWN  # pre-login sessions end at once
    _wait_for(lambda: "1 sessions have up to 20 s to finish" in srv.log())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert p.retr(2)[1][-1] == b"Hello."  # the session still works ...
    assert p.quit().startswith(b"+OK")  # ... and its QUIT applies the deletion
    assert finisher.contents() == [message("b")]
    srv.proc.wait(10)  # the last session gone: the server stops without waiting out the deadline
    assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_sigterm_deadline_closes_the_rest_deleting_nothing(tmp_path):
    srv = _server(tmp_path, "--shutdown-timeout", "1")
    user = srv.add_user([message("a"), message("b")])
    srv.start()
    c = Raw(srv.port)
    assert c.cmd(f"USER {user.name}").startswith(b"+OK")
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("DELE 1").startswith(b"+OK")
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert c.read_to_eof() == SHUTDOWN
    assert 0.8 < time.monotonic() - started < 5
    assert srv.proc.wait(10) == 0
    srv.stop()
    assert user.contents() == sorted([message("a"), message("b")])
    assert not mailbox_held(user.maildir)  # released
    assert "closing 1 sessions that did not finish (nothing deleted)" in srv.log()


def test_second_sigterm_ends_the_drain(tmp_path):
    srv = _server(tmp_path, "--shutdown-timeout", "60")
    user = srv.add_user([message("a")])
    srv.start()
    p = user.login()
    p.dele(1)
    srv.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: "sessions have up to 60 s" in srv.log())
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0
    srv.stop()
    assert user.contents() == [message("a")]


def test_sigterm_with_workers_drains_every_worker(tmp_path):
    srv = _server(tmp_path, "--workers", "2", "--shutdown-timeout", "20")
    users = [srv.add_user([message("x"), message("y")]) for _ in range(8)]
    srv.start()
    sessions = [u.login() for u in users]
    for p in sessions:
        p.dele(1)
    srv.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: srv.log().count("sessions have up to 20 s to finish") == 2)
    for p in sessions:
        assert p.quit().startswith(b"+OK")
    assert srv.proc.wait(15) == 0
    srv.stop()
    for u in users:
        assert u.contents() == [message("y")]


# --------------------------------------------------------------------------- SIGHUP


def _write_config(path, expire: str, lmtp: str | None = None) -> None:
    lmtp_section = f'[lmtp]\nlisten = "{lmtp}"\n' if lmtp else ""
    path.write_text(f'[pop3]\nexpire = "{expire}"\n{lmtp_section}')


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rereads_config_and_passwd_file_without_dropping_sessions(tmp_path, workers):
    srv = _server(tmp_path, "--workers", str(workers))
    kept_user = srv.add_user([message("kept")])
    changed = srv.add_user([message("m")], password="old-pw")
    config = tmp_path / "fastpop.toml"
    _write_config(config, "NEVER")
    srv.extra_args += ["--config", str(config)]
    srv.start()
    try:
        kept = kept_user.login()
        _write_config(config, "31", lmtp="127.0.0.1:1")  # listeners cannot change live
        # A same-size in-place edit with the old mtime: only a forced re-read sees it.
        st = srv.passwd.stat()
        srv.passwd.write_text(srv.passwd.read_text().replace("{PLAIN}old-pw", "{PLAIN}new-pw"))
        os.utime(srv.passwd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.kill(srv.proc.pid, signal.SIGHUP)
        _wait_for(lambda: srv.log().count("SIGHUP: configuration, passwd-file reloaded") == workers)
        assert "lmtp_listen changed; that takes a restart (keeping the old value)" in srv.log()
        assert kept.stat()[0] == 1  # the open session is untouched
        assert kept.quit().startswith(b"+OK")
        for _ in range(6):  # every worker took both (connections spread over them)
            p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
            assert p.capa()["EXPIRE"] == ["31"]
            p.user(changed.name)
            with pytest.raises(poplib.error_proto):
                p.pass_("old-pw")
            p.close()
            changed.password = "new-pw"
            p = changed.login_when_free()
            assert p.quit().startswith(b"+OK")
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_sighup_with_a_broken_config_keeps_the_running_one(tmp_path):
    srv = _server(tmp_path)
    user = srv.add_user([message("m")])
    config = tmp_path / "fastpop.toml"
    _write_config(config, "7")
    srv.extra_args += ["--config", str(config)]
    srv.start()
    try:
        config.write_text("[pop3]\nexpire = 'soon'\n")
        os.kill(srv.proc.pid, signal.SIGHUP)
        _wait_for(lambda: "configuration not reloaded, keeping the running one" in srv.log())
        p = user.login()
        assert p.capa()["EXPIRE"] == ["7"]
        p.quit()
    finally:
        assert srv.stop() == 0
