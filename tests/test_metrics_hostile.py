"""The Prometheus endpoint under hostile scrapers (issue 17): stalled requests
cost a bounded number of connections and no thread each, time out, and a
render never runs on the POP3 event loop."""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from support.server import message
from test_metrics import metered_server, scrape, value

from fastpop.serve.metrics import MAX_CONNECTIONS, REQUEST_TIMEOUT

PARTIAL = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # the blank line never comes
# A multiprocess file that holds no value: its header says 8 octets are used.
EMPTY_DB = struct.pack("i", 8) + bytes(4)


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


def connect_many(port: int, n: int, data: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if data:
            sock.sendall(data)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def still_open(socks: list[socket.socket], timeout: float, enough: int = 0) -> set[socket.socket]:
    """The sockets the server has not closed (EOF or reset) within ``timeout``,
    or once no more than ``enough`` are left."""
    pending = set(socks)
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while len(pending) > enough and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    pending.discard(key.fileobj)
                    sel.unregister(key.fileobj)
    return pending


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_supervisor_endpoint_is_bounded_and_times_out(tmp_path):
    """--workers: 200 stalled requests hold no thread each, at most
    MAX_CONNECTIONS of them stay open, and those close at the timeout."""
    srv, port = metered_server(tmp_path, "--workers", "2")
    socks: list[socket.socket] = []
    try:
        supervisor = srv.proc.pid
        socks = connect_many(port, 200, PARTIAL)
        started = time.monotonic()
        assert threads(supervisor) <= 5
        assert "fastpop_connections_total" in {name for name, _ in scrape(port)}  # served meanwhile
        assert threads(supervisor) <= 5
        left = still_open(socks, 1.0, MAX_CONNECTIONS)
        assert len(left) <= MAX_CONNECTIONS
        left = still_open(list(left), REQUEST_TIMEOUT + 2 - (time.monotonic() - started))
        assert not left, f"{len(left)} stalled requests still open {REQUEST_TIMEOUT + 2} s later"
        # the supervisor's HTTP: methods, header bound, HEAD
        assert raw_request(port, b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        huge = b"GET / HTTP/1.0\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert raw_request(port, huge).startswith(b"HTTP/1.1 431 ")
        head = raw_request(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    finally:
        for sock in socks:
            sock.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_single_process_idle_scrapers_are_bounded(tmp_path):
    """One process: 200 connections that send nothing keep at most
    MAX_CONNECTIONS open; scrapes and POP3 are still served."""
    srv, port = metered_server(tmp_path)
    socks: list[socket.socket] = []
    try:
        socks = connect_many(port, 200)
        assert len(still_open(socks, 1.0, MAX_CONNECTIONS)) <= MAX_CONNECTIONS
        assert value(scrape(port), "fastpop_connections_total") == 0
        p = srv.connect(timeout=3)
        p.quit()
    finally:
        for sock in socks:
            sock.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def metrics_dir(pid: int) -> Path:
    """The server's multiprocess directory, found through the files it holds open."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "/fastpop-metrics-" in target and target.endswith(".db"):
            return Path(target).parent
    raise AssertionError("the server holds no multiprocess file")


def reader_waiting(fifo: Path) -> int | None:
    """A write end of ``fifo`` if a render is opening it (which lets that open return), else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


def release(fd: int) -> None:
    os.write(fd, EMPTY_DB)
    os.close(fd)


def test_single_process_renders_off_the_event_loop(tmp_path):
    """A render held up (in a FIFO among the multiprocess files) does not hold
    up the POP3 sessions, and scrapes that come in meanwhile share it."""
    srv, port = metered_server(tmp_path)
    fifo = metrics_dir(srv.proc.pid) / "counter_fifo.db"
    os.mkfifo(fifo)
    user = srv.add_user([message("x")])
    pool = ThreadPoolExecutor(8)
    scrapes = []
    more: list[socket.socket] = []
    held = None
    renders = 0
    try:
        p = user.login()
        p.sock.settimeout(3)
        first = pool.submit(scrape, port)
        scrapes.append(first)
        deadline = time.monotonic() + 5
        while (held := reader_waiting(fifo)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held is not None, "the scrape never read the multiprocess files"
        renders = 1  # now in its read of the FIFO, until `held` writes
        assert p.noop().startswith(b"+OK")
        fresh = srv.connect(timeout=3)
        assert fresh.getwelcome().startswith(b"+OK")
        fresh.quit()
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            more.append(sock)
        for _ in range(3):  # loop rounds: one accepts them, the next reads their requests
            assert p.noop().startswith(b"+OK")
        replies = [pool.submit(lambda s: b"".join(iter(lambda: s.recv(65536), b"")), s) for s in more]
        scrapes += replies
        release(held)
        held = None
        deadline = time.monotonic() + 5
        while holds(srv.proc.pid, fifo) and time.monotonic() < deadline:  # the render reads to the end
            time.sleep(0.005)
        # from here a reader is another render (one for each scrape would open the FIFO again):
        # let it through, and count it
        while not all(f.done() for f in scrapes) and time.monotonic() < deadline:
            fd = reader_waiting(fifo)
            if fd is not None:
                renders += 1
                release(fd)
            time.sleep(0.01)
        assert value(first.result(0), "fastpop_sessions_open") == 1
        bodies = [f.result(0) for f in replies]
        assert all(b.startswith(b"HTTP/1.1 200 ") and b"fastpop_sessions_open 1.0" in b for b in bodies)
        assert renders == 1, f"{renders} renders for 6 concurrent scrapes"
        p.quit()
    finally:
        if held is not None:
            release(held)
        deadline = time.monotonic() + 5
        while not all(f.done() for f in scrapes) and time.monotonic() < deadline:  # none stuck in the FIFO
            fd = reader_waiting(fifo)
            if fd is not None:
                release(fd)
            time.sleep(0.01)
        fifo.unlink()
        pool.shutdown(wait=False, cancel_futures=True)
        for sock in more:
            sock.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped (its descriptors are closed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def test_directory_left_by_a_killed_supervisor_is_removed_at_the_next_start(tmp_path):
    """SIGKILL leaves the multiprocess directory behind (no cleanup runs); the
    next start removes it, once its maker and workers are gone, and nothing
    else: not another user's directory, a link, nor one whose workers live."""
    import fcntl
    import pwd
    import shutil
    import subprocess
    import tempfile

    tmp = Path(tempfile.gettempdir())
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    planted = {
        "theirs": tmp / f"fastpop-metrics-{dead.pid}-1-theirs",  # another user's, named as if dead
        "link": tmp / f"fastpop-metrics-{dead.pid}-2-link",  # a link to root's directory
        "held": tmp / f"fastpop-metrics-{dead.pid}-3-held",  # ours, but a worker still holds it
    }
    target = tmp_path / "roots"
    target.mkdir()
    (target / "counter_1.db").write_bytes(EMPTY_DB)
    held_fd = -1
    srv = None
    try:
        planted["theirs"].mkdir()
        (planted["theirs"] / "counter_1.db").write_bytes(EMPTY_DB)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for p in (planted["theirs"], planted["theirs"] / "counter_1.db"):
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
        else:
            del planted["theirs"]  # (no other user to plant as)
            shutil.rmtree(tmp / f"fastpop-metrics-{dead.pid}-1-theirs")
        planted["link"].symlink_to(target)
        planted["held"].mkdir()
        held_fd = os.open(planted["held"], os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held_fd, fcntl.LOCK_SH)

        srv, port = metered_server(tmp_path, "--workers", "2")
        supervisor = srv.proc.pid
        workers = _children(supervisor)
        assert len(workers) == 2
        stale = metrics_dir(workers[0])
        assert stale.is_dir()
        srv.kill()  # SIGKILL: no cleanup; the workers see the supervisor's pipe close and drain
        deadline = time.monotonic() + 15
        while not all(_gone(w) for w in workers):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.05)
        assert stale.is_dir()  # left behind

        srv.start()
        workers = _children(srv.proc.pid)
        fresh = metrics_dir(workers[0])
        assert fresh != stale
        assert not stale.exists(), f"{stale} left by the killed supervisor was not removed"
        for what, path in planted.items():
            assert os.path.lexists(path), f"the planted {what} directory was removed"
        if "theirs" in planted:
            assert (planted["theirs"] / "counter_1.db").read_bytes() == EMPTY_DB
        assert planted["link"].is_symlink() and (target / "counter_1.db").read_bytes() == EMPTY_DB
        assert f"removed {stale}" in srv.log()
        assert srv.stop() == 0
        assert "Traceback" not in srv.log()
        srv = None
        assert not fresh.exists()
    finally:
        if srv is not None and srv.proc is not None:
            srv.stop()
        if held_fd >= 0:
            os.close(held_fd)
        for path in planted.values():
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)


@pytest.mark.unit
def test_remove_stale_proves_death_and_touches_nothing_else(tmp_path):
    """fastpop.serve.metrics.remove_stale in a directory of the test's: it
    removes only a real directory of the given owner, named by a process
    that is gone (here: this pid with another start time, as after a reuse),
    whose lock nobody holds, and only its files."""
    import fcntl

    from fastpop.serve.metrics import remove_stale, start_time

    me = os.getpid()
    started = start_time(me)
    assert started is not None
    owner = os.geteuid()
    dead = f"fastpop-metrics-{me}-{started + 1}-"
    (tmp_path / f"{dead}stale").mkdir()
    (tmp_path / f"{dead}stale" / "counter_1.db").write_bytes(EMPTY_DB)
    (tmp_path / f"{dead}stale" / "link.db").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").write_bytes(b"kept")
    (tmp_path / f"fastpop-metrics-{me}-{started}-alive").mkdir()  # its maker runs
    (tmp_path / f"{dead}held").mkdir()
    (tmp_path / f"{dead}link").symlink_to(tmp_path / "target")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "counter_1.db").write_bytes(EMPTY_DB)
    (tmp_path / f"{dead}file").write_bytes(b"not a directory")
    (tmp_path / f"{dead}nested").mkdir()
    (tmp_path / f"{dead}nested" / "sub").mkdir()  # not what fastpop makes: left
    (tmp_path / "fastpop-metrics-abcdefgh").mkdir()  # an older fastpop's name: not provable
    fd = os.open(tmp_path / f"{dead}held", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a worker of it still runs
        assert remove_stale(str(tmp_path), owner + 1) == []  # another owner's: nothing
        assert sorted(remove_stale(str(tmp_path), owner)) == [f"{dead}stale"]
    finally:
        os.close(fd)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"fastpop-metrics-{me}-{started}-alive", f"{dead}held", f"{dead}link", "target",
                           f"{dead}file", f"{dead}nested", "fastpop-metrics-abcdefgh", "outside"])
    assert (tmp_path / "outside").read_bytes() == b"kept"
    assert (tmp_path / "target" / "counter_1.db").read_bytes() == EMPTY_DB
    assert (tmp_path / f"{dead}nested" / "sub").is_dir()
    # the lock released (the worker gone): now it goes too
    assert remove_stale(str(tmp_path), owner) == [f"{dead}held"]
