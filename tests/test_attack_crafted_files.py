"""Crafted file contents and names in a user's own Maildir, against a real
fastpop over TCP.

Numbers in Maildir names and in the Maildir's bookkeeping files were parsed
with ``str.isdigit()`` then ``int()``.  ``isdigit()`` is also true of digits
``int()`` refuses ("²", superscript two), so one such character raised
ValueError where nothing expected it:

- ``S=²`` in a message name: QUIT after DELE raised in the event loop
  (maildirsize.quota_size), a traceback, no reply to QUIT, and the messages
  after that one in the list were not deleted;
- ``²...`` as the name's leading number: every login failed (the delivery
  order sort in maildir._rebuild);
- ``² Gone`` in dovecot-keywords with ``[pop3] deleted_flag``: the login
  failed, and a QUIT after DELE raised in the event loop;
- a planted ``fastpop.lock`` naming pid "²" (``[mail] lock = "symlink"``):
  PASS raised in the event loop, a traceback, the connection dropped;
- a version 1 dovecot-uidlist header "1 ² 5" (``[mail] uidl = "dovecot"``):
  a plain ValueError, not UidlistCorrupt, so [SYS/TEMP] instead of the
  [SYS/PERM] every other corrupt list gets;
- the mbox import manifest (fastpop import mbox, run by an administrator
  on a user's Maildir) with "²" as an occurrence: the import crashed.

And ``W=`` in a name, the size STAT and LIST announce, was believed
whatever it said: ``W=5`` on a 100-octet file announced 5 and sent 100, and
a W= past 2^64 made the index unwritable (struct.error: no login at all).
A W= that no file of that size can have is now ignored and the file counted.

Large files were read whole in the event loop, every other session of the
worker waiting: a valid fastpop.index planted in the Maildir (up to 256 MiB,
at each login after the user rewrote it), and, with outlook-no-nuls, a large
message searched for a NUL before sendfile.  Both are read in threads now.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.server import Raw, ServerProcess, event_loop_reads, message, raw_login

from fastpop.store import locking

REPLY_TIMEOUT = 10.0


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="fastpop-attack-crafted-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _server(base: Path, *args: str) -> ServerProcess:
    return ServerProcess(base / "srv", "cython", extra_args=list(args))


def _plant(user, name: str, data: bytes) -> Path:
    path = user.maildir / "cur" / name
    path.write_bytes(data)
    return path


def _no_traceback(srv: ServerProcess) -> None:
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]


def test_quit_deletes_with_a_non_ascii_size_in_a_name(base):
    srv = _server(base)
    try:
        user = srv.add_user()
        # first in delivery order, so a QUIT that stops at it leaves the other
        crafted = _plant(user, "1600000000.M1P1.host,S=\u00b2:2,", message("crafted"))
        other = _plant(user, "1600000001.M2P1.host:2,", message("other"))
        srv.start()
        r = raw_login(srv.port, user, timeout=REPLY_TIMEOUT)
        assert r.cmd("STAT").startswith(b"+OK 2 ")
        assert r.cmd("DELE 1").startswith(b"+OK")
        assert r.cmd("DELE 2").startswith(b"+OK")
        assert r.cmd("QUIT").startswith(b"+OK")
        r.close()
        assert not crafted.exists() and not other.exists()
        _no_traceback(srv)
    finally:
        srv.stop()


def test_login_with_a_non_ascii_number_leading_a_name(base):
    srv = _server(base)
    try:
        user = srv.add_user([message("delivered")])
        _plant(user, "\u00b2\u00b3.M1P1.host:2,", message("crafted"))
        srv.start()
        r = raw_login(srv.port, user, timeout=REPLY_TIMEOUT)
        assert r.cmd("STAT").startswith(b"+OK 2 ")
        assert r.cmd("QUIT").startswith(b"+OK")
        _no_traceback(srv)
    finally:
        srv.stop()


def test_deleted_flag_with_a_non_ascii_keyword_index(base):
    srv = _server(base, "--deleted-flag", "Gone")
    try:
        user = srv.add_user([message("one")])
        (user.maildir / "dovecot-keywords").write_bytes("\u00b2 Other\n".encode())
        srv.start()
        r = raw_login(srv.port, user, timeout=REPLY_TIMEOUT)
        assert r.cmd("DELE 1").startswith(b"+OK")
        assert r.cmd("QUIT").startswith(b"+OK")
        r.close()
        names = [p.name for p in (user.maildir / "cur").iterdir()]
        assert len(names) == 1 and names[0].endswith(":2,a"), names  # flagged with the keyword's letter
        _no_traceback(srv)
    finally:
        srv.stop()


def test_planted_symlink_lock_with_a_non_ascii_pid(base):
    srv = _server(base, "--mail-lock", "symlink")
    try:
        user = srv.add_user([message("one")])
        # what this host's own locks look like, with a pid int() refuses
        owner = locking.owner()
        fake = "\u00b2." + owner.split(".", 1)[1]
        os.symlink(fake, user.maildir / "fastpop.lock")
        srv.start()
        r = Raw(srv.port, timeout=REPLY_TIMEOUT)
        assert r.cmd(f"USER {user.name}").startswith(b"+OK")
        reply = r.cmd(f"PASS {user.password}")
        assert reply.startswith(b"+OK"), reply  # nobody holds it: taken over as stale
        assert r.cmd("QUIT").startswith(b"+OK")
        _no_traceback(srv)
    finally:
        srv.stop()


def test_dovecot_uidlist_v1_header_with_non_ascii_digits(base):
    srv = _server(base, "--mail-uidl", "dovecot")
    try:
        user = srv.add_user([message("one")])
        (user.maildir / "dovecot-uidlist").write_bytes("1 \u00b2 5\n1 x\n".encode())
        srv.start()
        r = Raw(srv.port, timeout=REPLY_TIMEOUT)
        assert r.cmd(f"USER {user.name}").startswith(b"+OK")
        reply = r.cmd(f"PASS {user.password}")
        # refused like any other corrupt list: no UIDL is guessed, an administrator must act
        assert reply.startswith(b"-ERR [SYS/PERM]"), reply
        assert "UidlistCorrupt" in srv.log() or "bad UIDVALIDITY" in srv.log()
        _no_traceback(srv)
    finally:
        srv.stop()


@pytest.mark.parametrize("virtual", ["5", "99999999999999999999999"])
def test_impossible_w_size_in_a_name_is_not_announced(base, virtual):
    srv = _server(base)
    try:
        user = srv.add_user()
        data = message("crafted", size=98)[:98] + b"\r\n"
        assert len(data) == 100
        _plant(user, f"1600000000.M1P1.host,S=100,W={virtual}:2,", data)
        srv.start()
        r = raw_login(srv.port, user, timeout=REPLY_TIMEOUT)
        assert r.cmd("STAT") == b"+OK 1 100\r\n"
        assert r.multi("LIST")[1] == b"1 100\r\n"
        status, body = r.multi("RETR 1")
        assert status == b"+OK 100 octets\r\n" and body == data
        assert r.cmd("QUIT").startswith(b"+OK")
        _no_traceback(srv)
    finally:
        srv.stop()


def test_plausible_w_size_is_still_used(base):
    """The bound keeps W= for what it is for: a file stored with bare LF."""
    srv = _server(base)
    try:
        user = srv.add_user()
        data = b"Subject: lf\n\nbody\n"
        _plant(user, f"1600000000.M1P1.host,S={len(data)},W={len(data) + 3}:2,", data)
        srv.start()
        r = raw_login(srv.port, user, timeout=REPLY_TIMEOUT)
        assert r.cmd("STAT") == b"+OK 1 %d\r\n" % (len(data) + 3)
        status, body = r.multi("RETR 1")
        assert body == data.replace(b"\n", b"\r\n")
        assert r.cmd("QUIT").startswith(b"+OK")
        _no_traceback(srv)
    finally:
        srv.stop()


def test_mbox_import_manifest_with_a_non_ascii_occurrence(base):
    from fastpop.delivery.mbox_import import MANIFEST

    base.chmod(0o755)
    spool = base / "spool"
    spool.write_bytes(b"From a@example.com Mon Jan  1 00:00:00 2024\nSubject: x\n\nhello\n")
    maildir = base / "Maildir"
    for sub in ("", "cur", "new", "tmp"):
        (maildir / sub).mkdir(mode=0o700)
    (maildir / MANIFEST).write_bytes("abc \u00b2 name uidl\n".encode())
    if os.geteuid() == 0:  # root imports for the spool's owner: a user's Maildir
        nobody = pwd.getpwnam("nobody")
        for path in (spool, maildir, maildir / "cur", maildir / "new", maildir / "tmp", maildir / MANIFEST):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    result = subprocess.run([sys.executable, "-m", "fastpop", "import", "mbox", str(spool), "--maildir", str(maildir)],
                            capture_output=True, timeout=60)
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.returncode == 0, result.stderr
    assert len(list((maildir / "new").iterdir())) + len(list((maildir / "cur").iterdir())) == 1


def test_x_uidl_pin_with_a_non_ascii_number_leading_a_name(base):
    maildir = base / "Maildir"
    for sub in ("", "cur", "new", "tmp"):
        (maildir / sub).mkdir(mode=0o700)
    (maildir / "cur" / "\u00b2\u00b3.M1P1.host:2,").write_bytes(b"X-UIDL: kept-uidl\r\nSubject: x\r\n\r\nbody\r\n")
    result = subprocess.run([sys.executable, "-m", "fastpop", "import", "x-uidl", str(maildir)],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"kept-uidl" in (maildir / "dovecot-uidlist").read_bytes()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("kind", ["dovecot", "courier"])
def test_bloated_uidl_list_does_not_blow_up_the_worker(base, kind):
    """A user fills dovecot-uidlist (64 MiB allowed) or courierpop3dsizelist
    (32 MiB) with millions of made-up records, then drops a message in new/:
    the login that indexes it parsed the whole list into a dict of every
    record, over 15 times the file in RSS (1.2 GiB for 60 MiB of
    dovecot-uidlist, and 20 s of CPU), at every such login.  Only the records
    of the messages being indexed are kept now."""
    srv = _server(base)
    try:
        user = srv.add_user()
        path = user.deliver(message("real"))
        real = path.name.split(":", 1)[0].encode()
        if kind == "dovecot":
            name, lines, limit = "dovecot-uidlist", [b"3 V1 N1"], 60 * 1024 * 1024
            record, last, expected = b"%d :%x", b"%d Pkept-uidl :%s", b"kept-uidl"
        else:
            name, lines, limit = "courierpop3dsizelist", [b"/2 1 42"], 30 * 1024 * 1024
            record, last, expected = b"%x 1 %d:42", b"%s 10 %d:42", None
        size = uid = 0
        while size < limit:
            uid += 1
            line = record % (uid, uid)
            lines.append(line)
            size += len(line) + 1
        uid += 1
        lines.append(last % (uid, real) if kind == "dovecot" else last % (real, uid))
        expected = expected or b"UID%d-42" % uid
        (user.maildir / name).write_bytes(b"\n".join(lines) + b"\n")
        del lines
        srv.start()
        pid = srv.proc.pid
        before = _peak_rss(pid)
        r = raw_login(srv.port, user, timeout=120)
        assert r.cmd("UIDL 1") == b"+OK 1 %s\r\n" % expected  # what the list says for the real message
        assert r.cmd("QUIT").startswith(b"+OK")
        growth = _peak_rss(pid) - before
        # the file itself is read whole (and joined from its chunks: twice), split a block at a time
        assert growth < 4 * size, f"worker grew {growth >> 20} MiB for a {size >> 20} MiB {name}"
        _no_traceback(srv)
    finally:
        srv.stop()


def test_message_grown_in_place_does_not_stall_other_sessions(base):
    """The user extends one of their messages in place after it was indexed
    (truncate(2) up: a sparse file, no disk used; cur/'s mtime does not
    change, so the index is still taken as current).  RETR found the size
    changed and counted the octets it would send, reading the whole file in
    the event loop: every other session of the worker waited (about 3 s per
    256 MiB here), at each RETR.  The count now runs in a thread."""
    srv = _server(base)
    try:
        attacker = srv.add_user([message("mine", size=200_000)])
        victim = srv.add_user([message("theirs")])
        srv.start()
        a = raw_login(srv.port, attacker, timeout=120)
        assert a.cmd("QUIT").startswith(b"+OK")  # indexed
        [path] = (attacker.maildir / "cur").iterdir()
        os.truncate(path, 256 * 1024 * 1024)
        v = raw_login(srv.port, victim, timeout=REPLY_TIMEOUT)
        a = raw_login(srv.port, attacker, timeout=120)
        a.send(b"RETR 1\r\n")
        time.sleep(0.05)  # the RETR is being handled
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            assert v.cmd("NOOP").startswith(b"+OK")
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
        status = a.line()
        assert status == b"+OK %d octets\r\n" % (256 * 1024 * 1024 + 2), status  # (no final newline: +2)
        a.close()
        assert v.cmd("QUIT").startswith(b"+OK")
        assert worst < 0.3, f"another user's NOOP waited {worst:.2f} s for the attacker's RETR"
    finally:
        srv.stop()


def test_sparse_message_is_measured_by_what_it_stores(base):
    """A message file of a terabyte of holes (truncate(2): no disk used) in
    cur/: the login that indexes it read every octet of it in a thread of
    the login pool (hours), and the few threads every login of the worker
    shares are taken by as many such users.  Holes are zeros the file system
    does not store: they are counted, not read."""
    srv = _server(base)
    try:
        user = srv.add_user([message("normal")])
        sparse = _plant(user, "1600000000.M1P1.host:2,", b"")
        os.truncate(sparse, 1 << 40)
        with open(sparse, "r+b") as f:  # a little data amid the holes: what is stored is still read
            f.seek(1 << 30)
            f.write(b"\r\n.dot line\r\n")
        srv.start()
        started = time.monotonic()
        r = raw_login(srv.port, user, timeout=30)
        assert time.monotonic() - started < 20
        listed = r.multi("LIST")[1]
        assert b"1 %d\r\n" % ((1 << 40) + 2) in listed, listed  # no final newline: +2
        assert r.cmd("QUIT").startswith(b"+OK")
        _no_traceback(srv)
    finally:
        srv.stop()


def test_planted_large_index_is_read_outside_the_event_loop(base):
    """The user writes a valid fastpop.index of 12 MiB into their Maildir (the
    index lives there by default, the user's to write), its header naming
    cur/'s mtime.  The login took it as current and read and checked it in
    the event loop, every other session of the worker waiting meanwhile,
    at each login after the user rewrote it (up to MAX_INDEX_BYTES, 256 MiB).
    An index larger than IN_LOOP_MOST that the worker has not seen unchanged
    is now read by the thread that opens the mailbox."""
    from fastpop.store.index import IN_LOOP_MOST, Entry, encode

    srv = _server(base)
    try:
        user = srv.add_user([message("mine")])
        srv.start()
        assert raw_login(srv.port, user).cmd("QUIT").startswith(b"+OK")  # indexed, and in the worker's cache
        cur = user.maildir / "cur"
        then = time.time_ns() - 3600 * 10**9  # settled: trusted as the index's cur/ stamp
        os.utime(cur, ns=(then, then))
        count = 200_000
        entries = [Entry(f"{1600000000 + i}.M{i}P1.host:2,", 100, 100, 1, f"u{i}") for i in range(count)]
        planted = encode(entries, cur.stat().st_mtime_ns, 0)
        assert len(planted) > 8 * IN_LOOP_MOST
        (user.maildir / "fastpop.index").write_bytes(planted)
        before = event_loop_reads(srv)
        r = raw_login(srv.port, user, timeout=60)
        reply = r.cmd("STAT")
        assert r.cmd("QUIT").startswith(b"+OK")
        read_in_loop = event_loop_reads(srv) - before
        # the user's own index, served to the user alone (a self-inflicted listing, as documented)
        assert reply.startswith(b"+OK %d " % count), reply
        assert read_in_loop < IN_LOOP_MOST, f"the event loop read {read_in_loop} octets at the login"
        _no_traceback(srv)
    finally:
        srv.stop()


def test_nul_search_of_a_large_message_is_outside_the_event_loop(base):
    """With the outlook-no-nuls workaround, RETR of a large message that could
    go by sendfile first looks for a NUL in it: that read the whole file,
    as large as its user makes it, in the event loop before the first octet
    went out.  It is now read in a thread: the event loop reads only what
    sendfile pushes into the socket of a client that does not read."""
    data = message("big", size=64 * 1024 * 1024)
    data = data[: data.rindex(b"\r\n") + 2]  # CRLF to the end: stored as sent, so sendfile would do
    size = len(data)
    srv = _server(base, "--client-workarounds", "outlook-no-nuls")
    try:
        user = srv.add_user([data])
        srv.start()
        assert raw_login(srv.port, user, timeout=60).cmd("QUIT").startswith(b"+OK")  # measured
        r = raw_login(srv.port, user, timeout=60)
        before = event_loop_reads(srv)
        assert r.cmd("RETR 1") == b"+OK %d octets\r\n" % size
        deadline = time.monotonic() + 10
        read_in_loop = event_loop_reads(srv) - before
        while read_in_loop < 64 * 1024 and time.monotonic() < deadline:  # until sendfile has filled the socket
            time.sleep(0.05)
            read_in_loop = event_loop_reads(srv) - before
        time.sleep(0.5)  # and a moment more: the socket stays full (nothing is read here)
        read_in_loop = event_loop_reads(srv) - before
        assert 0 < read_in_loop < size // 2, f"the event loop read {read_in_loop} octets of a {size}-octet message"
        r.close()
        _no_traceback(srv)
    finally:
        srv.stop()
