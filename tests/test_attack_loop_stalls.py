"""Attacks that held a worker's event loop (found in the review of
2026-12-05), each against a real fastpop on 127.0.0.1 with another user's
session measuring what the worker's event loop does meanwhile.

1. A message whose first scan window (1 MiB) is plain and whose rest is lines
   starting with "." (".\\r\\n", three octets each).  Stored CRLF-clean (what
   LMTP and ``fastpop deliver`` store, so anyone who can mail the user can
   plant it; a user who writes their Maildir too), it goes out by sendfile(2),
   judged on its first window; each later dot line then cost a ``send(".")``
   and a sendfile of three octets, and only octets counted against the turn
   (SENDFILE_TURN, 4 MiB): one turn of the event loop made ~2.8 million
   system calls.  A RETR of 9.5 MB took 27 s and held another user's NOOP
   9.7 s (and more: 10 s timeouts).  Now a window with dense dot lines makes
   the rest go from copies stuffed in memory, at the transform's pace.

2. new/ full of hidden names (never messages) with an mtime in the future:
   a login checks new/ in the event loop for a message waiting (has_entries)
   and remembers it empty only under a settled mtime, so every login of that
   user read all of new/ in the event loop (200,000 names: 55-60 ms each
   login, every other session of the worker waiting).  Now the event loop
   reads at most NEW_IN_LOOP_MOST entries; more, and the login's thread lists
   new/.

3. A valid fastpop.index planted in the Maildir (the user's to write)
   naming millions of made-up messages and cur/'s mtime: it is read in the
   login's thread, but LIST and UIDL formatted all of it in the event loop,
   at each command: 4,000,000 records (181 MiB) held another user's NOOP
   140-160 ms per LIST or UIDL, as often as the user asked.  Now a mailbox
   of more than LISTING_IN_LOOP_MOST messages is listed in a thread.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server import PARSERS, Raw, ServerProcess, message, pad_dir, pinging, raw_login

STALL_LIMIT = 0.5  # seconds another user's NOOP may wait (it was several)
PLAIN_LINE = b"x" * 70 + b"\r\n"


def reference(data: bytes) -> bytes:
    """RFC 1939's RETR body of CRLF-clean stored content (terminator excluded)."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in data.split(b"\r\n")[:-1])


def plain(size: int) -> bytes:
    return (PLAIN_LINE * (size // len(PLAIN_LINE) + 1))[:size // len(PLAIN_LINE) * len(PLAIN_LINE)]


def exactly(prefix: bytes, total: int) -> bytes:
    """``prefix`` and plain lines, ``total`` octets in all."""
    out = prefix + plain(total - len(prefix) - 200)
    return out + b"z" * (total - len(out) - 2) + b"\r\n"


def dense_after_plain(dense_octets: int) -> bytes:
    """Headers and a plain first window (over 1 MiB), then ".\\r\\n" lines."""
    return b"From: a@example.com\r\nSubject: dots\r\n\r\n" + plain(1_100_000) + b".\r\n" * (dense_octets // 3)


# --------------------------------------------------------------------------- 1. dense dot lines behind a plain window

@pytest.mark.parametrize("parser", list(PARSERS.values()), ids=list(PARSERS))
def test_dense_dot_lines_after_a_plain_window_do_not_hold_the_event_loop(parser):
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-dense-dots-"))
    srv = ServerProcess(base / "srv", parser)
    try:
        data = dense_after_plain(3 * 1024 * 1024)
        attacker = srv.add_user([data])
        victim = srv.add_user([message("theirs")])
        srv.start()
        v = raw_login(srv.port, victim, timeout=60)
        a = raw_login(srv.port, attacker, timeout=60)
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # a reader that keeps up
        with pinging(v) as waits:
            t0 = time.monotonic()
            status, got = a.multi("RETR 1")
            took = time.monotonic() - t0
        assert status == b"+OK %d octets\r\n" % len(data)
        assert got == reference(data)
        assert max(waits) < STALL_LIMIT, (f"another user's NOOP waited {max(waits):.2f} s during a RETR "
                                          f"of {len(data)} octets ({took:.2f} s)")
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def _mixed_messages() -> list[bytes]:
    head = b"Subject: mixed\r\n\r\n"
    window = 1024 * 1024  # sending.SCAN_WINDOW
    first = plain(window + 4096)
    return [
        # dense from the second window on, ending on a dot line
        head + first + b".\r\n" * 300_000 + b"..\r\n",
        # a few dot lines (sparse: sendfile between them), then dense, then plain again
        head + first + b".a\r\n" + plain(300_000) + b".b\r\n" + b".x\r\n" * 200_000 + plain(700_000) + b".end\r\n",
        # the dense stretch starting exactly at the second window
        exactly(head, window) + b".\r\n" * 200_000 + plain(200_000),
        # ... and one octet after it (the window ends in the middle of a CRLF)
        exactly(head, window - 1) + b".\r\n" * 200_000 + plain(200_000),
        # dots after a long plain stretch in the dense part, and a line of dots
        head + first + (b"...\r\n" + b"y\r\n") * 150_000 + plain(2 * window) + b".\r\n",
    ]


@pytest.mark.parametrize("slow", [False, True], ids=["fast-reader", "slow-reader"])
def test_dense_dot_lines_are_still_stuffed_right(slow):
    """The switch to stuffed copies, wherever it happens (also while the
    socket is full and the stream scans ahead), sends what RFC 1939 says."""
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-dense-right-"))
    srv = ServerProcess(base / "srv", "cython")
    try:
        messages = _mixed_messages()
        user = srv.add_user(messages)
        srv.start()
        c = Raw(srv.port, timeout=60)
        if slow:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        assert c.cmd(f"USER {user.name}").startswith(b"+OK")
        assert c.cmd(f"PASS {user.password}").startswith(b"+OK")
        for n, data in enumerate(messages, 1):
            c.send(b"RETR %d\r\n" % n)
            if slow:
                time.sleep(0.3)  # the server fills the socket, waits, scans ahead
            status = c.line()
            assert status == b"+OK %d octets\r\n" % len(data), (n, status)
            assert c.body() == reference(data), f"message {n} sent wrong"
        c.close()
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- 2. hidden names in new/

HIDDEN_NEW = 150_000


@pytest.fixture(scope="module")
def padded_new(tmp_path_factory) -> Iterator[Path]:
    """A directory of HIDDEN_NEW hidden entries, made once (it takes seconds)."""
    path = tmp_path_factory.mktemp("padded") / "new"
    path.mkdir()
    pad_dir(path, HIDDEN_NEW)
    yield path


@pytest.mark.parametrize("parser", list(PARSERS.values()), ids=list(PARSERS))
def test_hidden_names_in_new_do_not_hold_the_event_loop_at_login(parser, padded_new):
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-hidden-new-"))
    srv = ServerProcess(base / "srv", parser)
    new = None
    try:
        attacker = srv.add_user([message("one")])
        victim = srv.add_user([message("theirs")])
        srv.start()
        attacker.login().quit()  # message moved to cur/, indexed
        old = time.time() - 3600
        os.utime(attacker.maildir / "cur", (old, old))
        attacker.login_when_free().quit()  # the index records cur/'s settled mtime: a warm login from now on
        new = attacker.maildir / "new"
        st = new.stat()
        os.chown(padded_new, st.st_uid, st.st_gid)
        os.chmod(padded_new, st.st_mode & 0o7777)
        new.rmdir()
        os.rename(padded_new, new)
        future = time.time() + 10 * 365 * 86400  # never settled: never remembered empty
        os.utime(new, (future, future))
        v = raw_login(srv.port, victim)
        logins: list[float] = []
        with pinging(v) as waits:
            for _ in range(5):
                t0 = time.monotonic()
                p = attacker.login_when_free()
                logins.append(time.monotonic() - t0)
                assert p.stat()[0] == 1
                p.quit()
                time.sleep(0.05)
        took = min(logins)
        assert took > 0.02, f"a login took {took * 1000:.1f} ms: too few entries to tell"
        assert max(waits) < took / 3, (f"another user's NOOP waited {max(waits) * 1000:.0f} ms while the "
                                       f"attacker logged in ({took * 1000:.0f} ms each)")
    finally:
        srv.stop()
        if new is not None and new.exists():
            os.rename(new, padded_new)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- 3. LIST/UIDL of a planted index

PLANTED_RECORDS = 4_000_000


def planted_index(count: int, cur_mtime_ns: int) -> bytes:
    """A valid fastpop.index of ``count`` made-up messages (short names and
    UIDLs: as many as fit), written record by record (no Entry objects)."""
    from fastpop.store import index as mindex

    pack = mindex.RECORD.pack
    names = bytearray()
    records = bytearray()
    for i in range(count):
        name, uidl = b"m%d" % i, b"u%d" % i
        records += pack(100, 100, len(names), len(name), len(uidl), 0)
        names += name
        names += uidl
    names_off = mindex.HEADER.size + len(records)
    data = bytearray(mindex.HEADER.pack(mindex.MAGIC, mindex.VERSION, count, 100 * count, cur_mtime_ns,
                                        names_off, len(names), 0, 0, 0)) + records + names
    struct.pack_into("<I", data, mindex.CHECKSUM_AT, zlib.crc32(data))
    return bytes(data)


def drain_multiline(c: Raw) -> bytes:
    """A whole multi-line reply, status line included, read in large pieces and
    looked at only at its end: parsing tens of MB here would hold this
    process's GIL, and the other user's NOOPs would seem to wait for the server."""
    chunks = [bytes(c.buf)]
    c.buf.clear()
    tail = chunks[0][-5:]
    while tail != b"\r\n.\r\n":
        chunk = c.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("server closed the connection")
        chunks.append(chunk)
        tail = (tail + chunk)[-5:]
    return b"".join(chunks)


@pytest.mark.parametrize("parser", list(PARSERS.values()), ids=list(PARSERS))
def test_list_and_uidl_of_a_planted_index_do_not_hold_the_event_loop(parser):
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-planted-list-"))
    srv = ServerProcess(base / "srv", parser)
    try:
        attacker = srv.add_user([message("mine")])
        victim = srv.add_user([message("theirs")])
        srv.start()
        attacker.login().quit()
        cur = attacker.maildir / "cur"
        then = time.time_ns() - 3600 * 10**9
        os.utime(cur, ns=(then, then))
        (attacker.maildir / "fastpop.index").write_bytes(planted_index(PLANTED_RECORDS, cur.stat().st_mtime_ns))
        v = raw_login(srv.port, victim)
        a = raw_login(srv.port, attacker, timeout=120)  # (the index is read in the login's thread)
        assert a.cmd("STAT").startswith(b"+OK %d " % PLANTED_RECORDS)
        for command in ("LIST", "UIDL"):
            with pinging(v) as waits:
                t0 = time.monotonic()
                a.send(command.encode() + b"\r\n")
                reply = drain_multiline(a)
                took = time.monotonic() - t0
            assert reply.startswith(b"+OK") and reply.count(b"\r\n") == PLANTED_RECORDS + 2, reply[:100]
            assert max(waits) < took / 5, (f"another user's NOOP waited {max(waits) * 1000:.0f} ms during the "
                                           f"attacker's {command} ({took * 1000:.0f} ms)")
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.unit
@pytest.mark.parametrize("dot_sent", [False, True])
def test_a_line_stuffed_before_the_switch_to_copies_is_not_stuffed_again(tmp_path, dot_sent):
    """The switch to stuffed copies can come while the socket is full right after
    the stuffing "." of a dot line went out and before the line did (the wait
    scans ahead and finds the dense window): the copy starting at that line must
    not stuff it a second time, or the client reads ".." where the message has "."."""
    from types import SimpleNamespace

    from fastpop.session.sending import SendfileStream

    data = b"x\r\n" + b".\r\n" * 10
    path = tmp_path / "message"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = SendfileStream(SimpleNamespace(loop=None), fd, len(data))
        stream._offset = 3  # the first "." line
        if dot_sent:
            stream._dot_sent_at = 3  # as _send leaves it when the socket filled after that line's "."
        stream._copying = True
        assert stream._copy_stuffed() == len(data) - 3
        first = b".\r\n" if dot_sent else b"..\r\n"
        assert bytes(stream._pending) == first + b"..\r\n" * 9
    finally:
        os.close(fd)
