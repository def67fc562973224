"""RETR's two ways out: sendfile(2) for messages stored CRLF-clean, the
userspace transform for the rest.  Both must send exactly RFC 1939's bytes,
keep memory bounded by flow control, and answer pipelined commands in order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import ServerProcess

LINE = b"filler line of an ordinary message body, stored with CRLF.........\r\n"
BIG = 200 * 1024  # above sending.SENDFILE_MIN, so the sendfile path applies


def reference(data: bytes) -> bytes:
    """RFC 1939 output for stored content, written as plainly as possible."""
    if not data:
        return b".\r\n"
    lines = data.split(b"\n")
    last = lines.pop()  # after the final LF: empty, or a line without newline
    out = []
    for line in lines:
        if line.endswith(b"\r"):  # CRLF; a CR elsewhere is an ordinary octet
            line = line[:-1]
        out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
    if last:
        out.append((b"." + last if last.startswith(b".") else last) + b"\r\n")
    return b"".join(out) + b".\r\n"


def filler(size: int) -> bytes:
    return (LINE * (size // len(LINE) + 1))[:size]


def crlf_message(*parts: bytes, size: int = BIG) -> bytes:
    """CRLF-clean message of about ``size`` bytes with ``parts`` spread through it."""
    chunk = filler(size // (len(parts) + 1))
    chunk = chunk[: chunk.rfind(b"\r\n") + 2]
    return chunk.join([b"Subject: x\r\n\r\n", *parts, b""]) + b"end\r\n"


class RawClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def multiline(self) -> bytes:
        """Body of a multi-line response, terminator included, still stuffed."""
        while True:
            end = self.buf.find(b"\r\n.\r\n")
            if end >= 0:
                body, self.buf = self.buf[: end + 5], self.buf[end + 5 :]
                return body
            if self.buf.startswith(b".\r\n"):
                body, self.buf = self.buf[:3], self.buf[3:]
                return body
            self._fill()

    def login(self, user) -> None:
        self.send(b"USER %s\r\nPASS %s\r\n" % (user.name.encode(), user.password.encode()))
        assert self.line().startswith(b"+OK")
        assert self.line().startswith(b"+OK")

    def retr(self, n: int) -> tuple[bytes, bytes]:
        self.send(b"RETR %d\r\n" % n)
        status = self.line()
        assert status.startswith(b"+OK"), status
        return status, self.multiline()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module", params=["sendfile", "transform"])
def path_server(request, tmp_path_factory):
    extra = [] if request.param == "sendfile" else ["--no-sendfile"]
    srv = ServerProcess(tmp_path_factory.mktemp(request.param), "cython", extra_args=extra)
    srv.start()
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log()


PATHOLOGICAL = {
    "dot-first-byte": crlf_message(b"x\r\n", size=BIG)[0:0] + b"." + crlf_message(b"y\r\n"),
    "dot-lines": crlf_message(b".\r\n", b"..\r\n", b".x\r\n", b"...\r\n"),
    "ends-with-dot-line": crlf_message(b"a\r\n") + b".\r\n",
    "ends-with-terminator-lookalike": crlf_message(b"a\r\n") + b"\r\n.\r\n",
    "nul-and-8bit": crlf_message(b"\x00\xff\xfe bytes\r\n", b".\x00\r\n"),
    "bare-cr-inside": crlf_message(b"a\rb\r\n", b".\rc\r\n"),
    "bare-lf": crlf_message(b"bare\n.dot after bare lf\n"),
    "no-final-newline": crlf_message(b"a\r\n") + b"last line",
    "cr-at-end": crlf_message(b"a\r\n") + b"tail\r",
    "dots-every-line": b"".join(b".%d\r\n" % i for i in range(40000)),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_large_messages_byte_exact(path_server, name):
    data = PATHOLOGICAL[name]
    user = path_server.add_user([data])
    c = RawClient(path_server.port)
    c.login(user)
    c.send(b"LIST 1\r\n")
    listed = int(c.line().split()[2])
    status, body = c.retr(1)
    c.send(b"QUIT\r\n")
    assert c.line().startswith(b"+OK")
    c.close()
    expected = reference(data)
    assert body == expected
    unstuffed = len(expected) - 3 - sum(1 for line in expected[:-3].split(b"\r\n") if line.startswith(b"."))
    assert int(status.split()[1]) == listed == unstuffed


def test_dots_at_scan_window_boundaries(tmp_path):
    """Lines starting with '.' exactly at, just before and just after the 16 MiB
    window in which the sendfile path looks for them."""
    window = 16 * 1024 * 1024
    parts = []
    pos = 0
    for target in (window - 3, window, window + 2, 2 * window):
        pad = filler(target - pos - 2)
        pad = pad[:-2] + b"\r\n" if pad else b""
        parts.append(pad)
        pos += len(pad)
        parts.append(b".\r\n")
        pos += 3
    data = b"".join(parts) + b"end\r\n"
    srv = ServerProcess(tmp_path, "cython")
    user = srv.add_user([data])
    srv.start()
    try:
        c = RawClient(srv.port)
        c.login(user)
        _, body = c.retr(1)
        c.close()
    finally:
        srv.stop()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(reference(data)).hexdigest()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(
        st.one_of(
            st.sampled_from([b".", b"..", b".x", b"", b"\x00", b"\xff.", b"a\rb"]),
            st.binary(max_size=80).filter(lambda b: b"\n" not in b and not b.endswith(b"\r")),
        ),
        min_size=1,
        max_size=30,
    ),
    repeat=st.integers(min_value=1, max_value=3000),
)
def test_random_crlf_messages_match_reference(path_server, lines, repeat):
    data = (b"\r\n".join(lines) + b"\r\n") * repeat
    user = path_server.add_user([data])
    c = RawClient(path_server.port)
    c.login(user)
    _, body = c.retr(1)
    c.send(b"QUIT\r\n")
    c.line()
    c.close()
    assert body == reference(data)


def test_pipelined_commands_behind_large_retrs_answer_in_order(path_server):
    a, b = crlf_message(b".a\r\n"), crlf_message(b"b\r\n", size=3 * BIG) + b"no newline"
    user = path_server.add_user([a, b])
    c = RawClient(path_server.port)
    c.login(user)
    c.send(b"RETR 1\r\nSTAT\r\nRETR 2\r\nNOOP\r\nTOP 1 0\r\nQUIT\r\n")
    assert c.line().startswith(b"+OK")
    assert c.multiline() == reference(a)
    assert c.line().startswith(b"+OK 2 ")
    assert c.line().startswith(b"+OK")
    assert c.multiline() == reference(b)
    assert c.line() == b"+OK"
    assert c.line().startswith(b"+OK")
    assert c.multiline() == b"Subject: x\r\n\r\n.\r\n"
    assert c.line().startswith(b"+OK Logging out")
    c.close()


def _vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(key)


@pytest.mark.parametrize("stored", ["crlf", "lf"])
def test_slow_reader_of_a_huge_message_keeps_memory_bounded(tmp_path, stored):
    """A 200 MB RETR to a reader that sips: server memory must not follow the message."""
    srv = ServerProcess(tmp_path, "cython")
    user = srv.add_user([])
    line = LINE if stored == "crlf" else LINE.replace(b"\r\n", b"\n")
    size = 200 * 1024 * 1024
    tmp = user.maildir / "tmp" / "big"
    written = 0
    with open(tmp, "wb") as f:
        block = line * (1024 * 1024 // len(line))
        while written < size:
            written += f.write(block)
    tmp.rename(user.maildir / "new" / "1700000000.big.test")
    srv.start()
    try:
        base = _vm_kib(srv.proc.pid, "VmRSS")
        c = RawClient(srv.port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.login(user)
        c.send(b"RETR 1\r\n")
        received = 0
        deadline = time.monotonic() + 180
        sips = 0
        tail = b""
        while True:
            chunk = c.sock.recv(1 << 20)
            assert chunk, "connection closed early"
            received += len(chunk)
            tail = (tail + chunk)[-5:]  # the terminator may straddle two reads
            if sips < 30:  # slow at first: the server must wait, not buffer
                sips += 1
                time.sleep(0.02)
            if tail == b"\r\n.\r\n" or received > written * 1.1:
                break
            assert time.monotonic() < deadline
        growth = _vm_kib(srv.proc.pid, "VmHWM") - base
        c.close()
    finally:
        srv.stop()
    assert received > written
    assert growth < 64 * 1024, f"peak RSS grew by {growth} KiB"


def test_reader_that_stops_reading_is_timed_out_and_nothing_is_deleted(tmp_path):
    srv = ServerProcess(tmp_path, "cython", extra_args=["--timeout-transaction", "2"])
    big = crlf_message(b".x\r\n", size=20 * 1024 * 1024)
    user = srv.add_user([big, b"Subject: small\r\n\r\nhi\r\n"])
    srv.start()
    try:
        c = RawClient(srv.port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        c.login(user)
        c.send(b"DELE 2\r\nRETR 1\r\n")
        time.sleep(5)  # never read: the server's send stalls, then the idle timeout fires
        c.sock.settimeout(10)
        drained = b""
        try:
            while chunk := c.sock.recv(1 << 20):
                drained += chunk
        except ConnectionResetError:
            pass
        assert len(drained) < len(big)  # cut off, not completed
        c.close()
        time.sleep(0.3)
        assert sorted(p.read_bytes() for p in user.files()) == sorted([big, b"Subject: small\r\n\r\nhi\r\n"])
        p = user.login()  # the lock was released
        assert p.stat()[0] == 2
        p.quit()
    finally:
        srv.stop()
    assert "end=timeout" in srv.log()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_sendfile_is_used_for_crlf_messages_only(tmp_path):
    srv = ServerProcess(tmp_path, "cython")
    crlf = crlf_message(b".dot\r\n", size=2 * BIG)
    lf = crlf.replace(b"\r\n", b"\n")
    user = srv.add_user([crlf, lf])
    trace = tmp_path / "strace.out"
    srv.start()
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=sendfile", "-o", str(trace), "-p",
                               str(srv.proc.pid)])
    try:
        time.sleep(1.0)  # let strace attach to every thread
        c = RawClient(srv.port)
        c.login(user)
        _, body1 = c.retr(1)
        calls_after_crlf = trace.read_text().count("sendfile(")
        _, body2 = c.retr(2)
        c.close()
        time.sleep(0.3)
        calls_after_lf = trace.read_text().count("sendfile(")
    finally:
        tracer.terminate()
        tracer.wait(10)
        srv.stop()
    assert body1 == reference(crlf) and body2 == reference(lf)
    assert calls_after_crlf >= 2  # segments split at the dot line
    assert calls_after_lf == calls_after_crlf  # the LF-stored copy went through the transform
    assert os.path.getsize(trace) > 0
