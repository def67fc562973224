"""A real fastpop process on 127.0.0.1 and the clients that drive it:
``ServerProcess`` (start, users, log, stop), ``serving`` for fixtures, ``Raw``
(exact bytes over a socket), ``message`` and the constants the tests share
(``PARSERS``, ``AS_ROOT``, ``NO_EXTENSIONS``)."""


from __future__ import annotations

import contextlib
import itertools
import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fastpop import _compiled

# FASTPOP_NO_EXTENSIONS=1 pytest: the pure-Python twins only (servers run the
# Python parser, the ``twin`` fixture skips its compiled case).  Without it a
# compiled module that is not built fails the tests that need it.
NO_EXTENSIONS = _compiled.NO_EXTENSIONS
PARSERS = {"py-parser": "python"} if NO_EXTENSIONS else {"c-parser": "cython", "py-parser": "python"}
# Run as root (CI is), fastpop refuses to touch mail as root unless told to; the tests'
# own Maildirs, which only root writes, are served so (tests/test_hostile_maildir.py
# attacks this and the dropped configuration).
AS_ROOT = ["--allow-mail-as-root"] if os.geteuid() == 0 else []
_user_ids = itertools.count(1)


def mailbox_held(maildir) -> bool:
    """Whether a fastpop process of this host holds the mailbox in the lock
    table (the default [mail] lock), asked as another process would."""
    from fastpop.store.locking import LockTable

    table = LockTable()
    try:
        return table.holder(str(maildir))
    finally:
        table.close()


def tracer_of(pid: int, tid: str) -> int:
    """The pid tracing thread ``tid`` of ``pid`` (0: none; -1: the thread is gone), to wait
    until an attached strace sees every thread."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return -1
    return 0


def message(subject: str = "test", body: str = "Hello.\r\n", size: int | None = None) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    text = f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\n{body}".encode()
    if size is not None and size > len(text):
        filler = (b"x" * 70 + b"\r\n") * ((size - len(text)) // 72 + 1)
        text = (text + filler)[:size]
    return text


class ServerProcess:
    command = "serve"  # (a subclass may run another subcommand taking serve's flags: proxy)

    def __init__(self, root: Path, parser: str, loop: str = "uvloop", extra_args: list[str] | None = None):
        self.root = root
        self.parser = "python" if NO_EXTENSIONS else parser
        self.loop = loop
        self.passwd = root / "passwd"
        self.mail = root / "mail"
        self.mail.mkdir(parents=True, exist_ok=True)
        self.passwd.touch()
        self.log_path = root / "server.log"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.preexec_fn = None  # run in the server's process before exec (resource limits)
        self.port = 0
        self._seq = 0

    # -- lifecycle
    def start(self, port: int = 0) -> None:
        env = dict(os.environ)
        env.pop("FASTPOP_NO_EXTENSIONS", None)
        if self.parser == "python":
            env["FASTPOP_NO_EXTENSIONS"] = "1"
        args = [
            sys.executable, "-m", "fastpop", self.command,
            "--listen", f"127.0.0.1:{port}",
            "--passwd-file", str(self.passwd),
            "--mail-location", str(self.mail) + "/%u",
            "--auth-failure-delay", "0.05",
            "--loop", self.loop,
            "--log-level", "debug",
            "--workers", "1",  # one process unless a test asks for more (the default is the CPU count)
            "--shutdown-timeout", "2",  # SIGTERM waits this long for logged-in sessions (default 30)
            *self.extra_args,
        ]
        if not any(a.startswith("--control-socket") for a in self.extra_args):
            # its own: the default (/run/fastpop/control.sock as root) is one per host
            args += ["--control-socket", str(self.root / "control.sock")]
        if "--user" not in self.extra_args:
            args += AS_ROOT
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(parser: (\w+), loop: (\w+)",
                          self.log()[self._log_offset:])
            if m:
                self.port = int(m.group(1))
                assert m.group(2) == self.parser, f"expected parser {self.parser}, server says {m.group(2)}"
                assert m.group(3) == self.loop
                return
            if self.proc.poll() is not None:
                raise RuntimeError("fastpop exited at start:\n" + self.log())
            time.sleep(0.02)
        raise RuntimeError("fastpop did not start:\n" + self.log())

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log_file.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- users and mail
    def add_user(self, messages: list[bytes] = (), password: str = "secret", name: str | None = None,
                 stored: str | None = None) -> User:
        name = name or f"user{next(_user_ids)}"
        with open(self.passwd, "a") as f:
            f.write(f"{name}:{stored or '{PLAIN}' + password}\n")
        user = User(self, name, password, self.mail / name)
        for sub in ("cur", "new", "tmp"):
            (user.maildir / sub).mkdir(parents=True, exist_ok=True)
        for data in messages:
            user.deliver(data)
        return user

    def connect(self, timeout: float = 10) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.port, timeout=timeout)


class User:
    def __init__(self, server: ServerProcess, name: str, password: str, maildir: Path):
        self.server, self.name, self.password, self.maildir = server, name, password, maildir

    def deliver(self, data: bytes, sizes_in_name: bool = False) -> Path:
        s = self.server
        s._seq += 1
        name = f"{1700000000 + s._seq}.M{s._seq}P{os.getpid()}.test"
        if sizes_in_name:
            crlf = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            name += f",S={len(data)},W={len(crlf)}"
        tmp = self.maildir / "tmp" / name
        tmp.write_bytes(data)
        target = self.maildir / "new" / name
        tmp.rename(target)
        return target

    def login(self) -> poplib.POP3:
        p = self.server.connect()
        p.user(self.name)
        p.pass_(self.password)
        return p

    def login_when_free(self, server: ServerProcess | None = None, timeout: float = 5.0) -> poplib.POP3:
        """Log in (to ``server``, else the user's own), retrying while a session
        that just ended still holds the mailbox lock."""
        server = server or self.server
        deadline = time.monotonic() + timeout
        while True:
            p = server.connect()
            try:
                p.user(self.name)
                p.pass_(self.password)
                return p
            except poplib.error_proto as exc:
                p.close()
                if not exc.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def files(self) -> list[Path]:
        return sorted((self.maildir / "cur").iterdir()) + sorted((self.maildir / "new").iterdir())

    def contents(self) -> list[bytes]:
        return sorted(p.read_bytes() for p in self.files())


def serving(srv):
    """For a fixture (``yield from serving(srv)``): start ``srv``, hand it to the test,
    then stop it and check it ended cleanly (exit status 0, no traceback logged)."""
    srv.start()
    yield srv
    rc = srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log
    assert rc == 0, f"server exit code {rc}\n{log}"


class Raw:
    """A POP3 connection over a plain socket: exact bytes in, exact bytes out
    (replies still dot-stuffed), for what poplib hides or cannot send."""

    def __init__(self, port: int, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"server closed the connection; unread: {bytes(self.buf[:200])!r}")
        self.buf += chunk

    def line(self) -> bytes:
        """One reply line, b"\r\n" included."""
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 2]
                return out
            self._fill()

    def cmd(self, text: str | bytes) -> bytes:
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.line()

    def body(self) -> bytes:
        """The raw (still dot-stuffed) body of a multi-line reply, terminator removed."""
        start = 0
        while True:
            if self.buf[:3] == b".\r\n":
                del self.buf[:3]
                return b""
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 5]
                return out
            start = max(0, len(self.buf) - 4)
            self._fill()

    def multi(self, text: str) -> tuple[bytes, bytes]:
        status = self.cmd(text)
        assert status.startswith(b"+OK"), (text, status)
        return status, self.body()

    def read_to_eof(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return out
            out += chunk

    def assert_closed(self) -> None:
        assert self.read_to_eof() == b""

    def close(self) -> None:
        self.sock.close()


def pad_dir(path: Path, count: int) -> None:
    """Fill ``path`` with ``count`` empty hidden files (``.padN``): what a user
    can put in their own ``cur/`` to make every listing of it slow."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f".pad{i}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def raw_login(port: int, user: User, timeout: float = 10) -> Raw:
    """A Raw session logged in with USER/PASS (asserted)."""
    r = Raw(port, timeout=timeout)
    assert r.cmd(f"USER {user.name}").startswith(b"+OK")
    assert r.cmd(f"PASS {user.password}").startswith(b"+OK")
    return r


class POP3From(poplib.POP3):
    """poplib from a source address of our choosing (127.0.0.0/8 holds many), bound before connecting."""

    def __init__(self, source: str, port: int, timeout: float = 10):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def event_loop_reads(srv: ServerProcess) -> int:
    """Octets a single-process server's event-loop thread has read so far
    (read(2), pread(2), sendfile(2)...: the rchar of its main thread, whose
    thread id is the pid; the threads' reads are counted apart)."""
    assert srv.proc is not None
    pid = srv.proc.pid
    with open(f"/proc/{pid}/task/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/task/{pid}/io")


@contextlib.contextmanager
def pinging(victim: Raw) -> Iterator[list[float]]:
    """Another user's NOOPs, one after the other, while the block runs: their waits."""
    stop = threading.Event()
    waits: list[float] = []

    def ping() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            assert victim.cmd("NOOP").startswith(b"+OK")
            waits.append(time.monotonic() - t0)
            time.sleep(0.001)

    pinger = threading.Thread(target=ping)
    pinger.start()
    time.sleep(0.05)
    try:
        yield waits
    finally:
        stop.set()
        pinger.join(60)
