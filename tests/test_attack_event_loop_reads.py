"""Every file of a Maildir is the user's to make as large as they like, and
none may be read at length by the event loop, where every other session of
the worker would wait for it.  A guard over the whole class, against a real
fastpop over TCP: with every bookkeeping file a session can touch planted
large (dovecot-uidlist, fastpop.retrieved, dovecot-keywords, a valid
fastpop.index), a session doing everything (login, STAT, LIST, UIDL, RETR,
TOP, DELE, QUIT with [mail] uidl = "dovecot", deleted_flag and EXPIRE on)
costs the event-loop thread less than IN_LOOP_MOST of reads; the threads
read the rest.

The instances found so far each have their own test: a planted index
(tests/test_attack_crafted_files.py::test_planted_large_index_is_read_outside_the_event_loop),
the NUL search (::test_nul_search_of_a_large_message_is_outside_the_event_loop),
a message grown in place (::test_message_grown_in_place_does_not_stall_other_sessions),
a bloated uidl list, the EXPIRE record, renamed messages' listings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from support.server import ServerProcess, event_loop_reads, message, raw_login

from fastpop.store.index import IN_LOOP_MOST, Entry, encode

PLANTED = 12 * 1024 * 1024  # each large file: 12 times what the event loop may read
SETTLED_NS = 3600 * 10**9


@pytest.fixture
def srv():
    base = Path(tempfile.mkdtemp(prefix="fastpop-event-loop-reads-"))
    server = ServerProcess(base / "srv", "cython", extra_args=[
        "--mail-uidl", "dovecot", "--deleted-flag", "Trash", "--expire", "30"])
    yield server
    if server.proc is not None:
        server.stop()
    log = server.log()
    shutil.rmtree(base, ignore_errors=True)
    assert "Traceback" not in log, log[-3000:]


def lines_of(first: bytes, line: bytes, size: int) -> bytes:
    """``first``, then ``line`` with n for each "%d" (n = 1, 2, ...) until ``size`` octets."""
    out, n, total = [first], 0, len(first)
    while total < size:
        n += 1
        text = line % ((n,) * line.count(b"%d"))
        out.append(text)
        total += len(text)
    return b"".join(out)


def session(srv: ServerProcess, user, commands: list[str]) -> int:
    """Octets the event loop read during one session of ``commands`` then QUIT."""
    before = event_loop_reads(srv)
    r = raw_login(srv.port, user, timeout=60)
    for command in commands:
        reply = r.cmd(command)
        assert reply.startswith(b"+OK"), (command, reply)
        if command in ("LIST", "UIDL") or command.startswith(("RETR", "TOP")):
            r.body()
    assert r.cmd("QUIT").startswith(b"+OK")
    r.close()
    return event_loop_reads(srv) - before


def test_no_planted_file_is_read_at_length_in_the_event_loop(srv):
    user = srv.add_user()
    maildir = user.maildir
    (maildir / "dovecot-uidlist").write_bytes(lines_of(b"3 V1 N1\n", b"%d :made-up-%d\n", PLANTED))
    (maildir / "dovecot-keywords").write_bytes(lines_of(b"", b"%d Keyword%d\n", 60 * 1024))  # (its limit: 64 KiB)
    (maildir / "fastpop.retrieved").write_bytes(lines_of(b"", b"1600000000 made-up-uidl-%d\n", PLANTED))
    for i in range(3):
        user.deliver(message(f"message {i}"))
    srv.start()

    # new/ holds mail: the index is built, the uidlist and the EXPIRE record read, in threads
    read = session(srv, user, ["STAT", "LIST", "UIDL", "RETR 1", "TOP 2 0", "DELE 3"])
    assert read < IN_LOOP_MOST, f"the event loop read {read} octets in a session"

    # a valid index planted over the one just written, naming cur/'s mtime (new/ is empty now),
    # and the EXPIRE record removed: the login takes its fast path, the one in the event loop
    (maildir / "fastpop.retrieved").unlink()
    cur = maildir / "cur"
    then = time.time_ns() - SETTLED_NS
    os.utime(cur, ns=(then, then))
    entries = [Entry(f"{1600000000 + i}.M{i}P1.host:2,", 100, 100, 1, f"u{i}") for i in range(200_000)]
    planted = encode(entries, cur.stat().st_mtime_ns, 0)
    assert len(planted) >= PLANTED
    (maildir / "fastpop.index").write_bytes(planted)
    read = session(srv, user, ["STAT"])
    assert read < IN_LOOP_MOST, f"the event loop read {read} octets at a login with a planted index"
