"""systemd: sd_notify to a real datagram socket, and socket activation by the
real ``systemd-socket-activate`` (Debian's systemd package)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.server import AS_ROOT, ServerProcess, message

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed")
REPO = Path(__file__).resolve().parents[1]


class NotifySocket:
    """What a service manager listens with: a Unix datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.address = address
        self.messages: list[dict[str, str]] = []

    def receive(self, until, timeout: float = 20.0) -> list[dict[str, str]]:
        """Read datagrams until ``until(message)`` holds for one; all read so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(msg)
            if until(msg):
                return self.messages
        raise AssertionError(f"no such notification; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)


@pytest.fixture
def notify(tmp_path, monkeypatch):
    sock = NotifySocket(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    yield sock
    sock.close()


def test_ready_watchdog_stopping(tmp_path, notify):
    srv = ServerProcess(tmp_path, "cython")
    srv.start()
    try:
        msgs = notify.receive(lambda m: m.get("READY") == "1")
        ready = msgs[-1]
        assert ready["MAINPID"] == str(srv.proc.pid)
        assert ready["STATUS"] == f"Listening on 127.0.0.1:{srv.port}"
        # READY comes once the listeners are open: a client gets in right away
        user = srv.add_user([message("x")])
        p = user.login()
        assert p.stat()[0] == 1
        p.quit()
        start = len(notify.messages)
        idle = srv.connect()
        notify.receive(lambda m: m.get("WATCHDOG") == "1" and len(notify.messages) >= start + 3)
        # each ping carries what the server is doing
        assert notify.messages[-1]["STATUS"] == f"Listening on 127.0.0.1:{srv.port}; connections: 1"
        idle.quit()
    finally:
        proc = srv.proc
        srv.stop()
    msgs = notify.receive(lambda m: m.get("STOPPING") == "1")
    assert msgs[-1]["STATUS"] == "Stopping (SIGTERM)"
    assert proc.returncode == 0


def test_abstract_notify_socket(tmp_path, monkeypatch):
    sock = NotifySocket(f"@fastpop-test-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
    srv = ServerProcess(tmp_path, "cython")
    srv.start()
    try:
        assert sock.receive(lambda m: m.get("READY") == "1")[-1]["MAINPID"] == str(srv.proc.pid)
        assert not any("WATCHDOG" in m for m in sock.messages)  # no WATCHDOG_USEC: no pings
    finally:
        srv.stop()
        sock.close()


def test_workers_notify_from_the_supervisor(tmp_path, notify):
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2"])
    srv.start()
    try:
        msgs = notify.receive(lambda m: m.get("READY") == "1")
        assert msgs[-1]["MAINPID"] == str(srv.proc.pid)  # the supervisor, the unit's main process
        assert "with 2 workers" in msgs[-1]["STATUS"]
        start = len(notify.messages)
        notify.receive(lambda m: m.get("WATCHDOG") == "1" and len(notify.messages) >= start + 2)
        user = srv.add_user([message("x")])
        p = user.login()
        p.quit()
    finally:
        srv.stop()
    notify.receive(lambda m: m.get("STOPPING") == "1")
    assert sum(1 for m in notify.messages if m.get("READY")) == 1  # the workers never say READY


def test_notifier_without_socket_does_nothing():
    from fastpop.serve.systemd import Notifier

    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None and n.ready("x") is False
    n = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert n.address == "\0x" and n.watchdog_interval is None  # the pings are for pid 1, not us
    n = Notifier({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 1.5


def test_listen_fds_parsing():
    from fastpop.serve.systemd import listen_fds

    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_fds(env) == [] and env == {}  # for another process; removed all the same
    # (fds 3.. are not touched when the pid is not ours)


# ------------------------------------------------------------------ socket activation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Activated:
    """``systemd-socket-activate -l 127.0.0.1:PORT python -m fastpop serve ...``"""

    def __init__(self, tmp_path: Path, *serve_args: str, fdname: str = "pop3", env: dict | None = None):
        self.root = tmp_path
        self.port = free_port()
        self.passwd = tmp_path / "passwd"
        self.passwd.write_text("")
        self.mail = tmp_path / "mail"
        self.log_path = tmp_path / "server.log"
        passenv = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   **(env or {})}
        args = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{self.port}", f"--fdname={fdname}"]
        for key, value in passenv.items():
            args += ["-E", f"{key}={value}"]
        args += [sys.executable, "-m", "fastpop", "serve",
                 "--listen", "127.0.0.1:1",  # never bound: the inherited socket replaces it
                 "--passwd-file", str(self.passwd), "--mail-location", f"{self.mail}/%u",
                 "--log-level", "debug", *AS_ROOT, *serve_args]
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 10
        while f"Listening on 127.0.0.1:{self.port}" not in self.log():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def add_user(self, name: str, messages: list[bytes]) -> None:
        with open(self.passwd, "a") as f:
            f.write(f"{name}:{{PLAIN}}secret\n")
        for sub in ("cur", "new", "tmp"):
            (self.mail / name / sub).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(messages):
            (self.mail / name / "new" / f"{1700000000 + i}.M{i}.test").write_bytes(data)

    def login(self, name: str):
        import poplib

        p = poplib.POP3("127.0.0.1", self.port, timeout=20)  # the first connection starts fastpop
        p.user(name)
        p.pass_("secret")
        return p

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@needs_activate
def test_socket_activation(tmp_path):
    notify = NotifySocket(str(tmp_path / "notify"))
    srv = Activated(tmp_path, "--workers", "1", env={"NOTIFY_SOCKET": notify.address})
    try:
        srv.add_user("alice", [message("activated")])
        p = srv.login("alice")  # fastpop is exec'd on this connection, and serves it
        assert p.stat()[0] == 1
        assert b"activated" in b"\n".join(p.retr(1)[1])
        p.quit()
        ready = notify.receive(lambda m: m.get("READY") == "1")[-1]
        assert ready["MAINPID"] == str(srv.proc.pid)  # systemd-socket-activate exec'd fastpop in place
        assert ready["STATUS"] == f"Listening on 127.0.0.1:{srv.port}"
        log = srv.log()
        assert f"listening on 127.0.0.1:{srv.port} (parser:" in log
        assert "listening on 127.0.0.1:1 " not in log  # the configured address was not bound
    finally:
        assert srv.stop() == 0, srv.log()
        notify.close()
    assert "Traceback" not in srv.log()


@needs_activate
def test_socket_activation_with_workers_shares_the_socket(tmp_path):
    srv = Activated(tmp_path, "--workers", "2", "--apop")  # (the pids: APOP timestamps)
    try:
        srv.add_user("bob", [message("shared")])
        pids = set()
        for _ in range(100):  # (on a loaded machine one worker may win many rounds in a row)
            # held open together, so both workers have work to take from the queue
            held = [socket.create_connection(("127.0.0.1", srv.port), timeout=20) for _ in range(8)]
            for s in held:
                greeting = s.recv(200)
                assert greeting.startswith(b"+OK")
                pids.add(int(greeting.split(b"<", 1)[1].split(b".", 1)[0]))
                s.close()
            if len(pids) == 2:
                break
        assert len(pids) == 2, "one worker took every connection"
        p = srv.login("bob")
        assert p.stat()[0] == 1
        p.quit()
        assert "with 2 workers" in srv.log() or "starting 2 workers" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()


def test_inherited_sockets_are_sorted_by_name():
    """pop3s: implicit TLS; lmtp: left alone; any other name (systemd's default
    is the unit's name): POP3."""
    from fastpop.serve.systemd import Activated as Sorted

    listeners = []
    for _ in range(3):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listeners.append(listener)
    fds = [os.dup(s.fileno()) for s in listeners]
    got = Sorted(list(zip(fds, ["pop3s", "fastpop.socket", "lmtp"], strict=True)))
    try:
        assert [s.fileno() for s in got.tls] == [fds[0]]
        assert [s.fileno() for s in got.pop3] == [fds[1]]
        assert all(not s.getblocking() for s in got.tls + got.pop3)
    finally:
        for s in got.tls + got.pop3 + listeners:
            s.close()
        os.close(fds[2])


@needs_activate
def test_a_pop3s_socket_without_a_certificate_is_refused(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=pop3s", "-E", f"PYTHONPATH={REPO}",
         sys.executable, "-m", "fastpop", "serve", "--passwd-file", "/dev/null", *AS_ROOT],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert b"pop3s" in out and b"certificate" in out and b"Traceback" not in out
