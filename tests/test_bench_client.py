"""fastpop bench's client protocol, in process: replies fed to a Session by hand.

The RETR fast path (a whole reply verified in place, ``Session._whole_message``)
must reach the same verdict as ``MessageReader`` however the reply is cut
into reads, and must catch every corruption the reader catches.
"""

from __future__ import annotations

import socket
import time
from array import array

import pytest

from fastpop.bench import _wire_py, spawn
from fastpop.bench import client as C
from fastpop.bench import scenarios as S
from fastpop.bench.load import LoadSpec, Worker, new_loop


@pytest.fixture(autouse=True)
def wire(twin, monkeypatch):
    """Every test runs with the compiled in-place RETR check and with its Python twin
    (conftest's ``twin``: the compiled one not built fails, unless FASTPOP_NO_EXTENSIONS)."""
    impl = twin("fastpop.bench._wire")
    for name in ("whole_retr", "verify_whole", "announced_size"):
        monkeypatch.setattr(C, name, getattr(impl, name))
    return impl


class _Future:
    def __init__(self) -> None:
        self.result = None

    def done(self) -> bool:
        return self.result is not None

    def set_result(self, value) -> None:
        self.result = value


class _Loop:
    def create_future(self) -> _Future:
        return _Future()


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    abort = close


class _Worker:
    """What a Session needs of load.Worker."""

    def __init__(self) -> None:
        self.loop = _Loop()
        self.ws, self.we = 0, 1 << 62
        self.lat = [array("q") for _ in C.LABELS]
        self.commands = self.win_commands = 0
        self.unverified = 0
        self.errors: list[tuple[str, str]] = []
        self.finished: list[bool] = []
        self.timeout = 10.0

    def record(self, label: int, ns: int, now: int) -> None:
        self.lat[label].append(ns // 1000)

    def error(self, kind: str, detail: str) -> None:
        self.errors.append((kind, detail))

    def session_finished(self, s, ok: bool) -> None:
        self.finished.append(ok)


def _stuff(data: bytes) -> bytes:
    out = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    return out


def _messages(count: int = 3, size: int = 3700, seed: int = 3) -> list[bytes]:
    factory = spawn.MessageFactory(seed)
    msgs = [factory.message("u", n, size) for n in range(1, count + 1)]
    assert all(b"\r\n." in m for m in msgs)  # lines that need stuffing
    return msgs


def _retr_reply(msg: bytes, wire: bytes | None = None, announced: int | None = None) -> bytes:
    wire = _stuff(msg) if wire is None else wire
    return b"+OK %d octets\r\n" % (len(msg) if announced is None else announced) + wire + b".\r\n"


def _run(replies: list[bytes], cut) -> tuple[C.Session, _Worker, _Transport]:
    """A download session fed ``replies`` (greeting, USER, PASS, UIDL, RETR..., QUIT), each cut by ``cut``."""
    w = _Worker()
    user = S.User("u", "p", "user")
    s = C.Session(w, S.download(user, S.Options()), user, time.monotonic_ns())  # type: ignore[arg-type]
    tr = _Transport()
    s.connection_made(tr)  # type: ignore[arg-type]
    for reply in replies:
        for piece in cut(reply):
            if s.finished:
                break
            s.data_received(piece)
    return s, w, tr


def _session_replies(retrs: list[bytes]) -> list[bytes]:
    uidl = b"+OK\r\n" + b"".join(b"%d uid%d\r\n" % (n, n) for n in range(1, len(retrs) + 1)) + b".\r\n"
    return [b"+OK ready\r\n", b"+OK\r\n", b"+OK\r\n", uidl, *retrs, b"+OK bye\r\n"]


CUTS = {
    "whole": lambda r: [r],
    "status apart": lambda r: ([r[: r.find(b"\r\n") + 2], r[r.find(b"\r\n") + 2 :]]
                               if r.startswith(b"+OK ") and r.endswith(b"\r\n.\r\n") and len(r) > 100 else [r]),
    "7 octets": lambda r: [r[i : i + 7] for i in range(0, len(r), 7)],
    "1000 octets": lambda r: [r[i : i + 1000] for i in range(0, len(r), 1000)],
    "terminator apart": lambda r: [r[:-3], r[-3:]] if len(r) > 10 else [r],
}


@pytest.mark.parametrize("cut", CUTS)
def test_honest_download_is_verified_however_cut(cut):
    msgs = _messages()
    s, w, tr = _run(_session_replies([_retr_reply(m) for m in msgs]), CUTS[cut])
    assert w.errors == [] and w.finished == [True]
    assert s.messages == len(msgs) and s.octets == sum(map(len, msgs))
    assert w.unverified == 0
    assert tr.written == [b"USER u\r\n", b"PASS p\r\n", b"UIDL\r\n", b"RETR 1\r\n", b"RETR 2\r\n", b"RETR 3\r\n",
                          b"QUIT\r\n"]
    assert len(w.lat[C.L_RETR]) == 3 and len(w.lat[C.L_UIDL]) == 1 and w.commands == 8
    assert tr.closed


def _flip(wire: bytes) -> bytes:
    bad = bytearray(wire)
    i = len(bad) - len(bad) // 3
    while bad[i] in (13, 10, 46):
        i += 1
    bad[i] ^= 0x20
    return bytes(bad)


def _lose_a_dot(wire: bytes) -> bytes:
    i = wire.index(b"\r\n..")
    return wire[: i + 2] + wire[i + 3 :]


def _extra_dot(wire: bytes) -> bytes:
    i = wire.index(b"\r\n..")
    return wire[: i + 2] + b"." + wire[i + 2 :]


CORRUPTIONS = {
    "flipped byte": (lambda m: _retr_reply(m, _flip(_stuff(m))), "SHA-256"),
    "stuffing dot lost": (lambda m: _retr_reply(m, _lose_a_dot(_stuff(m))), ""),
    "stuffing dot doubled": (lambda m: _retr_reply(m, _extra_dot(_stuff(m))), ""),
    "not stuffed at all": (lambda m: _retr_reply(m, m), ""),
    "announced size wrong": (lambda m: _retr_reply(m, announced=len(m) + 1), "announced"),
    "a line cut off": (lambda m: _retr_reply(m, _stuff(m)[: -40] + b"\r\n"), ""),
    "a lone dot line in the body": (lambda m: _retr_reply(m, _stuff(m).replace(b"\r\n\r\n", b"\r\n\r\n.\r\n", 1)), ""),
}


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corruption_is_an_integrity_error_however_cut(corruption, cut):
    make, words = CORRUPTIONS[corruption]
    msgs = _messages()
    retrs = [_retr_reply(msgs[0]), make(msgs[1]), _retr_reply(msgs[2])]
    s, w, _ = _run(_session_replies(retrs), CUTS[cut])
    assert w.finished == [False], (w.errors, s.messages)
    kinds = {kind for kind, _ in w.errors}
    # a lone "." line ends the message early: what follows is no POP3 reply
    assert kinds in ({"integrity"}, {"protocol"}) if "lone dot" in corruption else kinds == {"integrity"}, w.errors
    assert words in w.errors[0][1]
    assert s.messages == 1


def test_fast_path_agrees_with_the_reader_on_size():
    """The fast path's size (with the per-body count of stuffed lines cached) is the reader's."""
    msgs = _messages(5, size=6000, seed=11)
    for msg in msgs + msgs:  # the second round hits the cache
        wire = _stuff(msg)
        reader = C.MessageReader()
        assert reader.feed(wire + b".\r\n") == len(wire) + 3
        assert reader.verify(len(msg)) is None and reader.size == len(msg)
        s, w, _ = _run(_session_replies([_retr_reply(msg)]), CUTS["whole"])
        assert w.errors == [] and s.octets == len(msg)


def test_same_body_different_headers_sizes_stay_exact():
    """The cache is keyed by the body's checksum: a longer header (with a stuffed line) still counts."""
    msg = _messages(1)[0]
    head, body = msg.split(b"\r\n\r\n", 1)
    other = head + b"\r\nX-Extra: " + b"x" * 50 + b"\r\n\r\n" + body
    for m in (msg, other, msg):
        s, w, _ = _run(_session_replies([_retr_reply(m)]), CUTS["whole"])
        assert w.errors == [] and s.octets == len(m)


@pytest.mark.parametrize("first", [b"..Stuffed: yes\r\n", b".x: unstuffed\r\n", b"X-Dot: .\r\n..: x\r\n"])
@pytest.mark.parametrize("cut", ["whole", "status apart", "7 octets"])
def test_header_lines_with_dots_count_as_the_reader_counts(first, cut):
    """Sizes from the header block (not covered by the checksum) agree with MessageReader's."""
    msg = _messages(1)[0]
    wire = first + _stuff(msg)
    reader = C.MessageReader()
    reader.feed(wire + b".\r\n")
    for announced, ok in ((reader.size, True), (reader.size - 1, False), (reader.size + 1, False)):
        s, w, _ = _run(_session_replies([_retr_reply(msg, wire, announced=announced)]), CUTS[cut])
        assert (w.errors == []) is ok, w.errors
        if ok:
            assert s.octets == reader.size


def test_messages_the_fast_path_leaves_to_the_reader():
    msg = _messages(1)[0]
    head, body = msg.split(b"\r\n\r\n", 1)
    plain = b"From: x\r\nSubject: no checksum\r\n\r\n" + body  # not seeded: unverified, no error
    upper = msg.replace(b"X-Fastpop-Bench-Sha256", b"x-fastpop-bench-sha256")  # header name in another case
    digest_at = upper.index(b"sha256: ") + 8
    upper = upper[:digest_at] + upper[digest_at : digest_at + 64].upper() + upper[digest_at + 64 :]
    s, w, _ = _run(_session_replies([_retr_reply(plain), _retr_reply(upper), _retr_reply(b"")]), CUTS["whole"])
    assert w.errors == [] and s.messages == 3
    assert w.unverified == 2  # the plain one and the empty one
    assert s.octets == len(plain) + len(upper)


def test_error_and_unexpected_replies():
    w_replies = _session_replies([_retr_reply(m) for m in _messages(2)])
    s, w, _ = _run(w_replies[:3] + [b"-ERR mailbox locked\r\n"], CUTS["whole"])
    assert w.errors and w.errors[0][0] == "err:UIDL" and "mailbox locked" in w.errors[0][1]
    s, w, _ = _run([b"+OK ready\r\n", b"* hello\r\n"], CUTS["whole"])
    assert w.errors[0][0] == "protocol" and "not a POP3 reply" in w.errors[0][1]
    s, w, _ = _run([b"+OK ready\r\n", b"+OK " + b"x" * (C.MAX_LINE + 10)], CUTS["1000 octets"])
    assert w.errors[0][0] == "protocol" and "longer than" in w.errors[0][1]


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_connect_that_hangs_times_out(loop_kind):
    """Connect timeouts come from the worker's sweep (no asyncio.timeout per session)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = []
    for _ in range(4):  # a full accept queue: further SYNs are dropped, connect() hangs
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fill.append(sock)
    time.sleep(0.1)
    try:
        spec = LoadSpec(host="127.0.0.1", port=port, scenario="stat", users=[("u1", "p"), ("u2", "p")],
                        connections=2, duration=None, sessions=2, timeout=0.5, procs=1, t0=time.monotonic_ns())
        loop = new_loop(loop_kind)
        try:
            started = time.monotonic()
            result = loop.run_until_complete(Worker(spec, None, loop).run())
        finally:
            loop.close()
        assert result["errors"] == {"connect": 2}
        assert "no connection within 0.5 s" in result["error_samples"]["connect"][0]
        assert time.monotonic() - started < 5
    finally:
        for sock in fill:
            sock.close()
        listener.close()


def test_worker_counts_commands_in_window():
    """Session._reply counts commands inline; the worker folds them into its counters."""
    msgs = _messages(2)
    s, w, _ = _run(_session_replies([_retr_reply(m) for m in msgs]), CUTS["whole"])
    assert w.commands == w.win_commands == 7



def test_inlined_histogram_recording_matches_hdrh():
    """load.record_counts inlines hdrh's index arithmetic; it must record what record_value does."""
    import random

    from fastpop.bench import load

    assert load._pick_record_counts() is load._record_counts_fast  # this hdrh: the fast one is used
    rng = random.Random(5)
    values = array("q", [rng.choice((rng.randint(-3, 3000), rng.randint(1, 10**7), rng.randint(1, 10**11)))
                         for _ in range(5000)])
    a, b = load.new_histogram(), load.new_histogram()
    load._record_counts_slow(a, values)
    load.record_counts(b, values)
    assert a.encode() == b.encode()
    assert (a.get_total_count(), a.get_min_value(), a.get_max_value()) == \
        (b.get_total_count(), b.get_min_value(), b.get_max_value())
    for p in (50, 90, 99, 99.9, 100):
        assert a.get_value_at_percentile(p) == b.get_value_at_percentile(p)


STATUS_LINES = [b"+OK %d octets", b"+OK %d", b"+OK\t%d\toctets", b"+OK  %d", b"+OKAY %d", b"+OK", b"+OK octets %d",
                b"+OK %dx octets", b"+OK 0%d", b"+OK 123456789012345678901234567890 octets", b"-ERR %d", b" +OK %d",
                b"+OK 000000000000000000000%d octets", b"+OK 999999999999999999 octets", b"+OK 1000000000000000000",
                b"+OK 0", b"+OK 00"]


def _variants(msg: bytes) -> list[bytes]:
    wire = _stuff(msg)
    out = []
    for status in STATUS_LINES:
        line = status % len(msg) if b"%d" in status else status
        out.append(line + b"\r\n" + wire + b".\r\n")
    for make, _ in CORRUPTIONS.values():
        out.append(make(msg))
    out += [
        _retr_reply(msg, announced=len(msg) - 1),
        _retr_reply(msg)[:-1],  # no terminator
        _retr_reply(msg) + b"+OK\r\n",  # something after it
        _retr_reply(msg, b"..Stuffed: yes\r\n" + wire, announced=len(msg) + 16),
        _retr_reply(msg, b".x: y\r\n" + wire, announced=len(msg) + 6),
        _retr_reply(msg, wire.replace(b"X-Fastpop-Bench-Sha256", b"x-fastpop-bench-sha256")),
        _retr_reply(msg, wire.replace(b"\r\n\r\n", b"\r\n", 1)),  # no header block end
        _retr_reply(b""), _retr_reply(b"", b"\r\n"), b"+OK\r\n.\r\n", b"+OK 0\r\n\r\n.\r\n", b"+OK", b"",
    ]
    digest_at = wire.find(b"Sha256: ") + 8
    if digest_at < 8:
        return out
    out.append(_retr_reply(msg, wire[:digest_at] + wire[digest_at : digest_at + 64].upper() + wire[digest_at + 64 :]))
    out.append(_retr_reply(msg, wire[:digest_at] + wire[digest_at : digest_at + 63] + wire[digest_at + 65 :]))
    return out


def test_check_is_the_twins_and_never_kinder_than_the_reader(wire):
    msgs = _messages(4, seed=6) + [b"Subject: no checksum\r\n\r\nbody\r\n.dot\r\n"]
    cases = [v for m in msgs for v in _variants(m)]
    accepted = 0
    for data in cases:
        got = wire.whole_retr(data)
        assert got == _wire_py.whole_retr(data), data[:80]
        i = data.find(b"\r\n")
        if i >= 0:
            assert wire.announced_size(data[:i]) == _wire_py.announced_size(data[:i]), data[:i]
        if got >= 0:  # accepted: the reader agrees, to the octet
            accepted += 1
            reader = C.MessageReader()
            assert reader.feed(data[i + 2 :]) == len(data) - i - 2
            assert reader.verify(_wire_py.announced_size(data[:i])) is None and reader.size == got
            assert reader.expected is not None
    assert accepted >= 4 * 6  # the honest variants of each seeded message
