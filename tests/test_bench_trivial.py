"""The trivial responder (``fastpop bench trivial-server``), every engine.

It is the load generator's yardstick and the liar of the integrity tests, so
its engines (the compiled epoll loop, its pure-Python twin, and the asyncio
engine) must answer byte for byte alike, over one connection or many, to
pipelined or dribbled commands, and to a client too slow to take a large
reply at once.  The epoll twins must also agree where the asyncio engine
differs: one command answered at a time, and a pause in accepting when out
of descriptors.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from support.server import NO_EXTENSIONS

from fastpop.bench import trivial

# engine -> (--engine, the startup line's name, FASTPOP_NO_EXTENSIONS in the server's environment)
ENGINE_RUNS = {
    "compiled": ("compiled", "compiled", False),
    "python-epoll": ("compiled", "python epoll", True),
    "asyncio": ("asyncio", "asyncio", False),
}
ENGINES = list(ENGINE_RUNS)
EPOLL_ENGINES = ["compiled", "python-epoll"]


def start(engine: str, *args: str) -> tuple[subprocess.Popen, int]:
    """The server, with ``engine`` as its startup line names it (no silent fallback: the
    compiled engine not built fails, as conftest's ``twin`` does, unless FASTPOP_NO_EXTENSIONS)."""
    option, name, no_extensions = ENGINE_RUNS[engine]
    if engine == "compiled" and NO_EXTENSIONS:
        pytest.skip("FASTPOP_NO_EXTENSIONS: the pure-Python twins only")
    env = dict(os.environ)
    env.pop("FASTPOP_NO_EXTENSIONS", None)
    if no_extensions:
        env["FASTPOP_NO_EXTENSIONS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpop", "bench", "trivial-server", "--engine", option, *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    line = proc.stderr.readline()
    m = re.search(r":(\d+) \(pid (\d+), ([\w ]+) engine\)", line)
    if not m:
        proc.kill()
        proc.wait()
        pytest.fail(f"trivial server did not start: {line!r}")
    assert (int(m.group(2)), m.group(3)) == (proc.pid, name), line
    return proc, int(m.group(1))


@pytest.fixture
def servers():
    """``servers(engine, *args)`` starts a server and gives its port (``servers.procs``: the
    processes); all are stopped by SIGTERM at the end, and must exit cleanly."""
    procs = []

    def run(engine: str, *args: str) -> int:
        proc, port = start(engine, *args)
        procs.append(proc)
        return port

    run.procs = procs
    yield run
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [exit_status(proc, 10) for proc in procs] == [0] * len(procs)


@pytest.fixture(params=ENGINES)
def responder(request, servers):
    return lambda *args: servers(request.param, *args)


def exit_status(proc: subprocess.Popen, timeout: float) -> int | None:
    """Its exit status, or None when it does not exit within the timeout (it is killed then)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def assert_exits_cleanly(proc: subprocess.Popen, timeout: float) -> None:
    """It exits with 0 within the timeout (else it is killed, and the test fails)."""
    assert exit_status(proc, timeout) == 0


def converse(port: int, *pieces: bytes, pause: float = 0.0) -> bytes:
    """Sends the pieces (pausing between them), then reads until the server closes
    (a reset, when it closes with our octets unread, ends the reading too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for piece in pieces:
            s.sendall(piece)
            if pause:
                time.sleep(pause)
        out = bytearray()
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return bytes(out)


SCRIPT = b"USER a\r\nPASS b\r\nSTAT\r\nRETR 1\r\nretr 0\r\nRETR 4\r\nRETR x\r\nRETR\r\nLIST\r\nUIDL\r\nNOOP\r\nQUIT\r\n"


def expected_transcript(messages: int, size: str) -> bytes:
    """What a correct responder answers to SCRIPT, from the shared canned state."""
    st = trivial.TrivialState(messages, trivial.SizeDistribution.parse(size))
    no = b"-ERR no such message\r\n"
    return (b"+OK trivial ready\r\n+OK\r\n+OK\r\n" + st.stat + st.retr[0] + no * 4 + st.list + st.uidl
            + b"+OK\r\n+OK bye\r\n")


def test_transcript_pipelined(responder):
    port = responder("--messages", "3", "--message-size", "900")
    assert converse(port, SCRIPT) == expected_transcript(3, "900")


def test_transcript_dribbled_a_few_octets_at_a_time(responder):
    port = responder("--messages", "3", "--message-size", "900")
    pieces = [SCRIPT[i : i + 3] for i in range(0, len(SCRIPT), 3)]
    assert converse(port, *pieces, pause=0.001) == expected_transcript(3, "900")


ODD_INPUT = {
    "two spaces": (b"RETR  1\r\nQUIT\r\n", ["no", "bye"]),
    "trailing space": (b"RETR 1 \r\nQUIT\r\n", ["no", "bye"]),
    "a sign": (b"RETR +1\r\nQUIT\r\n", ["no", "bye"]),
    "bare LF": (b"STAT\nQUIT\n", ["stat", "bye"]),
    "an over-long tail after a command": (b"STAT\r\n" + b"x" * 1100, ["stat"]),
    "the longest line": (b"x" * 1022 + b"\r\nQUIT\r\n", ["ok", "bye"]),
    "one octet longer": (b"x" * 1023 + b"\r\nQUIT\r\n", []),
    "much longer, in one write": (b"x" * 3000 + b"\r\nQUIT\r\n", []),
}


@pytest.mark.parametrize("case", ODD_INPUT)
def test_odd_input_answered_alike(responder, case):
    port = responder("--messages", "3", "--message-size", "200")
    st = trivial.TrivialState(3, trivial.SizeDistribution.parse("200"))
    replies = {"no": b"-ERR no such message\r\n", "bye": b"+OK bye\r\n", "stat": st.stat, "ok": b"+OK\r\n"}
    data, expect = ODD_INPUT[case]
    assert converse(port, data) == b"+OK trivial ready\r\n" + b"".join(replies[r] for r in expect)


IMPLEMENTATION = {"compiled": b"trivial-compiled", "python-epoll": b"trivial-python-epoll", "asyncio": b"trivial"}


@pytest.mark.parametrize("engine", ENGINES)
def test_capa_names_the_engine(servers, engine):
    reply = converse(servers(engine), b"CAPA\r\nQUIT\r\n")
    assert reply == (b"+OK trivial ready\r\n"
                     + trivial.CAPA.replace(b"trivial\r\n", IMPLEMENTATION[engine] + b"\r\n") + b"+OK bye\r\n")


def test_large_reply_to_a_slow_reader(responder):
    # 8 MB is more than the socket buffers hold (at most 4 MiB to send, 128 KiB to receive until
    # the reader reads): the epoll engines must wait for EPOLLOUT, and answer nothing else meanwhile
    port = responder("--messages", "2", "--message-size", "8000000")
    st = trivial.TrivialState(2, trivial.SizeDistribution.parse("8000000"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"RETR 2\r\nSTAT\r\nQUIT\r\n")
        time.sleep(0.3)
        out = bytearray()
        while chunk := s.recv(1 << 20):
            out += chunk
    assert bytes(out) == b"+OK trivial ready\r\n" + st.retr[1] + st.stat + b"+OK bye\r\n"


def test_corrupt_every_second_retr(responder):
    port = responder("--messages", "1", "--message-size", "800", "--corrupt", "2")
    st = trivial.TrivialState(1, trivial.SizeDistribution.parse("800"), corrupt=2)
    out = converse(port, b"RETR 1\r\nRETR 1\r\nRETR 1\r\nQUIT\r\n")
    assert out == b"+OK trivial ready\r\n" + st.retr[0] + st.corrupted[0] + st.retr[0] + b"+OK bye\r\n"
    assert st.corrupted[0] != st.retr[0] and len(st.corrupted[0]) == len(st.retr[0])


def test_overlong_line_closes_and_the_server_goes_on(responder):
    port = responder()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(100) == b"+OK trivial ready\r\n"
        s.sendall(b"USER " + b"x" * 2000)
        try:
            assert s.recv(100) == b""  # closed, without a reply
        except ConnectionResetError:
            pass  # (closed with our octets unread: a reset)
    assert converse(port, b"QUIT\r\n") == b"+OK trivial ready\r\n+OK bye\r\n"


def test_clients_that_vanish_mid_reply_do_not_stop_it(responder):
    port = responder("--messages", "1", "--message-size", "3000000")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
            s.sendall(b"RETR 1\r\n")
            s.recv(1000)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    try:
        for s in socks:
            s.sendall(b"STAT\r\nQUIT\r\n")
        for s in socks:
            out = bytearray()
            while chunk := s.recv(65536):
                out += chunk
            assert out.startswith(b"+OK trivial ready\r\n+OK 1 ") and out.endswith(b"+OK bye\r\n")
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_under_load_stops_it(engine):
    """A signal that lands while the loop is busy (not waiting in epoll) still stops it."""
    for _ in range(3):
        proc, port = start(engine)
        stop = threading.Event()

        def load(port: int, stop: threading.Event) -> None:
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
            for s in socks:
                s.setblocking(False)
            while not stop.is_set():
                for s in socks:
                    try:
                        s.send(b"NOOP\r\n" * 50)
                        s.recv(1 << 16)
                    except OSError:
                        pass
            for s in socks:
                s.close()

        threads = [threading.Thread(target=load, args=(port, stop)) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert_exits_cleanly(proc, 5)


# -- the epoll engine and its twin, side by side


def read_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def reset_mid_reply(port: int, commands: bytes, keep: int) -> bytes:
    """Sends the commands, reads ``keep`` octets of the replies and resets the connection."""
    with socket.socket() as s:
        # a small window (set before connecting): a large reply cannot all be sent and wait for us
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(commands)
        out = read_exactly(s, keep)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    return out


def leave_unread(port: int, commands: bytes) -> bytes:
    """Sends the commands and closes at once, reading nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(commands)
    return b""


MIXED = (b"CAPA\r\nuser a\r\nPASS b\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 0\r\nRETR 3\r\nRETR -1\r\nRETR 1x\r\n"
         b"RETR\r\nRETR 2\r\nXYZZY\r\n\r\nQU\r\nTOP 1 0\r\nDELE 1\r\nRSET\r\nstatus\r\nretrx1\r\nQUIT\r\nSTAT\r\n")
GREETING = b"+OK trivial ready\r\n"


def mixed_replies(st: trivial.TrivialState, first: bytes, second: bytes) -> bytes:
    """The replies to MIXED, its two RETRs (2, then 1) answered with ``first`` and ``second``."""
    return (GREETING + trivial.CAPA.replace(b"trivial\r\n", b"trivial-ENGINE\r\n") + b"+OK\r\n" * 2
            + st.stat + st.list + st.uidl + b"-ERR no such message\r\n" * 5 + first + b"+OK\r\n" * 6
            + st.stat + second + b"+OK bye\r\n")


# Each session has a connection of its own, one after the other; the RETR counter (every
# 3rd RETR corrupted) goes on from one to the next: the numbers of the RETRs in each.
SESSIONS = {
    "pipelined, bad commands, QUIT and a command after it (RETRs 1, 2)": lambda port: converse(port, MIXED),
    "dribbled (3, 4)": lambda port: converse(port, *(MIXED[i : i + 5] for i in range(0, len(MIXED), 5)), pause=0.001),
    # (no RETR: its greeting unread, it resets, and whether its commands are read first is a race)
    "vanishes without reading": lambda port: leave_unread(port, b"STAT\r\nLIST\r\n"),
    # the first RETR is answered in part, the commands after it not at all (nor counted)
    "resets mid-reply (5)": lambda port: reset_mid_reply(port, b"RETR 1\r\nRETR 2\r\nRETR 1\r\nQUIT\r\n",
                                                         len(GREETING) + 5000),
    "after it (6, 7, 8)": lambda port: converse(port, b"RETR 2\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n"),
    "an over-long line": lambda port: converse(port, b"NOOP\r\n" + b"y" * 1500),
    "the last (9)": lambda port: converse(port, b"RETR 1\r\nQUIT\r\n"),
}


def test_the_twin_answers_as_the_compiled_engine(servers):
    """The same sessions, against the compiled engine and its twin: the same octets."""
    args = ("--messages", "2", "--message-size", "6000000", "--corrupt", "3")
    st = trivial.TrivialState(2, trivial.SizeDistribution.parse("6000000"), corrupt=3)
    heard = {}
    for engine in EPOLL_ENGINES:
        port = servers(engine, *args)
        heard[engine] = [run(port).replace(IMPLEMENTATION[engine], b"trivial-ENGINE") for run in SESSIONS.values()]
    for name, compiled, python in zip(SESSIONS, heard["compiled"], heard["python-epoll"], strict=True):
        assert compiled == python, (name, len(compiled), len(python), compiled[:300], python[:300])
    # and what they agree on is right
    assert heard["python-epoll"] == [
        mixed_replies(st, st.retr[1], st.retr[0]),
        mixed_replies(st, st.corrupted[1], st.retr[0]),
        b"",
        (GREETING + st.retr[0])[: len(GREETING) + 5000],
        GREETING + st.corrupted[1] + st.retr[0] + st.retr[1] + b"+OK bye\r\n",
        GREETING + b"+OK\r\n",
        GREETING + st.corrupted[0] + b"+OK bye\r\n",
    ]


@pytest.mark.parametrize("engine", EPOLL_ENGINES)
def test_out_of_descriptors_it_waits_and_goes_on(servers, engine):
    """With its descriptors used up, the connections beyond wait in the backlog (the listening
    socket is not spun on), the ones it has go on being served, and once some close the
    waiting ones are served too."""
    limit = 24
    port = servers(engine)
    pid = servers.procs[-1].pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]))
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(limit)]
    try:
        time.sleep(0.5)
        greeted, waiting = [], []
        for c in clients:
            c.setblocking(False)
            try:
                (greeted if c.recv(100) == GREETING else waiting).append(c)
            except BlockingIOError:
                waiting.append(c)
        assert greeted and waiting, (len(greeted), len(waiting))

        proc_stat = f"/proc/{pid}/stat"
        before = cpu_seconds(proc_stat)
        time.sleep(1.0)
        assert cpu_seconds(proc_stat) - before < 0.3  # not spinning on the listening socket
        for c in waiting:
            with pytest.raises(BlockingIOError):
                c.recv(100)
        greeted[0].settimeout(5)
        greeted[0].sendall(b"NOOP\r\n")
        assert greeted[0].recv(100) == b"+OK\r\n"

        for c in greeted:
            c.close()
        for c in waiting:
            c.settimeout(5)
            c.sendall(b"STAT\r\nQUIT\r\n")
            out = bytearray()
            while chunk := c.recv(65536):
                out += chunk
            assert out.startswith(GREETING + b"+OK 20 ") and out.endswith(b"+OK bye\r\n")
    finally:
        for c in clients:
            c.close()


def cpu_seconds(proc_stat: str) -> float:
    with open(proc_stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_maildirs_makes_a_logins_system_calls(servers, tmp_path):
    """``--maildirs``: the login floor of compare_dovecot.py --login-floor.  While a user
    is logged in their Maildir's byte is locked in the state directory's lock file; a
    RETR reads the message's file in cur/; the session's end unlocks it and logs one
    line; a user without a Maildir is answered as without the option, with no lock and
    no line."""
    import fcntl
    import poplib
    import struct

    from fastpop.store.locking import slot

    root, state = tmp_path / "mail", tmp_path / "state"
    for sub in ("cur", "new", "tmp"):
        (root / "alice" / sub).mkdir(parents=True)
    (root / "alice" / "cur" / "1.M1.host:2,").write_bytes(b"x" * 50_000)
    state.mkdir()
    port = servers("asyncio", "--maildirs", str(root), "--state-dir", str(state))
    pid = servers.procs[-1].pid
    st = os.lstat(root / "alice")
    flock = struct.Struct("hhqqi4x")

    def locked() -> bool:
        fd = os.open(state / "mailbox.locks", os.O_RDWR)
        try:
            query = flock.pack(fcntl.F_WRLCK, os.SEEK_SET, slot(st.st_dev, st.st_ino), 1, 0)
            return flock.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))[0] != fcntl.F_UNLCK
        finally:
            os.close(fd)

    for user in ("alice", "nobody", "alice"):
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user(user)
        pop.pass_("anything")
        assert locked() == (user == "alice")
        assert pop.stat()[0] == 20
        before = read_octets(pid)
        pop.retr(1)
        assert (read_octets(pid) - before >= 50_000) == (user == "alice")
        pop.quit()
        deadline = time.monotonic() + 5
        while locked() and time.monotonic() < deadline:  # (released once the server sees the close)
            time.sleep(0.01)
        assert not locked()
    time.sleep(0.2)
    assert (state / "sessions.log").read_bytes().count(b"user=alice ") == 2
    assert b"nobody" not in (state / "sessions.log").read_bytes()


def read_octets(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_maildirs_needs_the_asyncio_engine(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastpop", "bench", "trivial-server", "--maildirs", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--engine asyncio" in proc.stderr
