"""Process lifecycle: workers never outlive their supervisor, one generation
per port, readiness only once every listener accepts, and errors that name
the user's paths.  Real servers (``--workers N``) killed under load."""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.server import AS_ROOT, Raw, ServerProcess, message

from fastpop.store.locking import default_table_path

SHUTDOWN = 2.0  # --shutdown-timeout of ServerProcess
SLACK = 1.5  # past it: closing the sessions that did not finish, the process's exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(srv: ServerProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", srv.log())]


def greeting_pid(greeting: bytes) -> int:
    """The pid in the APOP timestamp <pid.counter.random@host> (servers run with --apop)."""
    return int(greeting.split(b"<", 1)[1].split(b".", 1)[0])


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group(pgid: int) -> list[int]:
    """The running processes of process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry))
    return out


def wait_until(check, timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds; AssertionError after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.02)
    return time.monotonic() - start


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # the listener closed with this connection in its queue: it is going
        # away, but only a refusal shows it gone; ask again
        return False
    return False


def serve_args(root: Path, port: int, *extra: str, host: str = "127.0.0.1") -> list[str]:
    root.mkdir(exist_ok=True)
    (root / "passwd").touch()
    return [sys.executable, "-m", "fastpop", "serve", "--listen", f"{host}:{port}",
            "--passwd-file", str(root / "passwd"), "--mail-location", f"{root}/mail/%u",
            "--log-level", "debug", "--shutdown-timeout", "1", *AS_ROOT, *extra]


def run_bounded(args: list[str], cwd: Path, timeout: float = 15) -> subprocess.CompletedProcess:
    """A fastpop expected to exit by itself; one that does not is killed with
    every process it started (its own process group), and that is a failure."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{err}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> str:
    """SIGTERM to a fastpop started with start_new_session; its stderr.  One that
    does not stop is killed with every process it started."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"still running {timeout} s after SIGTERM:\n{err}") from None
    return err or ""


def second_start(root: Path, port: int, *extra: str, host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return run_bounded(serve_args(root, port, *extra, host=host), root)


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(3) == b"+OK"
    except OSError:
        return False


def kill_left(pids: list[int], root: Path) -> None:
    """After a failed test: the workers it started (serving from ``root``) must not stay."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = str(root).encode() in f.read()
        except FileNotFoundError:
            continue
        if ours and alive(pid):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------- the supervisor killed


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_supervisor_killed_under_load(tmp_path, loop):
    """SIGKILL of the supervisor with sessions logged in, connecting, and coming
    and going: the workers stop accepting at once, let logged-in sessions finish
    (a QUIT still deletes) for shutdown_timeout, then end; nothing is lost; a
    fastpop started meanwhile on the port is refused, and one started after
    them serves alone."""
    srv = ServerProcess(tmp_path, "cython", loop=loop, extra_args=["--workers", "2", "--apop"])
    mails = {i: [message(f"user {i} message {j}") for j in range(3)] for i in range(6)}
    users = [srv.add_user(mails[i]) for i in range(6)]
    srv.start()
    port = srv.port
    old = worker_pids(srv)
    assert len(old) == 2
    stop = threading.Event()
    churned = [0]
    try:
        finisher = users[0].login()  # QUITs after the supervisor is gone: its DELE applies
        assert finisher.stat()[0] == 3
        midway = users[1].login()  # never QUITs: its DELEs must not apply
        midway.dele(1)
        midway.dele(2)
        greeted = [Raw(port) for _ in range(4)]  # connected, not logged in
        half = Raw(port)
        assert half.cmd(f"USER {users[2].name}").startswith(b"+OK")  # between USER and PASS

        def churn(user) -> None:  # sessions coming and going, reading only
            while not stop.is_set():
                try:
                    p = poplib.POP3("127.0.0.1", port, timeout=5)
                    p.user(user.name)
                    p.pass_(user.password)
                    p.retr(1)
                    p.quit()
                    churned[0] += 1
                except (OSError, poplib.error_proto, EOFError):
                    time.sleep(0.01)

        threads = [threading.Thread(target=churn, args=(u,), daemon=True) for u in users[3:]]
        for t in threads:
            t.start()
        wait_until(lambda: churned[0] >= 10, 5, "the load did not get going")

        supervisor = srv.proc.pid
        srv.kill()
        # no new connection is accepted, at once
        took = wait_until(lambda: refused(port), 2.0, "the workers still accept after the supervisor died")
        # sessions that had not logged in are closed, at once
        for raw in [*greeted, half]:
            raw.sock.settimeout(2.0)
            try:
                raw.read_to_eof()  # (-ERR [SYS/TEMP] and the end, or a reset: closed either way)
            except ConnectionResetError:
                pass
            raw.close()
        # a second fastpop is refused while the orphans drain (the claim is theirs: their supervisor is gone)
        second = second_start(tmp_path / "second", port, "--workers", "2")
        assert second.returncode == 1, second.stderr
        assert f"127.0.0.1:{port} is served by another fastpop (pid {supervisor}, or the workers it started)" \
            in second.stderr, second.stderr
        # a logged-in session may still finish, and its QUIT deletes
        finisher.dele(1)
        assert finisher.quit().startswith(b"+OK")
        # the rest are closed at the deadline, nothing of theirs deleted, and the workers end
        gone = wait_until(lambda: not any(alive(pid) for pid in old), SHUTDOWN + SLACK,
                          f"workers {old} still running {SHUTDOWN + SLACK} s after their supervisor died")
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            midway.stat()
        stop.set()
        for t in threads:
            t.join(5)
        log = srv.log()
        assert log.count("supervisor is gone: stopping as on SIGTERM") == 2, log
        assert "Traceback" not in log, log
        print(f"refused after {took:.3f} s, workers gone after {gone:.2f} s, {churned[0]} sessions of load")

        assert users[0].contents() == sorted(mails[0][1:])
        for i in range(1, 6):
            assert users[i].contents() == sorted(mails[i]), i

        # the next generation on the same port serves alone
        new = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2", "--apop"])
        new.start(port)
        try:
            fresh = set(worker_pids(new)[len(old):])
            assert len(fresh) == 2
            seen = set()
            for _ in range(40):
                raw = Raw(port)
                seen.add(greeting_pid(raw.greeting))
                raw.close()
            assert seen <= fresh, f"connections reached {seen - fresh}, not this generation's {fresh}"
            p = users[1].login()
            assert p.stat()[0] == 3
            p.quit()
        finally:
            assert new.stop() == 0
    finally:
        stop.set()
        if srv.proc is not None:
            srv.kill()
        kill_left(old, tmp_path)


def test_replaced_worker_ends_with_the_supervisor_too(tmp_path):
    """A worker started after a crash inherited the supervisor's descriptors
    too: the killed supervisor's end reaches it as well."""
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2", "--apop"])
    srv.start()
    first = worker_pids(srv)
    try:
        os.kill(first[1], signal.SIGKILL)
        wait_until(lambda: len(worker_pids(srv)) == 3 and f"worker serving on 127.0.0.1:{srv.port}" in
                   srv.log().rpartition("starting a new one")[2], 10, "no replacement worker")
        everyone = worker_pids(srv)
        srv.kill()
        wait_until(lambda: not any(alive(pid) for pid in everyone), SHUTDOWN + SLACK,
                   f"workers still running after their supervisor died: {[p for p in everyone if alive(p)]}")
        assert "Traceback" not in srv.log()
    finally:
        if srv.proc is not None:
            srv.kill()
        kill_left(first + worker_pids(srv), tmp_path)


def test_supervisor_killed_while_its_workers_start(tmp_path):
    """Killed before its workers are all ready (its end of the pipe may be closed
    before a worker looks): no worker stays, none listens."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(serve_args(tmp_path, port, "--workers", "4"), stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        wait_until(lambda: "worker 0 started" in log_path.read_text(), 10, "no worker started")
        proc.kill()
        proc.wait()
        wait_until(lambda: not group(proc.pid), SLACK, f"workers still running after their supervisor died: "
                                                       f"{group(proc.pid)}")
        assert refused(port)
        assert "Traceback" not in log_path.read_text()
    finally:
        kill_left(group(proc.pid), tmp_path)


# ----------------------------------------------------------------- one generation per port


@pytest.mark.parametrize(("first", "second"), [(2, 2), (1, 2), (2, 1), (1, 1)])
def test_second_start_on_a_served_port_is_refused(tmp_path, first, second):
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", str(first)])
    srv.start()
    try:
        r = second_start(tmp_path / "second", srv.port, "--workers", str(second))
        assert r.returncode == 1, r.stderr
        assert f"fastpop: 127.0.0.1:{srv.port} is served by another fastpop (pid {srv.proc.pid}" in r.stderr, \
            r.stderr
        assert "Traceback" not in r.stderr
        p = srv.add_user([message("still here")]).login()  # the first one is untouched
        assert p.stat()[0] == 1
        p.quit()
    finally:
        port = srv.port
        assert srv.stop() == 0
    claims = Path(os.path.dirname(default_table_path()))
    assert not list(claims.glob(f"listen-*-{port}.lock"))  # a generation that ends removes its claims


def test_wildcard_and_specific_addresses_on_one_port(tmp_path):
    """0.0.0.0:P beside 127.0.0.1:P would take the other's connections (the more
    specific address wins): refused, both ways; two specific addresses share a port."""
    port = free_port()
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2"])
    srv.start(port)
    try:
        r = second_start(tmp_path / "wildcard", port, "--workers", "2", host="0.0.0.0")
        assert r.returncode == 1 and f"0.0.0.0:{port} is served by another fastpop" in r.stderr, r.stderr
        beside = subprocess.Popen(serve_args(tmp_path / "beside", port, "--workers", "2", host="127.0.0.2"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_until(lambda: accepts("127.0.0.2", port), 10, "127.0.0.2 not served")
            assert accepts("127.0.0.1", port)
        finally:
            err = stop_group(beside)
        assert beside.returncode == 0, err
    finally:
        assert srv.stop() == 0
    wildcard = subprocess.Popen(serve_args(tmp_path / "wild", port, "--workers", "2", host="0.0.0.0"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: accepts("127.0.0.1", port), 10, "0.0.0.0 not served")
        r = second_start(tmp_path / "specific", port, "--workers", "2")
        assert r.returncode == 1 and f"127.0.0.1:{port} is served by another fastpop" in r.stderr, r.stderr
    finally:
        err = stop_group(wildcard)
    assert wildcard.returncode == 0, err


# ----------------------------------------------------------------- readiness


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)

    def ready(self, proc: subprocess.Popen, timeout: float = 15) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, "fastpop exited"
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            if msg.get("READY") == "1":
                return msg
        raise AssertionError("no READY=1")


@pytest.mark.parametrize("ready_by", ["notify", "pop3"])
def test_lmtp_accepts_as_soon_as_the_server_is_ready(tmp_path, ready_by):
    """A client (an MTA, a test) that connects to LMTP the moment systemd hears
    READY=1, or the moment POP3 answers, gets in."""
    pop3, lmtp = free_port(), free_port()
    env = dict(os.environ)
    notify = None
    if ready_by == "notify":
        notify = NotifySocket(tmp_path / "notify")
        env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(serve_args(tmp_path, pop3, "--workers", "4", "--lmtp-listen", f"127.0.0.1:{lmtp}"),
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
    listening_line = re.compile(r"fastpop \S+ listening on 127\.0\.0\.1:\d+ \(parser: \w+, loop: \w+, 4 workers")
    try:
        if notify is not None:
            notify.ready(proc)
        else:
            # as a poller would: connections waiting for their greeting, the first one that comes
            start = time.monotonic()
            waiting: list[socket.socket] = []
            greeted = False
            while not greeted:
                assert time.monotonic() - start < 15 and proc.poll() is None, "no POP3 greeting"
                try:
                    s = socket.create_connection(("127.0.0.1", pop3), timeout=1)
                    s.setblocking(False)
                    waiting.append(s)
                except ConnectionRefusedError:
                    pass
                for s in waiting:
                    try:
                        greeted = greeted or s.recv(3) == b"+OK"
                    except BlockingIOError:
                        pass
                time.sleep(0.001)
            for s in waiting:
                s.close()
        with socket.create_connection(("127.0.0.1", lmtp), timeout=5) as s:
            assert s.recv(4) == b"220 "
        with socket.create_connection(("127.0.0.1", pop3), timeout=5) as s:
            assert s.recv(3) == b"+OK"
        wait_until(lambda: listening_line.search(log_path.read_text()), 10, "the server never said it listens")
    finally:
        stop_group(proc)
        if notify is not None:
            notify.sock.close()
    err = log_path.read_text()
    assert proc.returncode == 0, err
    listening = listening_line.search(err)
    assert listening, err
    # the line that says so comes after every worker's and after LMTP's
    assert listening.start() > max(m.start() for m in re.finditer("worker serving on", err))
    assert err.index("LMTP listening on") < listening.start()


def test_a_worker_that_cannot_start_fails_the_start(tmp_path):
    """Worker 0 cannot bind its LMTP listener: the supervisor says so and exits
    1 (before, it restarted the worker every second, for ever, and said it was
    ready to systemd)."""
    (tmp_path / "not-a-socket").write_text("")
    start = time.monotonic()
    r = run_bounded(serve_args(tmp_path, 0, "--workers", "2", "--lmtp-listen", f"unix:{tmp_path}/not-a-socket"),
                    tmp_path, timeout=10)
    assert r.returncode == 1, r.stderr
    assert re.search(r"fastpop: worker 0 \(pid \d+\) exited with status 1 before its listeners were open", r.stderr), \
        r.stderr
    assert "not-a-socket exists and is not a socket" in r.stderr
    assert time.monotonic() - start < 10
    assert "listening on" not in r.stderr.replace("LMTP listening", "")


# ----------------------------------------------------------------- error messages


def test_a_missing_passwd_file_directory_is_named(tmp_path):
    """The passwd-file's directory does not exist: the message names the file
    given, never the temporary file fastpop would have written first."""
    legacy = tmp_path / "legacy" / "example.com" / "alice"
    legacy.mkdir(parents=True)
    (legacy / "Secr3t.pwd").write_bytes(b"")
    (legacy / "1.eml").write_bytes(message("old"))
    missing = tmp_path / "no-such-dir" / "passwd"
    r = subprocess.run([sys.executable, "-m", "fastpop", "import", "legacy", str(tmp_path / "legacy"),
                        "--passwd-file", str(missing), "--mail-root", str(tmp_path / "mail")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert str(missing) in r.stderr and ".passwd." not in r.stderr, r.stderr
    assert not (tmp_path / "mail").exists()  # refused before anything is written
    r = subprocess.run([sys.executable, "-m", "fastpop", "user", "add", "bob", "--passwd-file", str(missing),
                        "--scheme", "SSHA256"], input="a password\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"fastpop: [Errno 2] No such file or directory: '{missing}'\n", r.stderr
