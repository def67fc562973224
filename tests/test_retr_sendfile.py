"""RETR at the sendfile limit: the index records whether a message has a line
starting with "." (record flag bit 1, fastpop.store.index), and a message
without one goes out in sendfile(2) with nothing read or scanned.

Through real servers on 127.0.0.1: what the index records is checked against
the delivered bytes, what RETR reads against strace, what it sends against
RFC 1939's reference transform; a record without the bit (an index of an
earlier fastpop) or a file changed since it was measured is scanned; and an
index whose bit lies, which only the Maildir's own user can write, harms
only that user's own session.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from support.server import PARSERS, ServerProcess, User, tracer_of

from fastpop.store import index as mindex

LINE = b"an ordinary line of a message body, stored with CRLF line ends.....\r\n"
BIG = 2 * 1024 * 1024  # well above sending.SENDFILE_MIN and two scan windows
HOUR_NS = 3600 * 10**9
NO_DOT_LINES = 2  # record flag bit 1 (the format in fastpop/store/index.py)
SO_RCVBUFFORCE = 33  # Linux's socket option (Python does not name it): a receive buffer past rmem_max, as root


def filler(size: int) -> bytes:
    return (LINE * (size // len(LINE) + 1))[:size]


def body(size: int, *inserts: tuple[int, bytes]) -> bytes:
    """A CRLF message of about ``size`` octets, ``inserts`` put at line starts near their offsets."""
    data = bytearray(b"Subject: big\r\n\r\n" + filler(size))
    for at, text in sorted(inserts, reverse=True):
        at = data.rfind(b"\r\n", 0, max(at, 2)) + 2 if at else 0
        data[at:at] = text
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return bytes(data)


def dot_at(offset: int, size: int = BIG) -> bytes:
    """A CRLF message whose line starting with "." starts exactly at ``offset``."""
    prefix = b"" if offset == 0 else b"\n" if offset == 1 else b"x" * (offset - 2) + b"\r\n"
    return prefix + b".edge\r\n" + filler(size)


def reference(data: bytes) -> bytes:
    """RFC 1939's RETR body for stored content, written as plainly as possible."""
    if not data:
        return b".\r\n"
    lines = data.split(b"\n")
    last = lines.pop()
    out = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
    if last:
        out.append((b"." + last if last.startswith(b".") else last) + b"\r\n")
    return b"".join(out) + b".\r\n"


def has_dot_line(data: bytes) -> bool:
    return data.startswith(b".") or b"\n." in data


def deliver(user: User, data: bytes, sizes: bool) -> str:
    """Into new/, with S= and W= in the name if ``sizes``; returns the unique name."""
    path = user.deliver(data, sizes_in_name=sizes)
    return path.name.split(",")[0]


def settle(user: User) -> None:
    """An old mtime for cur/, so the index records it and is trusted."""
    stamp = time.time_ns() - HOUR_NS
    os.utime(user.maildir / "cur", ns=(stamp, stamp))


def flags(idx: mindex.MailboxIndex, i: int) -> int:
    return idx.record(i)[5]


def index_file(user: User) -> mindex.MailboxIndex:
    idx = mindex.MailboxIndex((user.maildir / mindex.INDEX_FILE).read_bytes())
    idx.verify()
    return idx


def rewrite_flags(user: User, change) -> None:
    """Rewrite the index with each record's flags passed through ``change(i, flags)``
    (checksum recomputed), renamed into place as fastpop itself writes it."""
    path = user.maildir / mindex.INDEX_FILE
    buf = bytearray(path.read_bytes())
    idx = mindex.MailboxIndex(bytes(buf))
    for i in range(idx.count):
        at = 64 + i * mindex.RECORD.size + 24
        struct.pack_into("<I", buf, at, change(i, struct.unpack_from("<I", buf, at)[0]))
    struct.pack_into("<I", buf, mindex.CHECKSUM_AT, 0)
    struct.pack_into("<I", buf, mindex.CHECKSUM_AT, zlib.crc32(buf))
    tmp = path.with_name("index.test-tmp")
    tmp.write_bytes(buf)
    os.replace(tmp, path)


class Raw:
    def __init__(self, port: int, receive_buffer: int = 0):
        import socket

        if receive_buffer:  # set before connecting: the window scale is agreed in the handshake
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                self.sock.close()
                pytest.skip("SO_RCVBUFFORCE needs CAP_NET_ADMIN")
            self.sock.settimeout(10)
            self.sock.connect(("127.0.0.1", port))
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.line()

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

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def multiline(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n.\r\n")
            if end >= 0:
                out, self.buf = self.buf[: end + 5], self.buf[end + 5 :]
                return out
            self._fill()

    def login(self, user: User) -> None:
        self.sock.sendall(b"USER %s\r\nPASS %s\r\n" % (user.name.encode(), user.password.encode()))
        assert self.line().startswith(b"+OK")
        reply = self.line()
        assert reply.startswith(b"+OK"), reply

    def retr(self, n: int) -> bytes:
        self.sock.sendall(b"RETR %d\r\n" % n)
        status = self.line()
        assert status.startswith(b"+OK"), status
        return self.multiline()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
            self.line()
        self.sock.close()


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def srv(request, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("sendfile"), PARSERS[request.param])
    server.start()
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log()


# --------------------------------------------------------------------------- what the index records

MESSAGES = {
    "none": body(4000),
    "none-large": body(BIG),
    "none-periods-inside-lines": body(3000, (100, b"a line. With periods. Not at its start.\r\n")),
    "first-byte": b"." + body(3000),
    "second-line": body(3000, (20, b".dot\r\n")),
    "last-line": body(3000) + b".\r\n",
    "only-dot": b".\r\n",
    "after-bare-lf": b"Subject: lf\n\nline\n.dot after a bare LF\n",
    "after-bare-cr-not-a-line": b"Subject: cr\r\n\r\nline\r.not a line start\r\n",
    "at-256k-chunk-boundary": dot_at(256 * 1024, 600_000),
    "just-after-256k-chunk": dot_at(256 * 1024 + 1, 600_000),
    "far-into-large": body(BIG, (BIG - 5000, b".late\r\n")),
    "empty": b"",
}


@pytest.mark.parametrize("sizes", [False, True], ids=["counted", "w-in-name"])
def test_index_records_whether_a_line_starts_with_a_dot(srv, sizes):
    user = srv.add_user()
    uniques = {deliver(user, data, sizes): name for name, data in MESSAGES.items()}
    p = user.login()
    count, _ = p.stat()
    p.quit()
    assert count == len(MESSAGES)
    idx = index_file(user)
    for i in range(idx.count):
        name = uniques[idx.name(i).split(",")[0].split(":")[0]]
        data = MESSAGES[name]
        flagged = bool(flags(idx, i) & NO_DOT_LINES)
        assert flagged == (not has_dot_line(data)), (
            f"{name}: no-dot-lines bit {flagged}, the message {'has' if has_dot_line(data) else 'has no'} dot lines")


# --------------------------------------------------------------------------- what RETR reads

@contextlib.contextmanager
def strace(pid: int, out: Path, calls: str):
    """strace -f -y of ``calls`` in a running server, attached to every thread before the body runs."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    proc = subprocess.Popen(["strace", "-f", "-y", "-qq", "-e", f"trace={calls}", "-o", str(out), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        tasks = os.listdir(f"/proc/{pid}/task")
        if tasks and all(tracer_of(pid, t) == proc.pid for t in tasks):
            break
        if proc.poll() is not None:
            pytest.skip(f"strace cannot attach: {proc.stderr.read().decode(errors='replace').strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.skip("strace did not attach within 10 s")
        time.sleep(0.005)
    lines: list[str] = []
    try:
        yield lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        lines += out.read_text(errors="replace").splitlines() if out.exists() else []


def reads_of(lines: list[str], unique: str) -> list[int]:
    """Octets each read/pread64/preadv of the message file returned."""
    out = []
    for line in lines:
        m = re.search(r"\b(?:read|pread64|preadv2?|readv)\(\d+<([^>]*)>.*= (\d+)$", line)
        if m and os.path.basename(m.group(1)).startswith(unique):
            out.append(int(m.group(2)))
    return out


def sendfiles_of(lines: list[str], unique: str) -> int:
    return sum(1 for line in lines
               if (m := re.search(r"\bsendfile\(\d+<[^>]*>, \d+<([^>]*)>", line))
               and os.path.basename(m.group(1)).startswith(unique))


@pytest.fixture
def traced(tmp_path):
    """A server of the test's own with sendfile (the compiled parser), for strace."""
    server = ServerProcess(tmp_path / "srv", "cython")
    yield server
    if server.proc is not None:
        assert server.stop() == 0
    assert "Traceback" not in server.log()


def test_retr_of_a_message_without_dot_lines_reads_nothing(traced, tmp_path):
    """The index says no line starts with ".": one stream of sendfile, no byte
    of the file read in user space (the last two octets aside, to check the
    final CRLF).  A message of the same size with one dot line is scanned
    (the control: strace sees reads there)."""
    clean = body(BIG)
    dotted = body(BIG, (BIG // 2, b".in the middle\r\n"))
    user = traced.add_user()
    u_clean = deliver(user, clean, sizes=True)
    u_dotted = deliver(user, dotted, sizes=False)
    traced.start()
    user.login().quit()  # builds the index: each message measured once
    c = Raw(traced.port)
    c.login(user)
    with strace(traced.proc.pid, tmp_path / "clean.trace", "read,pread64,preadv,preadv2,readv,sendfile") as clean_t:
        got_clean = c.retr(1)
    with strace(traced.proc.pid, tmp_path / "dotted.trace", "read,pread64,preadv,preadv2,readv,sendfile") as dot_t:
        got_dotted = c.retr(2)
    c.close()
    assert got_clean == reference(clean)
    assert got_dotted == reference(dotted)
    assert sendfiles_of(clean_t, u_clean) >= 1, "the message did not go out with sendfile"
    assert sum(reads_of(clean_t, u_clean)) <= 2, (
        f"RETR read {sum(reads_of(clean_t, u_clean))} octets of a message the index says has no dot line")
    assert sendfiles_of(dot_t, u_dotted) >= 2, "the dotted message was not split at its dot line"
    assert sum(reads_of(dot_t, u_dotted)) >= len(dotted) // 2, "the dotted message was not scanned"
    idx = index_file(user)
    assert [bool(flags(idx, i) & NO_DOT_LINES) for i in range(2)] == [True, False]


def test_a_socket_that_takes_everything_does_not_hold_the_event_loop(traced, tmp_path):
    """sendfile went on for as long as the socket took more: a reader that
    keeps up (loopback, a fast LAN), or one with a large receive window, had
    the whole message sent in one turn of the event loop, every other session
    of the worker waiting (a 1 GiB RETR to a reader that kept up held another
    user's NOOP 0.2 s).  Here the client's receive buffer holds the whole
    message before it reads a byte.  The server's thread now polls between
    turns of at most SENDFILE_TURN octets (a sendfile call may end a turn up
    to a chunk past it)."""
    from fastpop.session.sending import SENDFILE_CHUNK, SENDFILE_TURN

    data = body(6 * SENDFILE_TURN)
    user = traced.add_user()
    unique = deliver(user, data, sizes=True)
    traced.start()
    user.login().quit()  # measured: no dot lines, so nothing is read
    c = Raw(traced.port, receive_buffer=4 * len(data))
    c.login(user)
    with strace(traced.proc.pid, tmp_path / "turns.trace", "sendfile,epoll_wait,epoll_pwait") as lines:
        c.sock.sendall(b"RETR 1\r\n")
        time.sleep(2.0)  # (nothing read meanwhile: the server sends what the socket takes)
        status = c.line()
        got = c.multiline()
    c.close()
    assert status == b"+OK %d octets" % len(data)
    assert got == reference(data)
    main = str(traced.proc.pid)
    turns, run = [], 0
    for line in lines:
        if not line.startswith(main + " "):
            continue
        if "epoll_" in line:
            if run:
                turns.append(run)
            run = 0
        elif (m := re.search(r"\bsendfile\(\d+<[^>]*>, \d+<([^>]*)>.*= (\d+)$", line)) and \
                os.path.basename(m.group(1)).startswith(unique):
            run += int(m.group(2))
    turns.append(run)
    assert sum(turns) == len(data), (sum(turns), len(data))
    assert max(turns) <= SENDFILE_TURN + SENDFILE_CHUNK, f"one turn of the event loop sent {max(turns)} octets"


# --------------------------------------------------------------------------- when the bit is not there, or not true

def test_records_without_the_bit_are_scanned(srv):
    """An index written before the bit existed (bit 1 clear everywhere): every
    message is treated as possibly having dot lines, and each is sent right."""
    user = srv.add_user()
    messages = [body(BIG, (BIG // 3, b".one\r\n"), (2 * BIG // 3, b"..two\r\n")), body(BIG), b"." + body(BIG)]
    for data in messages:
        deliver(user, data, sizes=True)
    user.login().quit()
    settle(user)
    user.login().quit()  # the index records the settled mtime: trusted as it is
    rewrite_flags(user, lambda i, flags: flags & ~NO_DOT_LINES)
    c = Raw(srv.port)
    c.login(user)
    for n, data in enumerate(messages, 1):
        assert c.retr(n) == reference(data), f"message {n} sent wrong from a record without the bit"
    c.close()
    assert not any(flags(index_file(user), i) & NO_DOT_LINES for i in range(3)), (
        "the index was rewritten: this test no longer reads records without the bit")


def test_a_message_changed_since_it_was_measured_is_scanned(srv):
    """Measured without dot lines, then rewritten with some (and a new size):
    RETR sends what the file holds now, stuffed."""
    user = srv.add_user()
    deliver(user, body(BIG), sizes=False)
    user.login().quit()
    settle(user)
    user.login().quit()
    assert flags(index_file(user), 0) & NO_DOT_LINES
    (path,) = (user.maildir / "cur").iterdir()
    changed = body(BIG, (1000, b".now with a dot line\r\n"), (BIG // 2, b".\r\n"))
    stamp = os.stat(user.maildir / "cur").st_mtime_ns
    path.write_bytes(changed)
    os.utime(user.maildir / "cur", ns=(stamp, stamp))  # the index stays trusted: only the size tells
    c = Raw(srv.port)
    c.login(user)
    assert c.retr(1) == reference(changed)
    c.close()


def test_a_lying_bit_harms_only_its_own_session(srv):
    """Whoever can write the Maildir can set the bit on a message that has
    dot lines (or rewrite the message in place).  Then that message goes out
    unstuffed, so a line "." ends the response early for that user's client;
    the server itself parses none of it: the session's next command is
    answered in order right after the message, the server lives, and
    another user's session, open meanwhile, is untouched."""
    other = srv.add_user()
    other_msg = body(BIG, (5000, b".other's dot line\r\n"))
    deliver(other, other_msg, sizes=True)
    other_c = Raw(srv.port)
    other_c.login(other)

    user = srv.add_user()
    data = body(BIG, (BIG // 2, b".\r\n+OK forged reply\r\n"))
    deliver(user, data, sizes=True)
    user.login().quit()
    settle(user)
    user.login().quit()
    assert not flags(index_file(user), 0) & NO_DOT_LINES
    rewrite_flags(user, lambda i, flags: flags | NO_DOT_LINES)

    c = Raw(srv.port)
    c.login(user)
    c.sock.sendall(b"RETR 1\r\nNOOP\r\n")
    assert c.line() == b"+OK %d octets" % len(data)
    # exactly the file, then the server's own terminator, then the NOOP's reply
    assert c.exactly(len(data) + 3) == data + b".\r\n"
    assert c.line() == b"+OK"
    c.close()
    assert srv.proc.poll() is None
    assert other_c.retr(1) == reference(other_msg)
    other_c.close()


# --------------------------------------------------------------------------- the scan itself

@pytest.mark.parametrize("where", [0, 1, 15, 16, 17, 63, 64, 65, 1024 * 1024 - 1, 1024 * 1024, 1024 * 1024 + 1])
def test_dot_lines_at_vector_and_window_boundaries(srv, where):
    """The compiled scan compares 64 octets a turn and reads 1 MiB windows:
    a dot line at every kind of edge is stuffed."""
    user = srv.add_user()
    data = dot_at(where)
    deliver(user, data, sizes=True)
    c = Raw(srv.port)
    c.login(user)
    assert c.retr(1) == reference(data)
    c.close()
