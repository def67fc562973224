"""The trivial responder (``fastpop bench trivial-server``), both engines.

It is the load generator's yardstick and the liar of the integrity tests, so
its two engines (the compiled epoll loop and the asyncio twin) must answer
byte for byte alike, over one connection or many, to pipelined or dribbled
commands, and to a client too slow to take a large reply at once.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fastpop.bench import trivial

ENGINES = ["compiled", "asyncio"]


def start(engine: str, *args: str) -> tuple[subprocess.Popen, int]:
    if engine == "compiled" and trivial.compiled_engine() is None:
        pytest.skip("the compiled extension is not built (or FASTPOP_NO_EXTENSIONS is set)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpop", "bench", "trivial-server", "--engine", engine, *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    line = proc.stderr.readline()
    m = re.search(r":(\d+) \(pid \d+, (\w+) engine\)", line)
    assert m, f"trivial server did not start: {line!r}"
    assert m.group(2) == engine  # no silent fallback
    return proc, int(m.group(1))


@pytest.fixture(params=ENGINES)
def responder(request):
    procs = []

    def run(*args: str) -> int:
        proc, port = start(request.param, *args)
        procs.append(proc)
        return port

    yield run
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert_exits_cleanly(proc, 10)


def assert_exits_cleanly(proc: subprocess.Popen, timeout: float) -> None:
    """It exits with 0 within the timeout (else it is killed, and the test fails)."""
    try:
        assert proc.wait(timeout) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def test_capa_names_the_engine(responder):
    port = responder()
    reply = converse(port, b"CAPA\r\nQUIT\r\n")
    assert b"\r\nPIPELINING\r\n" in reply and re.search(rb"IMPLEMENTATION trivial(-compiled)?\r\n\.\r\n", reply)


def test_large_reply_to_a_slow_reader(responder):
    # 8 MB is more than the socket buffers hold (at most 4 MiB to send, 128 KiB to receive until
    # the reader reads): the compiled engine must wait for EPOLLOUT, and answer nothing else meanwhile
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

        def load():
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

        threads = [threading.Thread(target=load) for _ in range(2)]
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
