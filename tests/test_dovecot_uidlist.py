"""fastpop.store.dovecot_uidlist in process: Dovecot's file format (the
records real Dovecot writes are checked in tests/test_dovecot_side_by_side.py),
hostile files (garbage, links, huge, duplicate records), Dovecot's dotlock
(held, stale by age, stale by a dead pid) and assigning UIDs that keep a
UIDL already served."""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from fastpop.store import dovecot_keywords as dk
from fastpop.store import dovecot_uidlist as du
from fastpop.store import maildir, maildir_names

pytestmark = pytest.mark.unit


@pytest.fixture
def box(tmp_path):
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def test_parse_dovecot_v3_and_the_pop3_uidl_field():
    u = du.parse(b"3 V1700000000 N12 G8d2c7a1b2c3d4e5f Xfoo\n"
                 b"1 :1700000001.M1.host\n"
                 b"10 W120 S118 :1700000002.M2.host,S=118\n"
                 b"11 P :1700000003.M3.host\n"
                 b"12 Pcourier-uidl-1 :1700000004.M4.host\n")
    assert (u.validity, u.next_uid) == (1700000000, 13)  # never below a record's UID + 1
    assert u.uidl("1700000001.M1.host") == f"{1:08x}{1700000000:08x}"
    assert u.uidl("1700000002.M2.host,S=118") == f"{10:08x}{1700000000:08x}"
    assert u.uidl("1700000003.M3.host") == "1700000003.M3.host"  # "P" alone: the base name
    assert u.uidl("1700000004.M4.host") == "courier-uidl-1"
    assert u.uidl("absent") is None
    # written back as read: header fields and record fields kept
    assert du.parse(u.encode()).encode() == u.encode()
    assert b"G8d2c7a1b2c3d4e5f Xfoo" in u.encode() and b"10 W120 S118 :" in u.encode()


def test_parse_version_1():
    u = du.parse(b"1 1234 3\n1 a.b.c:2,S\n2 d.e.f\n")
    assert u.validity == 1234 and u.uid("a.b.c") == 1 and u.uid("d.e.f") == 2


@pytest.mark.parametrize("data", [
    b"", b"\n", b"9 V1 N1\n", b"3 N5\n", b"3 V1\n", b"3 V0 N1\n", b"3 Vx N1\n", b"3 V99999999999 N1\n",
    b"3 V1 N3\n2 :a\n1 :b\n",  # not ascending
    b"3 V1 N3\n0 :a\n", b"3 V1 N3\nx :a\n", b"3 V1 N3\n1 a\n", b"3 V1 N3\n1 :\n",
    b"3 V1 N3\n1 :../../etc/passwd\n", b"3 V1 N3\n1 :.hidden\n", b"3 V1 N3\n1 w1 :a\n",
    b"3 V1 N3\n1 :a\0b\n", b"3 V1 N5\n4294967295 :a\n", b"3 V1 N3\n1 :" + b"a" * 300 + b"\n",
])
def test_garbage_is_refused_cleanly(data):
    with pytest.raises(du.UidlistCorrupt):
        du.parse(data)


def test_random_garbage_only_ever_raises_uidlist_corrupt():
    rng = random.Random(20)
    good = b"3 V1700000000 N9 Gabc\n1 :a.b\n2 P :c.d\n3 W5 :e.f\n"
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            u = du.parse(bytes(data))
        except du.UidlistCorrupt:
            continue
        for base in u.records:  # whatever parses gives RFC 1939 UIDLs
            uidl = u.uidl(base)
            assert uidl is not None and 0 < len(uidl) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uidl)


def test_a_p_field_no_rfc_1939_uidl_falls_back_to_the_default():
    u = du.parse(b"3 V7 N3\n1 P" + b"x" * 80 + b" :a\n")
    assert u.uidl("a") == f"{1:08x}{7:08x}"


def test_many_duplicate_records_take_linear_time():
    # a duplicate moves its record (Dovecot keeps the later one); a hostile file of
    # duplicates must not cost quadratic time in a worker thread
    lines = b"".join(b"%d :same\n" % i for i in range(1, 200_001))
    start = time.monotonic()
    u = du.parse(b"3 V1 N1\n" + lines)
    assert time.monotonic() - start < 5
    assert u.uid("same") == 200_000 and len(u.records) == 1


def test_read_refuses_links_fifos_and_huge_files(box, tmp_path, monkeypatch):
    path, fd = box
    secret = tmp_path / "secret"
    secret.write_bytes(b"3 V1 N2\n1 :a\n")
    os.symlink(secret, path / du.UIDLIST)
    with pytest.raises(du.UidlistCorrupt):
        du.read(fd)
    os.unlink(path / du.UIDLIST)
    os.mkfifo(path / du.UIDLIST)
    with pytest.raises(du.UidlistCorrupt):  # no hang on a FIFO
        du.read(fd)
    os.unlink(path / du.UIDLIST)
    monkeypatch.setattr(du, "MAX_BYTES", 100)
    (path / du.UIDLIST).write_bytes(b"3 V1 N2\n" + b"1 :a\n" * 30)
    with pytest.raises(du.UidlistCorrupt):
        du.read(fd)
    # fastpop's reading path (uidl = "maildir") logs and ignores it
    assert maildir.read_dovecot_uidlist(fd) == (0, {})
    os.unlink(path / du.UIDLIST)
    assert du.read(fd) is None


def test_assign_numbers_in_order_and_keeps_served_uidls(box):
    path, fd = box
    u = du.assign(fd, ["1.a", "2.b"], {})
    assert [u.uid("1.a"), u.uid("2.b")] == [1, 2] and u.next_uid == 3
    text = (path / du.UIDLIST).read_text()
    assert text.startswith(f"3 V{u.validity} N3 G") and text.endswith("1 :1.a\n2 :2.b\n")
    assert not (path / du.LOCK).exists()
    assert sorted(os.listdir(path)) == ["cur", du.UIDLIST, "new", "tmp"]  # no temporary left
    # a message already served under its name, and one numbered by Dovecot but served under its name
    u = du.assign(fd, ["1.a", "2.b", "3.c"], {"3.c": "3.c", "2.b": "name-of-2"})
    assert u.uidl("3.c") == "3.c" and u.uid("3.c") == 3
    assert u.uidl("2.b") == "name-of-2" and u.uid("2.b") == 2
    assert du.read(fd).encode() == u.encode()
    assert "3 P3.c :3.c" in (path / du.UIDLIST).read_text()
    # nothing to do: no lock, no write
    ino = os.stat(path / du.UIDLIST).st_ino
    du.assign(fd, ["1.a", "3.c"], {"3.c": "3.c"})
    assert os.stat(path / du.UIDLIST).st_ino == ino


def test_a_corrupt_list_is_never_rewritten(box):
    path, fd = box
    (path / du.UIDLIST).write_bytes(b"3 V1 N2\ngarbage\n")
    with pytest.raises(du.UidlistCorrupt):
        du.assign(fd, ["1.a"], {})
    assert (path / du.UIDLIST).read_bytes() == b"3 V1 N2\ngarbage\n"
    assert not (path / du.LOCK).exists()
    assert maildir.is_permanent(du.UidlistCorrupt("x"))  # -ERR [SYS/PERM]


def test_a_held_lock_is_waited_for_then_refused(box):
    path, fd = box
    (path / du.LOCK).write_text(f"{os.getpid()}:{socket.gethostname()}")  # a live holder
    start = time.monotonic()
    with pytest.raises(du.UidlistLocked):
        du.lock(fd, wait=0.3)
    assert 0.3 <= time.monotonic() - start < 3
    assert (path / du.LOCK).exists()  # not taken from a live holder


def test_a_stale_lock_is_taken_over(box):
    path, fd = box
    lock = path / du.LOCK
    lock.write_text("1:another-host")  # not judged by pid: by age
    old = time.time() - du.STALE_SECONDS - 5
    os.utime(lock, (old, old))
    held = du.lock(fd, wait=0.2)
    assert lock.read_text() == f"{os.getpid()}:{socket.gethostname()}"
    du.unlock(fd, held)
    assert not lock.exists()
    # a lock of a process of this host that is gone, a few seconds old (Dovecot's pid check)
    dead = 2 ** 22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    lock.write_text(f"{dead}:{socket.gethostname()}")
    recent = time.time() - du.PID_CHECK_AFTER - 1
    os.utime(lock, (recent, recent))
    du.unlock(fd, du.lock(fd, wait=0.2))


def test_unlock_leaves_a_lock_that_is_no_longer_ours(box):
    path, fd = box
    held = du.lock(fd)
    os.unlink(path / du.LOCK)  # taken over as stale by another process...
    (path / du.LOCK).write_text("999:elsewhere")  # ...which holds it now
    du.unlock(fd, held)
    assert (path / du.LOCK).read_text() == "999:elsewhere"


@pytest.mark.parametrize("name, want", [
    ("1.M1.host", "1.M1.host:2,S"),
    ("1.M1.host:2,", "1.M1.host:2,S"),
    ("1.M1.host,S=10:2,FR", "1.M1.host,S=10:2,FRS"),
    ("1.M1.host:2,Tab", "1.M1.host:2,STab"),  # ASCII order: capitals, then Dovecot's keyword letters
    ("1.M1.host:2,S", None),
    ("1.M1.host:2,FS", None),
    ("1.M1.host:1,experimental", None),
])
def test_with_flag_merges_in_ascii_order(name, want):
    assert maildir_names.with_flag(name, "S") == want


# ---------------------------------------------------------------- dovecot-keywords ([pop3] deleted_flag)

def test_keywords_letter_assigned_under_the_lock_and_kept(box):
    path, fd = box
    (path / dk.KEYWORDS).write_text("0 Junk\n2 NonJunk\n")
    assert dk.letter_for(fd, "$POP3Deleted") == "b"  # the lowest free index
    assert (path / dk.KEYWORDS).read_text() == "0 Junk\n1 $POP3Deleted\n2 NonJunk\n"
    assert not (path / dk.LOCK).exists()
    assert dk.letter_for(fd, "$POP3Deleted") == "b" and dk.letter_for(fd, "NonJunk") == "c"


def test_keywords_hostile_files(box, tmp_path):
    path, fd = box
    (path / dk.KEYWORDS).write_bytes(b"x Junk\n99 Far\n0\n1 \n3 Dup\n4 Dup\n\xff\xfe\n5 Ok\n")
    assert dk.read(fd) == {"Dup": 3, "Ok": 5}  # what Dovecot would keep
    (path / dk.KEYWORDS).unlink()
    (tmp_path / "other").write_text("0 Secret\n")
    os.symlink(tmp_path / "other", path / dk.KEYWORDS)
    with pytest.raises(OSError):
        dk.read(fd)
    os.unlink(path / dk.KEYWORDS)
    (path / dk.KEYWORDS).write_bytes(b"0 k\n" * 20000)
    with pytest.raises(OSError):
        dk.read(fd)
    (path / dk.KEYWORDS).write_text("".join(f"{i} k{i}\n" for i in range(26)))
    assert dk.letter_for(fd, "$POP3Deleted") is None  # all 26 letters taken: nothing rewritten
    assert not (path / dk.LOCK).exists()


def test_keywords_lock_held_then_stale(box):
    path, fd = box
    (path / dk.LOCK).write_text("")
    with pytest.raises(dk.KeywordsLocked):
        dk.letter_for(fd, "$POP3Deleted", wait=0.2)
    old = time.time() - dk.STALE_SECONDS - 5
    os.utime(path / dk.LOCK, (old, old))
    assert dk.letter_for(fd, "$POP3Deleted", wait=0.2) == "a"


def test_has_flag_reads_only_the_info():
    assert maildir_names.has_flag("1.a,S=5:2,Sb", "b")
    assert not maildir_names.has_flag("1.b:2,S", "b") and not maildir_names.has_flag("1.bcd", "b")
    assert not maildir_names.has_flag("1.x:1,b", "b")


def test_a_record_being_appended_is_not_read_yet():
    # Dovecot appends records in place under its lock: a reader without the lock may
    # see half a line; as Dovecot's reader, fastpop reads only complete lines
    u = du.parse(b"3 V1 N3\n1 :a\n2 :b")
    assert list(u.records) == ["a"] and u.next_uid == 3
    u = du.parse(b"3 V1 N3\n1 :a\n2 W1")
    assert list(u.records) == ["a"]
    with pytest.raises(du.UidlistCorrupt):
        du.parse(b"3 V1 N")  # not even a header
