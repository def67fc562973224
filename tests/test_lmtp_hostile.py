"""The LMTP listener attacked (issue 17, item 8): it shares its event loop
with POP3, so a DATA that costs CPU per line, or connections and recipients
without a bound, hurt every POP3 user.  Each test performs the attack on a
real fastpop over TCP on 127.0.0.1 and checks the listener's answer and
that POP3 is still served; ``DotReader``, the DATA scanner, is also checked
on its own against every way of cutting the input."""

from __future__ import annotations

import os
import resource
import select
import socket
import statistics
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.server import ServerProcess, message, serving
from test_lmtp import LMTPServer, RawLMTP

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def lmtp_port(srv: ServerProcess) -> int:
    import re

    m = re.search(r"LMTP listening on 127\.0\.0\.1:(\d+)", srv.log()[srv._log_offset :])
    assert m, srv.log()
    return int(m.group(1))


def greeting(port: int, timeout: float = 5.0) -> bytes:
    """Connect, return the first line (b"" if closed without one); the socket is closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        try:
            return f.readline()
        except (TimeoutError, ConnectionResetError):
            return b""
        finally:
            f.close()


class Pop3Probe(threading.Thread):
    """Connects to POP3 over and over: greeting, NOOP, reply; records how long each took."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.times: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    f = s.makefile("rb")
                    hello = f.readline()
                    s.sendall(b"NOOP\r\n")
                    reply = f.readline()
                    f.close()
                if not hello.startswith(b"+OK") or not reply.startswith((b"+OK", b"-ERR")):
                    self.failures.append(f"{hello!r} {reply!r}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self.times.append(time.monotonic() - t0)
            self.stop.wait(0.02)


@pytest.fixture(scope="module")
def lmtp_server(tmp_path_factory):
    yield from serving(LMTPServer(tmp_path_factory.mktemp("lmtp-hostile")))


# -- DATA: linear, chunked, off the POP3 users' backs


@pytest.mark.parametrize("line, stored", [(b"\r\n", b"\r\n"), (b"..\r\n", b".\r\n")], ids=["empty-lines", "dot-lines"])
def test_8_mib_of_short_lines_costs_little_cpu_and_pop3_stays_fast(lmtp_server, line, stored):
    """The old parser read one byte at a time at every line start: 8 MiB of
    empty lines took 17.7 s of CPU on the loop that serves POP3 too."""
    user = lmtp_server.add_user()
    body = line * ((8 << 20) // len(line))
    pid = lmtp_server.proc.pid
    r = lmtp_server.raw()
    probe = Pop3Probe(lmtp_server.port)
    try:
        assert r.start(user.name)[-1].startswith("354 ")
        probe.start()
        while not probe.times:  # POP3 answers before the attack
            time.sleep(0.01)
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        r.sock.settimeout(90)  # the old code took tens of seconds: let it finish, to measure it
        r.send(body + b".\r\n")
        reply = r.reply()
        took, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        time.sleep(0.1)  # a probe or two after it too
    finally:
        probe.stop.set()
        probe.join(35)
        r.close()
    assert reply.startswith(f"250 2.0.0 <{user.name}> Ok"), reply
    assert probe.failures == []
    slowest, median = max(probe.times), statistics.median(probe.times)
    measured = (f"DATA of 8 MiB: {cpu:.2f} s of server CPU, {took:.2f} s; meanwhile POP3 connect+NOOP "
                f"p50 {median:.3f} s, max {slowest:.3f} s ({len(probe.times)} probes)")
    # the old parser: 2.4-6.7 s of CPU, POP3 p50 0.15-0.29 s (max 1.1 s); this one: < 0.2 s, p50 ~1 ms
    assert cpu < 1.0 and median < 0.05 and slowest < 1.0, measured
    [f] = (user.maildir / "new").iterdir()
    assert f.stat().st_size == len(stored) * len(body) // len(line)
    with open(f, "rb") as fh:
        assert fh.read(4096) == (stored * 4096)[:4096]


# -- recipients


def test_20000_recipients_get_452_past_the_cap(lmtp_server):
    """RCPT was unbounded (20,000 accepted, each answered after DATA): past
    [lmtp] max_recipients (1000) a transaction gets 452 4.5.3, which Postfix
    takes as "send the rest in another transaction"."""
    user = lmtp_server.add_user()
    n, cap = 20_000, 1000
    r = lmtp_server.raw()
    r.sock.settimeout(60)
    commands = (b"LHLO test\r\nMAIL FROM:<a@example.com>\r\n"
                + b"RCPT TO:<%s>\r\n" % user.name.encode() * n + b"DATA\r\n")
    sender = threading.Thread(target=r.send, args=(commands,), daemon=True)  # replies are read meanwhile
    sender.start()
    try:
        assert r.reply().startswith("250-")
        assert r.reply() == "250 2.1.0 Ok"
        replies = [r.reply() for _ in range(n)]
        assert replies[:cap] == [f"250 2.1.5 <{user.name}> Ok"] * cap
        assert replies[cap] == "452 4.5.3 Error: too many recipients", replies[cap]
        assert set(replies[cap:]) == {"452 4.5.3 Error: too many recipients"}
        assert r.reply().startswith("354 ")
        sender.join(30)
        r.send(message("many") + b".\r\n")
        answers = [r.reply() for _ in range(cap)]  # one per accepted RCPT
        assert all(a.startswith(f"250 2.0.0 <{user.name}> Ok") for a in answers), answers[:3]
        r.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<%s>\r\n" % user.name.encode())  # the count starts over
        assert r.reply() == "250 2.1.0 Ok"
        assert r.reply() == f"250 2.1.5 <{user.name}> Ok"
        r.send(b"QUIT\r\n")
        assert r.reply().startswith("221 ")
    finally:
        r.close()
    assert len(list((user.maildir / "new").iterdir())) == 1  # stored once


# -- connections


def test_idle_lmtp_connections_do_not_starve_pop3(tmp_path):
    """Under a 128-descriptor limit, 150 idle LMTP connections used to take
    every descriptor: POP3 clients were closed without a greeting.  LMTP
    now takes at most half of the server's connection budget and refuses the
    rest with 421 4.3.2."""
    srv = ServerProcess(tmp_path, "cython", extra_args=["--lmtp-listen", "127.0.0.1:0"])
    srv.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
    srv.start()
    idle: list[socket.socket] = []
    try:
        port = lmtp_port(srv)
        greeted = refused = silent = 0
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(s)
            try:
                first = s.recv(200)
            except (TimeoutError, ConnectionResetError):
                first = b""
            if first.startswith(b"220 "):
                greeted += 1
            elif first.startswith(b"421 4.3.2 "):
                refused += 1
            else:
                silent += 1
        pop3 = [greeting(srv.port) for _ in range(10)]
        assert pop3 == [pop3[0]] * 10 and pop3[0].startswith(b"+OK"), pop3
        from fastpop.limits import connections_per_worker

        cap = connections_per_worker(128) // 2  # 128 descriptors: 64 connections, 32 of them LMTP
        assert (greeted, refused, silent) == (cap, 150 - cap, 0), (greeted, refused, silent)
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 5
        while not (hello := greeting(port)).startswith(b"220 ") and time.monotonic() < deadline:
            time.sleep(0.05)  # the server sees the closes
        assert hello.startswith(b"220 "), hello
    finally:
        for s in idle:
            s.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_lmtp_connections_past_the_cap_are_refused(tmp_path):
    conf = tmp_path / "fastpop.toml"
    conf.write_text("[lmtp]\nmax_connections = 3\n")
    srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(conf), "--lmtp-listen", "127.0.0.1:0"])
    srv.start()
    try:
        port = lmtp_port(srv)
        held = [RawLMTP(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(3)]
        fourth = greeting(port)
        assert fourth.startswith(b"421 4.3.2 ") and b"Too many connections" in fourth, fourth
        assert greeting(srv.port).startswith(b"+OK")  # POP3 is not affected
        for h in held:
            h.send(b"NOOP\r\n")
            assert h.reply() == "250 2.0.0 Ok"  # the ones in are served
        held.pop().close()
        deadline = time.monotonic() + 5
        while not (hello := greeting(port)).startswith(b"220 ") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hello.startswith(b"220 "), hello
        for h in held:
            h.close()
        assert "lmtp: refusing connections" in srv.log() and "lmtp max_connections limit" in srv.log()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_lmtp_connections_count_in_max_connections(tmp_path):
    """[server] max_connections = 4: LMTP takes at most 2, and the 2 it
    holds leave POP3 2 (the old listener was counted nowhere)."""
    conf = tmp_path / "fastpop.toml"
    conf.write_text("[server]\nmax_connections = 4\n")
    srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(conf), "--lmtp-listen", "127.0.0.1:0"])
    srv.start()
    held: list = []
    try:
        port = lmtp_port(srv)
        held += [RawLMTP(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(2)]
        assert greeting(port).startswith(b"421 4.3.2 ")
        held += [srv.connect() for _ in range(2)]
        third = greeting(srv.port)
        assert third.startswith(b"-ERR [SYS/TEMP]"), third
    finally:
        for h in held:
            h.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_idle_lmtp_connection_times_out(tmp_path):
    conf = tmp_path / "fastpop.toml"
    conf.write_text("[lmtp]\ntimeout = 1\n")
    srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(conf), "--lmtp-listen", "127.0.0.1:0"])
    srv.start()
    try:
        port = lmtp_port(srv)
        r = RawLMTP(socket.create_connection(("127.0.0.1", port), timeout=10))
        r.send(b"LHLO x\r\nNOOP")  # a line never finished is no activity
        assert r.reply().startswith("250-")
        t0 = time.monotonic()
        assert r.reply().startswith("421 4.4.2 ")
        assert 0.5 < time.monotonic() - t0 < 5
        assert r.file.read() == b""  # closed
        r.close()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_a_message_trickled_a_byte_at_a_time_times_out(tmp_path):
    """In DATA every octet counted as activity: a client sending one every
    few seconds held its connection, and with as many as [lmtp]
    max_connections allows, every delivery, for ever.  Each octet now buys
    1/MIN_DATA_RATE of a second: the trickle is closed with 421 4.4.2 after
    [lmtp] timeout, as an idle client is, and nothing is delivered."""
    conf = tmp_path / "fastpop.toml"
    conf.write_text("[lmtp]\ntimeout = 1\n")
    srv = ServerProcess(tmp_path, "cython", extra_args=["--config", str(conf), "--lmtp-listen", "127.0.0.1:0"])
    user = srv.add_user()
    srv.start()
    try:
        r = RawLMTP(socket.create_connection(("127.0.0.1", lmtp_port(srv)), timeout=10))
        r.send(b"LHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<%s>\r\nDATA\r\n" % user.name.encode())
        assert r.reply().startswith("250-")
        assert r.reply() == "250 2.1.0 Ok"
        assert r.reply().startswith("250 2.1.5")
        assert r.reply().startswith("354 ")
        t0 = time.monotonic()
        closed = None
        while time.monotonic() - t0 < 8:  # the old code: never closed
            try:
                r.sock.sendall(b"x")
            except OSError:
                break
            if select.select([r.sock], [], [], 0.3)[0]:  # (nothing else is due: the file holds no reply)
                closed = r.reply()
                break
        assert closed is not None and closed.startswith("421 4.4.2 "), closed
        assert 0.5 < time.monotonic() - t0 < 5
        r.close()
        assert not list((user.maildir / "new").iterdir())
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


# -- command lines and replies


def test_overlong_command_line_is_refused_and_the_session_goes_on(lmtp_server):
    r = lmtp_server.raw()
    try:
        r.send(b"NOOP " + b"x" * 100_000 + b"\r\nNOOP\r\n")
        assert r.reply() == "500 5.5.2 Error: line too long"
        assert r.reply() == "250 2.0.0 Ok"
        r.send(b"VRFY postmaster\r\n")
        assert r.reply().startswith("502 5.5.1 ")
        r.send(b"LHLO x\r\nMAIL FROM:<a@example.com> SIZE=12 BODY=8BITMIME SMTPUTF8\r\n"
               b"RCPT TO:<x@example.com> NOTIFY=NEVER\r\nRSET\r\n")
        assert r.reply().endswith("250 SMTPUTF8")
        assert r.reply() == "250 2.1.0 Ok"
        assert r.reply().startswith("555 5.5.4 ")
        assert r.reply() == "250 2.0.0 Ok"
    finally:
        r.close()


def test_commands_sent_before_a_half_close_are_all_answered(lmtp_server):
    user = lmtp_server.add_user()
    r = lmtp_server.raw()
    try:
        r.send(b"LHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<%s>\r\nRSET\r\nNOOP\r\n" % user.name.encode())
        r.sock.shutdown(socket.SHUT_WR)
        assert r.reply().startswith("250-")
        assert [r.reply() for _ in range(4)] == ["250 2.1.0 Ok", f"250 2.1.5 <{user.name}> Ok", "250 2.0.0 Ok",
                                                 "250 2.0.0 Ok"]
        assert r.file.read() == b""  # then closed
    finally:
        r.close()


def test_pipelined_commands_of_a_client_that_does_not_read_are_not_buffered(lmtp_server):
    """NOOPs sent without reading a reply: once the replies back up, the
    listener stops reading, and its memory does not grow with what is sent."""
    pid = lmtp_server.proc.pid

    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

    r = lmtp_server.raw()
    try:
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        before = rss()
        r.sock.settimeout(2)
        chunk = b"NOOP\r\n" * 10_000
        sent = 0
        with pytest.raises(socket.timeout):
            for _ in range(2000):  # 120 MB: far more than any buffer holds
                r.sock.sendall(chunk)
                sent += len(chunk)
        assert sent < 64 << 20
        assert rss() - before < 32 << 20, (before, rss())
    finally:
        r.close()


# -- DotReader: the DATA scanner on its own


def _wire(msg: bytes) -> bytes:
    """``msg`` as a client sends it after 354: dot-stuffed, then CRLF "." CRLF."""
    return (b"\r\n" + msg).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r\n", b"\n")) | st.sampled_from(
           [b"", b".", b"..", b"\r", b".\r", b"\n."]), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_dot_reader_any_cut(lines, cuts):
    from fastpop.delivery.lmtp import DotReader

    msg = b"".join(line + b"\r\n" for line in lines)
    wire = _wire(msg) + b"NOOP\r\n"
    points = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
    reader = DotReader(1 << 20)
    rest = None
    for a, b in zip(points, points[1:], strict=False):
        rest = reader.feed(wire[a:b])
        if rest is not None:
            rest += wire[b:]
            break
    assert rest == b"NOOP\r\n"
    assert DotReader.assemble(reader.parts) == msg
    assert reader.size == len(_wire(msg)) - 3


@settings(max_examples=400, deadline=None)
@given(msg=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"a", b"\r\n."]), max_size=40).map(b"".join),
       slice_size=st.integers(min_value=1, max_value=12), cuts=st.lists(st.integers(0, 100), max_size=6))
def test_content_in_slices_is_normalize_of_the_whole(msg, slice_size, cuts):
    """The store threads unstuff and normalise in slices (the GIL is held by
    each bytes method): the result is delivery.normalize's of the whole."""
    import fastpop.delivery.lmtp as lmtp
    from fastpop.delivery.local import normalize

    if msg and not msg.endswith(b"\r\n"):
        msg += b"\r\n"  # as every DATA ends
    wire = _wire(msg)
    points = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
    reader = lmtp.DotReader(1 << 20)
    for a, b in zip(points, points[1:], strict=False):
        reader.feed(wire[a:b])
    saved = lmtp.SLICE
    lmtp.SLICE = slice_size
    try:
        got = lmtp._content(reader.parts)
    finally:
        lmtp.SLICE = saved
    assert got == normalize(lmtp.DotReader.assemble(reader.parts))
    assert got == normalize(msg)


def test_dot_reader_big_pieces_and_the_limit():
    from fastpop.delivery.lmtp_data import FLUSH, DotReader

    msg = (b"." * 1000 + b"\r\n") * (5 * FLUSH // 1000)
    wire = _wire(msg)
    reader = DotReader(1 << 30)
    for i in range(0, len(wire), 7777):
        rest = reader.feed(wire[i : i + 7777])
    assert rest == b"" and DotReader.assemble(reader.parts) == msg
    assert len(reader.parts) > 3  # set aside as it came, not one growing buffer

    reader = DotReader(100)
    assert reader.feed(b"x" * 99 + b"\r\n") is None
    assert reader.feed(b".\r\nNOOP\r\n") == b"NOOP\r\n"
    assert reader.too_big and reader.size == 101
    reader = DotReader(101)
    assert reader.feed(b"x" * 99 + b"\r\n.\r\n") == b""
    assert not reader.too_big and DotReader.assemble(reader.parts) == b"x" * 99 + b"\r\n"
