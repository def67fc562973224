"""The mailbox index (``fastpop.index`` in each Maildir), through real servers.

What a login answers (STAT, LIST, UIDL) must not depend on whether the index
exists, is fresh, stale or damaged; a warm login must not touch message files
or list cur/; a sync costs what changed; two processes and a racing delivery
agent must not break it; and UIDLs must survive a migration from Dovecot.

Expected answers are computed here from the bytes delivered, never from
fastpop's own code.  Times: cur/'s mtime is set in the past with os.utime
(``trusted()``) so the index is trusted without sleeping out
``maildir.MTIME_SETTLE_NS``.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import poplib
import pwd
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import PARSERS, ServerProcess, User, message, tracer_of

from fastpop.store import index as mindex

LARGE_INDEX = 64 * 1024  # large enough that the format's fixed parts do not dominate
INDEX = mindex.INDEX_FILE
HOUR_NS = 3600 * 10**9
_names = itertools.count(1)
_old_stamps = itertools.count(1)


# --------------------------------------------------------------------------- model of a mailbox


def pop3_octets(data: bytes) -> int:
    """What RETR sends before dot-stuffing: bare LFs become CRLF, a final CRLF is added."""
    if not data:
        return 0
    bare_lf = data.count(b"\n") - data.count(b"\r\n")
    return len(data) + bare_lf + (0 if data.endswith(b"\n") else 2)


def crlf_size(data: bytes) -> int:
    """W= as Maildir writers compute it: CRLF line ends, no final newline added."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


@dataclass
class Msg:
    unique: str
    size: int  # the POP3 size fastpop must report
    data: bytes


@dataclass
class Box:
    """A user and what its mailbox must look like, in message-number order."""

    user: User
    msgs: list[Msg] = field(default_factory=list)

    @property
    def maildir(self) -> Path:
        return self.user.maildir

    @property
    def cur(self) -> Path:
        return self.user.maildir / "cur"

    @property
    def index_path(self) -> Path:
        return self.user.maildir / INDEX

    def put(self, data: bytes, *, w: int | None = None, sizes: bool = False, where: str = "new",
            prefix: int | None = None) -> Path:
        """Deliver like an MTA: write in tmp/, rename into new/ (or cur/ with ':2,').

        ``sizes``: put S= and W= (the honest CRLF size) in the name; ``w``: put this W=.
        """
        n = next(_names)
        unique = f"{prefix if prefix is not None else 1800000000 + n}.M{n}P{os.getpid()}.idx"
        name = unique
        size = pop3_octets(data)
        if sizes or w is not None:
            wv = crlf_size(data) if w is None else w
            name += f",S={len(data)},W={wv}"
            size = wv + (2 if wv > 0 and data and not data.endswith(b"\n") else 0)
        if where == "cur":
            name += ":2,"
        tmp = self.maildir / "tmp" / name
        tmp.write_bytes(data)
        target = self.maildir / where / name
        os.rename(tmp, target)
        self.msgs.append(Msg(unique, size, data))
        return target

    def expected(self) -> View:
        return View(
            (len(self.msgs), sum(m.size for m in self.msgs)),
            [(i + 1, m.size) for i, m in enumerate(self.msgs)],
            [(i + 1, m.unique) for i, m in enumerate(self.msgs)],
        )

    def cur_file(self, unique: str) -> Path:
        found = [p for p in self.cur.iterdir() if p.name.split(",")[0].split(":")[0] == unique]
        assert len(found) == 1, (unique, found)
        return found[0]


@dataclass
class View:
    stat: tuple[int, int]
    sizes: list[tuple[int, int]]
    uidls: list[tuple[int, str]]


def new_box(server: ServerProcess, messages=(), **kw) -> Box:
    box = Box(server.add_user())
    for data in messages:
        box.put(data, **kw)
    return box


login = User.login_when_free  # poplib login, retrying while a just-ended session holds the lock


def read_view(p: poplib.POP3) -> View:
    stat = p.stat()
    sizes = [tuple(map(int, line.split())) for line in p.list()[1]]
    uidls = []
    for line in p.uidl()[1]:
        n, u = line.split()
        uidls.append((int(n), u.decode("ascii")))
    return View(stat, sizes, uidls)


def session(user: User, server: ServerProcess | None = None) -> View:
    """One login: STAT, LIST, UIDL, QUIT."""
    if server is not None and server is not user.server:
        user = User(server, user.name, user.password, user.maildir)
    p = login(user)
    try:
        return read_view(p)
    finally:
        p.quit()


def load_index(box: Box) -> mindex.MailboxIndex:
    """The index file, validated here independently of the server's cache."""
    data = box.index_path.read_bytes()
    idx = mindex.MailboxIndex(data)
    idx.verify()
    return idx


def trusted(box: Box, server: ServerProcess | None = None) -> int:
    """Give cur/ an old mtime and log in once, so the index records it and is trusted."""
    stamp = time.time_ns() - HOUR_NS - next(_old_stamps) * 10**9
    os.utime(box.cur, ns=(stamp, stamp))
    assert session(box.user, server) == box.expected()
    idx = load_index(box)
    assert idx.cur_mtime_ns == stamp, "the index did not record cur/'s settled mtime"
    return stamp


def retr_octets(p: poplib.POP3, n: int) -> int:
    _, lines, octets = p.retr(n)
    assert octets == sum(len(line) + 2 for line in lines)
    return octets


class LogMark:
    """The part of a server's log written after this point."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.at = len(server.log())

    def text(self) -> str:
        return self.server.log()[self.at :]


def with_crc(buf: bytes | bytearray) -> bytes:
    """Recompute the checksum, so only the structural checks can catch a change."""
    b = bytearray(buf)
    struct.pack_into("<I", b, mindex.CHECKSUM_AT, 0)
    struct.pack_into("<I", b, mindex.CHECKSUM_AT, zlib.crc32(b))
    return bytes(b)


def replace_index(box: Box, data: bytes, in_place: bool = False) -> None:
    """Put ``data`` as the index: a new file renamed over it, or rewritten in place.

    The server revalidates when the file's (inode, mtime, size) change; an
    in-place write could land in the same mtime tick as the server's own
    write, so its mtime is then set explicitly to a value of its own.
    """
    path = box.index_path
    if in_place:
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
        stamp = time.time_ns() - 2 * HOUR_NS - next(_old_stamps) * 10**9
        os.utime(path, ns=(stamp, stamp))
    else:
        tmp = path.with_name(INDEX + ".test-tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


# --------------------------------------------------------------------------- mixed content

DOT_BODY = b"From: a@example.com\r\nSubject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nend\r\n"
BARE_LF = b"From: a@example.com\nSubject: bare lf\n\nline one\nline two\n"
NO_FINAL_NEWLINE = b"From: a@example.com\r\nSubject: no final newline\r\n\r\nlast line without CRLF"
MIXED_ENDINGS = b"From: a@example.com\r\nSubject: mixed\n\r\nbody\nmore\r\nlast"


def mixed_box(server: ServerProcess) -> Box:
    box = new_box(server)
    box.put(message("plain"))
    box.put(message("with sizes", "x\r\n" * 30), sizes=True)
    box.put(BARE_LF)
    box.put(BARE_LF, sizes=True)
    box.put(NO_FINAL_NEWLINE)
    box.put(NO_FINAL_NEWLINE, sizes=True)
    box.put(MIXED_ENDINGS)
    box.put(DOT_BODY, sizes=True)
    box.put(b"")  # empty message
    box.put(message("larger", size=5000), sizes=True)
    box.put(message("in cur already"), where="cur")
    return box


# =========================================================================== the index and STAT/LIST/UIDL


def test_index_appears_at_first_login_and_its_header_matches_stat(server):
    box = mixed_box(server)
    assert not box.index_path.exists()
    view = session(box.user)
    assert view == box.expected()
    assert box.index_path.exists(), "no index after the first login"
    idx = load_index(box)
    assert (idx.count, idx.total_size) == view.stat
    assert [(i + 1, idx.size(i)) for i in range(idx.count)] == view.sizes
    assert [(i + 1, idx.uidl(i)) for i in range(idx.count)] == view.uidls
    # every record names a file that exists in cur/
    assert sorted(idx.name(i) for i in range(idx.count)) == sorted(p.name for p in box.cur.iterdir())
    assert not list((box.maildir / "new").iterdir())


def test_answers_identical_with_and_without_the_index(server):
    box = mixed_box(server)
    mark = LogMark(server)
    first = session(box.user)
    assert first == box.expected()
    for _ in range(2):
        box.index_path.unlink()
        assert session(box.user) == first  # same numbers, same sizes, same UIDLs
        assert box.index_path.exists()
    trusted(box)  # a trusted (warm) index gives the same answers too
    assert session(box.user) == first
    box.index_path.unlink()
    assert session(box.user) == first
    log = mark.text()
    assert "rebuilding" not in log, "a missing index is not damage:\n" + log
    assert "Traceback" not in log, log


def test_list_equals_retr_octets_with_and_without_index(server):
    box = mixed_box(server)
    for _attempt in range(2):
        p = login(box.user)
        try:
            view = read_view(p)
            assert view == box.expected()
            for n, size in view.sizes:
                assert retr_octets(p, n) == size, f"message {n}: LIST {size} != RETR"
        finally:
            p.quit()
        box.index_path.unlink()


def test_large_mailbox_index(server):
    """A large index (900 messages, over 64 KiB): same answers, and the same
    after the index is deleted."""
    box = new_box(server)
    for i in range(900):
        box.put(message(f"m{i}", "y" * (i % 50) + "\r\n"), sizes=bool(i % 2), where="cur")
    first = session(box.user)
    assert first == box.expected()
    assert box.index_path.stat().st_size > LARGE_INDEX
    trusted(box)
    assert session(box.user) == first
    box.index_path.unlink()
    assert session(box.user) == first


def test_uidls_are_stable_across_rebuilds_and_deletions(server):
    box = new_box(server, [message(f"s{i}") for i in range(6)])
    before = session(box.user)
    by_unique = dict((u, s) for (_, u), (_, s) in zip(before.uidls, before.sizes, strict=True))
    p = login(box.user)
    p.dele(2)
    p.dele(5)
    p.quit()
    del box.msgs[4], box.msgs[1]
    box.index_path.unlink()
    after = session(box.user)
    assert after == box.expected()
    for (_, u), (_, s) in zip(after.uidls, after.sizes, strict=True):
        assert by_unique[u] == s


# =========================================================================== warm logins read nothing


class Trace:
    lines: list[str]

    def opened(self, directory: Path) -> list[str]:
        """Paths under ``directory`` (or itself) that were opened, as the kernel
        resolved them (strace -y): by path or relative to a directory descriptor."""
        d = str(directory)
        out = []
        for line in self.lines:
            m = re.search(r"\bopen(?:at2?)?\(.*= \d+<([^>]*)>$", line)
            if m and (m.group(1) == d or m.group(1).startswith(d + "/")):
                out.append(m.group(1))
        return out

    def listed(self, directory: Path) -> bool:
        """Whether ``directory`` was read with getdents64."""
        return any(m.group(1) == str(directory)
                   for m in (re.search(r"\bgetdents64\(\d+<([^>]*)>,", line) for line in self.lines) if m)


@contextlib.contextmanager
def strace(pid: int, out: Path):
    """strace -f of the file-system calls a login may make, attached to a running process."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: cannot observe the server's system calls")
    proc = subprocess.Popen(
        ["strace", "-f", "-y", "-s", "4096", "-e", "trace=openat,openat2,getdents64,newfstatat,statx,stat", "-o",
         str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while True:
        tasks = os.listdir(f"/proc/{pid}/task")
        if tasks and all(tracer_of(pid, t) == proc.pid for t in tasks):
            break
        if proc.poll() is not None:
            pytest.skip(f"strace cannot attach here: {proc.stderr.read().decode(errors='replace').strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.skip("strace did not attach within 10 s")
        time.sleep(0.005)
    trace = Trace()
    try:
        yield trace
    finally:
        proc.send_signal(signal.SIGINT)  # detaches from every thread, flushes the output
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        trace.lines = out.read_text(errors="replace").splitlines() if out.exists() else []


def test_warm_login_opens_no_message_file_and_does_not_list_cur(server, tmp_path):
    box = new_box(server, [message(f"w{i}") for i in range(8)])
    box.put(message("sized", "z\r\n" * 10), sizes=True)
    box.put(message("in cur"), where="cur")
    pid = server.proc.pid
    session(box.user)
    trusted(box)

    # warm: index trusted, new/ empty
    with strace(pid, tmp_path / "warm.trace") as warm:
        assert session(box.user) == box.expected()
    assert any(INDEX in line for line in warm.lines), "strace saw nothing of the login (index not opened?)"
    assert warm.opened(box.cur) == [], "a warm login opened cur/ or message files"
    assert not warm.listed(box.cur)

    # control: cur/ changed (mtime), nothing new: cur/ is listed, still no message file opened
    stamp = time.time_ns() - 3 * HOUR_NS
    os.utime(box.cur, ns=(stamp, stamp))
    with strace(pid, tmp_path / "rescan.trace") as rescan:
        assert session(box.user) == box.expected()
    assert rescan.listed(box.cur), "strace did not see cur/ being listed after its mtime changed"
    assert [p for p in rescan.opened(box.cur) if p != str(box.cur)] == []

    # one message delivered: only that one is opened (measured)
    trusted(box)
    new = box.put(message("newcomer", "n\r\n" * 7))
    with strace(pid, tmp_path / "new.trace") as added:
        view = session(box.user)
    assert view == box.expected()
    assert view.uidls[-1] == (len(box.msgs), box.msgs[-1].unique), "a new message is numbered last"
    opened = [p for p in added.opened(box.cur) if p != str(box.cur)]
    assert opened and all(os.path.basename(p).startswith(new.name) for p in opened), opened

    # one sized message delivered: only that one is opened (its size from W=, read for lines starting with ".")
    trusted(box)
    new = box.put(message("newcomer2", "m\r\n" * 7), sizes=True)
    with strace(pid, tmp_path / "new2.trace") as added:
        assert session(box.user) == box.expected()
    opened = [p for p in added.opened(box.cur) if p != str(box.cur)]
    assert opened and all(os.path.basename(p).startswith(new.name) for p in opened), opened

    # one removed, one renamed by another program: no message file opened
    trusted(box)
    gone = box.msgs.pop(3)
    box.cur_file(gone.unique).unlink()
    f = box.cur_file(box.msgs[0].unique)
    f.rename(f.with_name(f.name.split(":")[0] + ":2,RS"))
    with strace(pid, tmp_path / "gone.trace") as changed:
        assert session(box.user) == box.expected()
    assert changed.listed(box.cur)
    assert [p for p in changed.opened(box.cur) if p != str(box.cur)] == []


def test_warm_login_reports_sizes_of_files_it_did_not_read(server):
    """Empty every message file in place after the index is trusted (cur/'s mtime
    unchanged): a login that read them would see zero-byte messages."""
    box = new_box(server, [message(f"e{i}", "body\r\n" * (i + 1)) for i in range(5)] + [BARE_LF, NO_FINAL_NEWLINE])
    original = session(box.user)
    stamp = trusted(box)
    for path in box.cur.iterdir():
        with open(path, "r+b") as f:
            f.truncate(0)
    os.utime(box.cur, ns=(stamp, stamp))  # untouched by the truncation; made certain
    assert session(box.user) == original
    # cur/ changed but no message is new: known messages are not measured again
    stamp = time.time_ns() - 5 * HOUR_NS
    os.utime(box.cur, ns=(stamp, stamp))
    assert session(box.user) == original
    # control: without the index the files are read, and are now empty
    box.index_path.unlink()
    view = session(box.user)
    assert view.stat == (len(box.msgs), 0)
    assert [u for _, u in view.uidls] == [m.unique for m in box.msgs]


# =========================================================================== sync costs O(changes)


def test_sync_new_removed_renamed(server):
    box = new_box(server, [message(f"c{i}", "q\r\n" * i) for i in range(5)])
    box.put(NO_FINAL_NEWLINE, sizes=True)
    assert session(box.user) == box.expected()
    trusted(box)

    # delivered to new/ between sessions: appears, numbered last
    box.put(message("late arrival", "late\r\n"))
    view = session(box.user)
    assert view == box.expected()
    assert view.uidls[-1][1] == box.msgs[-1].unique
    assert not list((box.maildir / "new").iterdir())

    # removed from cur/ by another program: disappears, the others keep their UIDL
    trusted(box)
    gone = box.msgs.pop(2)
    box.cur_file(gone.unique).unlink()
    assert session(box.user) == box.expected()

    # renamed by a flag change: same UIDL, same size, RETR finds it
    trusted(box)
    renamed = box.msgs[-2]  # the one without a final newline, W= in its name
    f = box.cur_file(renamed.unique)
    f.rename(f.with_name(f.name.split(":")[0] + ":2,FS"))
    p = login(box.user)
    try:
        view = read_view(p)
        assert view == box.expected()
        n = [u for _, u in view.uidls].index(renamed.unique) + 1
        assert retr_octets(p, n) == renamed.size
    finally:
        p.quit()
    idx = load_index(box)
    assert any(idx.name(i).endswith(":2,FS") for i in range(idx.count)), "the index kept the old name"

    # all of it again from scratch: same answers
    box.index_path.unlink()
    assert session(box.user) == box.expected()


def test_change_in_the_same_mtime_tick_is_not_missed(server):
    """An index written while cur/'s mtime is recent must not trust it: a
    change by another program in the same timestamp tick leaves the mtime
    as it was (simulated by restoring it), and must still be seen."""
    box = new_box(server, [message(f"t{i}") for i in range(4)])
    assert session(box.user) == box.expected()  # moved new/ to cur/: cur/'s mtime is now
    m = box.cur.stat().st_mtime_ns
    gone = box.msgs.pop(1)
    box.cur_file(gone.unique).unlink()
    os.utime(box.cur, ns=(m, m))
    assert session(box.user) == box.expected()


def settle_new(box: Box) -> None:
    """Give new/ an old mtime, so a login that lists it empty keeps its stamp."""
    stamp = time.time_ns() - HOUR_NS - next(_old_stamps) * 10**9
    os.utime(box.maildir / "new", ns=(stamp, stamp))


def test_warm_login_checks_new_seen_empty_by_its_stamp(server, tmp_path):
    """new/ listed empty with a settled mtime is checked at the next login by
    one lstat (the old code opened and listed it at every login); a message
    delivered right after that login, within its second, is still seen."""
    box = new_box(server, [message(f"s{i}") for i in range(3)])
    session(box.user)
    trusted(box)
    settle_new(box)
    assert session(box.user) == box.expected()  # lists new/: empty, settled: the stamp is kept
    new = box.maildir / "new"
    with strace(server.proc.pid, tmp_path / "warm.trace") as warm:
        assert session(box.user) == box.expected()
    assert any(f'"{new}"' in line for line in warm.lines), "strace saw no check of new/"
    assert warm.opened(new) == [] and not warm.listed(new), "a warm login opened or listed new/"

    box.put(message("right after"))  # within the second of the last login
    with strace(server.proc.pid, tmp_path / "delivered.trace") as delivered:
        view = session(box.user)
    assert view == box.expected() and view.uidls[-1][1] == box.msgs[-1].unique
    assert delivered.listed(new)
    for i in range(3):  # new/ just emptied: its mtime is recent, so it is listed every time
        box.put(message(f"same second {i}"))
        assert session(box.user) == box.expected()


def test_delivery_into_new_that_keeps_its_mtime_is_seen(server):
    """A delivery in the same timestamp tick as the listing that kept the
    stamp (simulated: new/'s mtime put back as it was) changes new/'s ctime,
    which the stamp holds too: the message is seen."""
    box = new_box(server, [message("first")])
    session(box.user)
    trusted(box)
    settle_new(box)
    assert session(box.user) == box.expected()  # stamp kept
    new = box.maildir / "new"
    before = new.stat()
    box.put(message("in the same tick"))
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert new.stat().st_mtime_ns == before.st_mtime_ns
    assert session(box.user) == box.expected()


def test_new_replaced_by_a_link_after_its_stamp_was_kept(server):
    """new/ renamed away and a link to it put in its place (the same
    directory, so the same mtime behind the link): the lstat sees the link's
    own inode, the login refuses it as before ([SYS/PERM]), nothing behind
    it is served."""
    box = new_box(server, [message("mine")])
    session(box.user)
    trusted(box)
    settle_new(box)
    assert session(box.user) == box.expected()  # stamp kept
    elsewhere = box.maildir.parent / (box.user.name + "-elsewhere")
    os.rename(box.maildir / "new", elsewhere)
    (box.maildir / "new").symlink_to(elsewhere)
    p = box.user.server.connect()
    try:
        p.user(box.user.name)
        with pytest.raises(poplib.error_proto, match=r"SYS/PERM"):
            p.pass_(box.user.password)
    finally:
        p.close()


def test_dele_then_quit_updates_next_login(server):
    box = new_box(server, [message(f"d{i}") for i in range(4)])
    session(box.user)
    trusted(box)
    p = login(box.user)
    p.dele(1)
    p.dele(4)
    p.quit()
    del box.msgs[3], box.msgs[0]
    assert session(box.user) == box.expected()


def test_w_sizes_are_trusted_and_final_newline_adds_two(server):
    box = new_box(server)
    honest = [
        message("crlf", "ok\r\n"),
        NO_FINAL_NEWLINE,
        BARE_LF,
        b"no newline at all",
        b"ends with CR\r",
        b"",
        DOT_BODY,
    ]
    for data in honest:
        box.put(data, sizes=True)
    # a W= that is not the file's: trusted (proves sizes come from the name, not a read),
    # if a file of its size could have it (else it is counted: test_attack_crafted_files)
    liar = message("lying W", "abc\r\n")
    box.put(liar, w=len(liar) + 40)
    liar_short = b"short, no newline"
    box.put(liar_short, w=len(liar_short) + 10)
    p = login(box.user)
    try:
        view = read_view(p)
        assert view == box.expected()
        for n in range(1, len(honest) + 1):
            assert retr_octets(p, n) == view.sizes[n - 1][1], f"LIST != RETR for {honest[n - 1]!r}"
    finally:
        p.quit()
    assert view.sizes[len(honest)][1] == len(liar) + 40
    assert view.sizes[len(honest) + 1][1] == len(liar_short) + 12  # W= trusted, +2: no final newline in the file


def test_messages_without_sizes_are_measured_by_reading(server):
    contents = [BARE_LF, NO_FINAL_NEWLINE, MIXED_ENDINGS, b"x", b"\n", b"\r\n", b"a\rb\r\n", b"", DOT_BODY,
                message("big", size=70000).replace(b"\r\n", b"\n")]
    box = new_box(server, contents)
    p = login(box.user)
    try:
        view = read_view(p)
        assert view == box.expected()
        for n, size in view.sizes:
            assert retr_octets(p, n) == size, f"LIST != RETR for message {n}: {contents[n - 1][:40]!r}"
    finally:
        p.quit()


def test_new_message_with_older_name_numbered_last_and_kept_after_rebuild(server):
    """A message whose name sorts before the others (another host's clock, an
    import) arrives after them: numbered last while the index lives.  Deleting
    the index loses nothing: every message keeps its UIDL and size.  Message
    numbers are per session (RFC 1939), and a rebuilt index numbers messages
    in name order, so the order may change; clients key on UIDLs."""
    box = new_box(server, [message(f"o{i}") for i in range(3)])
    assert session(box.user) == box.expected()
    box.put(message("older name"), prefix=1600000000)
    with_index = session(box.user)
    assert with_index == box.expected()
    box.index_path.unlink()
    rebuilt = session(box.user)
    assert sorted(_by_uidl(rebuilt).items()) == sorted(_by_uidl(with_index).items())


def _by_uidl(view) -> dict:
    """{uidl: size} from what session() returns."""
    sizes = dict(view.sizes)
    return {u: sizes[n] for n, u in view.uidls}


# =========================================================================== damaged index files


def _flip(offset):
    def damage(good: bytes, idx: mindex.MailboxIndex) -> bytes:
        off = offset(idx, good) if callable(offset) else offset
        b = bytearray(good)
        b[off] ^= 0x5A
        return bytes(b)
    return damage


def _cut(length):
    def damage(good: bytes, idx: mindex.MailboxIndex) -> bytes:
        n = length(idx, good) if callable(length) else length
        assert n < len(good)
        return good[:n]
    return damage


def _header(field_off: int, fmt: str, delta=None, value=None):
    """Change one header field and recompute the checksum."""
    def damage(good: bytes, idx: mindex.MailboxIndex) -> bytes:
        b = bytearray(good)
        old = struct.unpack_from(fmt, b, field_off)[0]
        struct.pack_into(fmt, b, field_off, value if value is not None else old + delta)
        return with_crc(b)
    return damage


R = mindex.RECORD.size
DAMAGE = {
    # truncated
    "empty": _cut(0),
    "1-byte": _cut(1),
    "mid-magic": _cut(5),
    "magic-only": _cut(8),
    "mid-header": _cut(30),
    "header-minus-1": _cut(63),
    "header-only": _cut(64),
    "mid-first-record": _cut(64 + R // 2),
    "one-record": _cut(64 + R),
    "records-minus-1": _cut(lambda i, g: i.names_off - 1),
    "no-names": _cut(lambda i, g: i.names_off),
    "mid-names": _cut(lambda i, g: i.names_off + (len(g) - i.names_off) // 2),
    "last-byte-missing": _cut(lambda i, g: len(g) - 1),
    # one byte flipped
    "flip-magic": _flip(0),
    "flip-magic-end": _flip(7),
    "flip-version": _flip(8),
    "flip-count": _flip(12),
    "flip-total": _flip(16),
    "flip-cur-mtime": _flip(24),
    "flip-names-off": _flip(32),
    "flip-names-size": _flip(40),
    "flip-uidvalidity": _flip(48),
    "flip-flags": _flip(52),
    "flip-checksum": _flip(56),
    "flip-reserved": _flip(61),
    "flip-rec0-size": _flip(64),
    "flip-rec0-file-size": _flip(64 + 8),
    "flip-rec0-name-off": _flip(64 + 16),
    "flip-rec0-name-len": _flip(64 + 20),
    "flip-rec0-uidl-len": _flip(64 + 22),
    "flip-rec0-flags": _flip(64 + 24),
    "flip-rec0-reserved": _flip(64 + 29),
    "flip-rec2-size-high": _flip(64 + 2 * R + 3),
    "flip-last-record": _flip(lambda i, g: i.names_off - 5),
    "flip-first-name": _flip(lambda i, g: i.names_off),
    "flip-mid-names": _flip(lambda i, g: i.names_off + (len(g) - i.names_off) // 2),
    "flip-last-uidl-byte": _flip(lambda i, g: len(g) - 1),
    # foreign, other versions, inconsistent lengths (checksum recomputed: the structure must catch them)
    "foreign-magic": lambda g, i: with_crc(b"NOTFASTP" + g[8:]),
    "version-0": _header(8, "<I", value=0),
    "version-2": _header(8, "<I", value=2),
    "count-plus-1": _header(12, "<I", delta=1),
    "count-minus-1": _header(12, "<I", delta=-1),
    "names-off-plus-1": _header(32, "<Q", delta=1),
    "names-size-plus-1": _header(40, "<Q", delta=1),
    "names-size-minus-1": _header(40, "<Q", delta=-1),
    "trailing-byte": lambda g, i: with_crc(g + b"\0"),
    "trailing-record": lambda g, i: g + b"\0" * R,
    # not an index at all
    "zeros": lambda g, i: bytes(len(g)),
    "random": lambda g, i: random.Random(len(g)).randbytes(len(g)),
    "text": lambda g, i: b"hello, this is not an index\n",
}
IN_PLACE = {"empty", "mid-header", "mid-first-record", "mid-names", "flip-rec0-size", "flip-first-name", "count-plus-1"}


def _damage_cases():
    for name in DAMAGE:
        yield pytest.param(name, False, id=name)
        if name in IN_PLACE:
            yield pytest.param(name, True, id=name + "-in-place")


@pytest.mark.parametrize("damage, in_place", list(_damage_cases()))
def test_damaged_index_is_rebuilt_never_served(server, damage, in_place):
    box = new_box(server, [message(f"d{i}", "r\r\n" * i) for i in range(4)])
    box.put(NO_FINAL_NEWLINE, sizes=True)
    box.put(BARE_LF)
    good_view = session(box.user)
    assert good_view == box.expected()
    trusted(box)  # the damaged file would be served by the fast path if it passed validation
    good = box.index_path.read_bytes()
    bad = DAMAGE[damage](good, load_index(box))
    assert bad != good
    mark = LogMark(server)
    replace_index(box, bad, in_place)
    assert session(box.user) == good_view
    log = mark.text()
    assert "rebuilding" in log, f"no 'rebuilding' warning for a {damage} index:\n{log}"
    assert "Traceback" not in log, log
    # the damaged file was replaced by a valid one, which the next login uses quietly
    idx = load_index(box)
    assert (idx.count, idx.total_size) == good_view.stat
    mark = LogMark(server)
    assert session(box.user) == good_view
    assert "rebuilding" not in mark.text()


def test_deleted_index_is_rebuilt_without_warning(server):
    box = new_box(server, [message("a"), message("b")])
    view = session(box.user)
    trusted(box)
    mark = LogMark(server)
    box.index_path.unlink()
    assert session(box.user) == view
    assert box.index_path.exists()
    log = mark.text()
    assert "rebuilding" not in log and "Traceback" not in log, log


def _records(good: bytes):
    idx = mindex.MailboxIndex(good)
    return idx, [idx.record(i) for i in range(idx.count)]


def _set_record(good: bytes, i: int, **changes) -> bytes:
    idx, recs = _records(good)
    size, file_size, name_off, name_len, uidl_len, flags = recs[i]
    values = dict(size=size, file_size=file_size, name_off=name_off, name_len=name_len, uidl_len=uidl_len, flags=flags)
    values.update({k: (v(values) if callable(v) else v) for k, v in changes.items()})
    b = bytearray(good)
    mindex.RECORD.pack_into(b, 64 + i * R, values["size"], values["file_size"], values["name_off"],
                            values["name_len"], values["uidl_len"], values["flags"])
    return with_crc(b)


INCONSISTENT = {
    # a record whose name/UIDL runs past the name table, checksum valid
    "last-uidl-past-end": lambda g: _set_record(g, _records(g)[0].count - 1, uidl_len=lambda v: v["uidl_len"] + 40),
    "name-off-past-end": lambda g: _set_record(g, 0, name_off=len(g)),
    # the header's total disagrees with its records
    "total-size-off": lambda g: with_crc(g[:16] + struct.pack("<Q",
                                                              struct.unpack_from("<Q", g, 16)[0] + 1000) + g[24:]),
}


@pytest.fixture(params=list(PARSERS), ids=list(PARSERS))
def own_server(request, tmp_path):
    """A server of this test's own that may die; the test checks its log itself."""
    srv = ServerProcess(tmp_path, PARSERS[request.param])
    srv.start()
    yield srv
    if srv.proc is not None:
        if srv.proc.poll() is None:
            srv.stop()
        else:
            srv.log_file.close()
            srv.proc = None


@pytest.mark.parametrize("damage", list(INCONSISTENT))
def test_checksum_valid_but_inconsistent_index_is_not_served(own_server, damage):
    """Lengths that do not fit together, in a file whose checksum is right
    (a buggy or foreign writer, not bit rot): still an index to rebuild."""
    server = own_server
    box = new_box(server, [message(f"i{i}") for i in range(3)])
    good_view = session(box.user)
    trusted(box)
    mark = LogMark(server)
    replace_index(box, INCONSISTENT[damage](box.index_path.read_bytes()))
    p = login(box.user)
    try:
        view = read_view(p)
    except (poplib.error_proto, OSError, EOFError) as exc:
        view = exc  # the server dropped the session
    finally:
        with contextlib.suppress(Exception):
            p.quit()
    log = mark.text()
    assert "Traceback" not in log, log
    assert view == good_view
    assert "rebuilding" in log, log


@pytest.mark.parametrize("how", ["truncate", "flip-size"])
def test_large_index_damaged_in_place_during_a_session(own_server, how):
    """A large index rewritten in place by another program while a session
    that logged in with it is open: the server must survive (a mapped file
    truncated under it would raise SIGBUS), the session must not see the
    damage, and the next login must be right."""
    box = new_box(own_server)
    for i in range(900):
        box.put(message(f"L{i}"), where="cur")
    good_view = session(box.user)
    assert box.index_path.stat().st_size > LARGE_INDEX
    trusted(box)
    p = login(box.user)
    try:
        if how == "truncate":
            os.truncate(box.index_path, 100)  # like `: > fastpop.index` plus a little
        else:
            with open(box.index_path, "r+b") as f:
                f.seek(64)  # first record's size
                f.write(struct.pack("<Q", 123456789))
        try:
            view = read_view(p)
        except (poplib.error_proto, OSError, EOFError) as exc:
            view = exc
    finally:
        with contextlib.suppress(Exception):
            p.quit()
    time.sleep(0.1)
    rc = own_server.proc.poll()
    assert rc is None, f"the server died (exit status {rc}) on LIST after its index was changed in place"
    assert view == good_view, (
        f"the open session saw the change: {view if isinstance(view, Exception) else view.sizes[:2]}")
    assert session(box.user) == good_view
    assert "Traceback" not in own_server.log()


# =========================================================================== compiled and Python twins

INDEX_TWIN = "fastpop.store._index"
# impl is function-scoped but stateless: hypothesis may reuse it across examples
TWIN_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def impl(twin):
    """fastpop.store._index, then its pure-Python twin (conftest's ``twin``)."""
    return twin(INDEX_TWIN)


entries_st = st.lists(
    st.builds(
        mindex.Entry,
        # what an index may hold: one Maildir entry (not hidden), an RFC 1939 UIDL
        name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                     max_size=30).filter(lambda n: n[0] != "."),
        size=st.one_of(st.integers(0, 10**6), st.integers(0, (2**64 - 1) // 40)),  # the u64 total must fit
        file_size=st.integers(0, 2**64 - 1),
        flags=st.integers(0, 2**32 - 1),
        uidl=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70),
    ),
    max_size=40,
)

# anything a hostile index could hold: names that leave cur/, hidden ones, NUL, UIDLs with
# spaces, controls or too long
hostile_entries_st = st.lists(
    st.builds(
        mindex.Entry,
        name=st.one_of(
            st.sampled_from(["../../etc/passwd", "/etc/shadow", "a/b", ".", "..", ".hidden", "", "x\0y", "n" * 256]),
            st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
        ),
        size=st.integers(0, 10**6),
        file_size=st.integers(0, 10**6),
        flags=st.integers(0, 1),
        uidl=st.text(st.characters(max_codepoint=0x7F), max_size=80),
    ),
    min_size=1,
    max_size=6,
)


def _valid_entry(e: mindex.Entry) -> bool:
    name = os.fsencode(e.name)
    return (0 < len(name) <= 255 and name[:1] != b"." and b"/" not in name and b"\0" not in name
            and 0 < len(e.uidl) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in e.uidl))


@settings(TWIN_SETTINGS, max_examples=300)
@given(entries=hostile_entries_st)
def test_index_names_and_uidls_are_checked_by_both_twins(impl, entries):
    """A crafted index (the Maildir's owner can write it) is refused unless every name
    is one Maildir entry and every UIDL is one RFC 1939 allows, by each twin."""
    buf = mindex.encode(entries, 0, 0)
    idx = mindex.MailboxIndex(buf)
    want = "ok" if all(_valid_entry(e) for e in entries) else "ValueError"
    assert _outcome(impl.check_records, buf, idx.count, idx.names_off)[0] == want, entries
    if want == "ValueError":
        with pytest.raises(mindex.IndexCorrupt):
            idx.verify()


def _expected_lines(entries, deleted):
    lst = b"".join(b"%d %d\r\n" % (i + 1, e.size) for i, e in enumerate(entries) if not deleted[i])
    uidl = b"".join(b"%d %s\r\n" % (i + 1, e.uidl.encode()) for i, e in enumerate(entries) if not deleted[i])
    return lst, uidl


@settings(TWIN_SETTINGS, max_examples=120,
          suppress_health_check=[*TWIN_SETTINGS.suppress_health_check, HealthCheck.too_slow])
@given(entries=entries_st, data=st.data())
def test_twins_format_identically(impl, entries, data):
    buf = mindex.encode(entries, data.draw(st.integers(0, 2**63 - 1)), data.draw(st.integers(0, 2**32 - 1)))
    idx = mindex.MailboxIndex(buf)
    idx.verify()
    n = len(entries)
    extra = data.draw(st.integers(0, 3))
    deleted = bytearray(data.draw(st.lists(st.integers(0, 1), min_size=n + extra, max_size=n + extra)))
    want_list, want_uidl = _expected_lines(entries, deleted)
    assert impl.format_list(buf, n, deleted) == want_list
    assert impl.format_uidl(buf, n, idx.names_off, deleted) == want_uidl
    # the same through a memoryview and bytes deletion masks
    assert impl.format_list(memoryview(buf), n, bytes(deleted)) == want_list
    assert impl.format_uidl(memoryview(buf), n, idx.names_off, bytes(deleted)) == want_uidl
    assert idx.list_lines(deleted) == want_list
    assert idx.uidl_lines(deleted) == want_uidl


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except ValueError:
        return ("ValueError", None)
    except BaseException as exc:
        return (type(exc).__name__, str(exc))


@settings(max_examples=120, deadline=None)
@given(entries=entries_st.filter(bool), data=st.data())
def test_twins_reject_short_buffers_alike(twin_pair, entries, data):
    c_mod, py_mod = twin_pair(INDEX_TWIN)
    buf = mindex.encode(entries, 0, 0)
    idx = mindex.MailboxIndex(buf)
    n = len(entries)
    cut = data.draw(st.integers(0, len(buf) - 1))
    short = buf[:cut]
    deleted = bytearray(n)
    for fn in ("format_list", "format_uidl"):
        args = (short, n, deleted) if fn == "format_list" else (short, n, idx.names_off, deleted)
        c = _outcome(getattr(c_mod, fn), *args)
        py = _outcome(getattr(py_mod, fn), *args)
        assert c == py, (fn, cut, c, py)
        if cut < idx.names_off:
            assert c[0] == "ValueError", (fn, cut, c)


@settings(TWIN_SETTINGS, max_examples=120)
@given(entries=entries_st.filter(bool), data=st.data())
def test_twins_reject_short_buffers_and_masks(impl, entries, data):
    """A buffer cut short before the names, or a deletion mask shorter than the count:
    ValueError from each twin."""
    buf = mindex.encode(entries, 0, 0)
    idx = mindex.MailboxIndex(buf)
    n = len(entries)
    short = buf[:data.draw(st.integers(0, idx.names_off - 1))]
    with pytest.raises(ValueError):
        impl.format_list(short, n, bytearray(n))
    with pytest.raises(ValueError):
        impl.format_uidl(short, n, idx.names_off, bytearray(n))
    with pytest.raises(ValueError):
        impl.format_list(buf, n, bytearray(n - 1))
    with pytest.raises(ValueError):
        impl.format_uidl(buf, n, idx.names_off, bytearray(n - 1))


@pytest.mark.parametrize("count", [1, 1000, 2**32 - 1], ids=["1", "1000", "u32-max"])
def test_twins_raise_valueerror_for_counts_the_buffer_cannot_hold(impl, count):
    """A header count (u32) far beyond the buffer: ValueError, no allocation for it first."""
    buf = mindex.encode([], 0, 0)
    with pytest.raises(ValueError):
        impl.format_list(buf, count, b"")
    with pytest.raises(ValueError):
        impl.format_uidl(buf, count, 64, b"")


def test_twins_format_the_largest_sizes(impl):
    entries = [mindex.Entry("a", 2**64 - 1, 0, 0, "x" * 70), mindex.Entry("b", 0, 0, 0, "")]
    buf = mindex.encode(entries, 0, 0)
    assert impl.format_list(buf, 2, bytearray(2)) == b"1 18446744073709551615\r\n2 0\r\n"
    assert impl.format_uidl(buf, 2, 64 + 2 * R, bytearray(2)) == b"1 " + b"x" * 70 + b"\r\n2 \r\n"


def test_twins_on_a_mapped_buffer(impl, tmp_path):
    rnd = random.Random(7)
    entries = [mindex.Entry(f"{1700000000 + i}.M{i}P1.host,S={i}:2,", rnd.randrange(2**40), i, i & 1, f"u{i:06d}")
               for i in range(3000)]
    path = tmp_path / INDEX
    path.write_bytes(mindex.encode(entries, 5, 6))
    deleted = bytearray(rnd.randrange(2) for _ in entries)
    want_list, want_uidl = _expected_lines(entries, deleted)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        idx = mindex.MailboxIndex(m)
        idx.verify()
        assert impl.format_list(m, len(entries), deleted) == want_list
        assert impl.format_uidl(m, len(entries), idx.names_off, deleted) == want_uidl
        del idx


# =========================================================================== concurrency


def test_delivery_racing_index_builds(server):
    box = new_box(server, [message(f"pre{i}") for i in range(5)])
    rnd = random.Random(1)
    payloads = [message(f"race{i}", "p\r\n" * rnd.randrange(0, 40)) if i % 5 else BARE_LF + b"n%d\n" % i
                for i in range(200)]
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            for i, data in enumerate(payloads):
                box.put(data, sizes=bool(i % 3 == 0))
                time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=deliver)
    t.start()
    sessions = last = 0
    deadline = time.monotonic() + 30
    try:
        while t.is_alive() and time.monotonic() < deadline:
            view = session(box.user)
            sessions += 1
            count, total = view.stat
            assert count >= last, "a message disappeared"
            last = count
            assert len(view.sizes) == len(view.uidls) == count
            assert sum(s for _, s in view.sizes) == total
            uidls = [u for _, u in view.uidls]
            assert len(set(uidls)) == count, "a message listed twice"
            if sessions % 7 == 0:
                stamp = time.time_ns() - HOUR_NS - sessions * 10**6
                os.utime(box.cur, ns=(stamp, stamp))  # let some indexes be trusted mid-race
    finally:
        t.join(30)
    assert not errors, errors
    assert sessions >= 5
    final = session(box.user)
    assert final.stat[0] == 205
    want = {m.unique: m.size for m in box.msgs}
    got = [(u, s) for (_, u), (_, s) in zip(final.uidls, final.sizes, strict=True)]
    assert sorted(u for u, _ in got) == sorted(want), "messages missing or listed twice"
    assert all(want[u] == s for u, s in got), [(u, s, want[u]) for u, s in got if want[u] != s]
    assert final.stat[1] == sum(want.values())
    assert final == box.expected()  # names carry the delivery order
    idx = load_index(box)
    assert idx.count == 205


def test_two_processes_share_one_mail_root(fresh_server, tmp_path):
    a = fresh_server
    a.start()
    b = ServerProcess(tmp_path / "second", "python" if a.parser == "cython" else "cython")
    b.passwd, b.mail = a.passwd, a.mail
    b.start()
    try:
        box = new_box(a, [message(f"t{i}", "b\r\n" * i) for i in range(6)])
        box.put(NO_FINAL_NEWLINE, sizes=True)
        rnd = random.Random(3)
        for step in range(24):
            srv = (a, b)[step % 2]
            if step % 3 == 0:
                box.put(message(f"step{step}", "s\r\n" * step), sizes=bool(step % 2))
            if step % 5 == 4 and box.msgs:
                f = box.cur_file(rnd.choice(box.msgs).unique)
                f.rename(f.with_name(f.name.split(":")[0] + ":2,S"))
            if step % 4 == 2:
                stamp = time.time_ns() - HOUR_NS - step * 10**9
                os.utime(box.cur, ns=(stamp, stamp))
            if step == 13:
                box.index_path.unlink()
            p = login(User(srv, box.user.name, box.user.password, box.maildir))
            try:
                view = read_view(p)
                assert view == box.expected(), f"step {step} on {srv.parser}"
                if step % 4 == 3 and len(box.msgs) > 1:
                    n = rnd.randrange(1, len(box.msgs) + 1)
                    p.dele(n)
                    del box.msgs[n - 1]
            finally:
                p.quit()
            idx = load_index(box)  # valid whichever process wrote it
            assert (idx.count, idx.total_size) == view.stat
        for srv in (a, b):
            assert session(box.user, srv) == box.expected()
    finally:
        rc = b.stop()
    assert rc == 0
    for srv in (a, b):
        log = srv.log()
        assert "rebuilding" not in log, "one process rejected the other's index:\n" + log
        assert "Traceback" not in log, log


# =========================================================================== Dovecot migration

DOVECOT_CONF = """\
base_dir = {run}
state_dir = {state}
log_path = {log}
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{mail}/%u
mail_uid = vmail
mail_gid = vmail
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home={mail}/%u
}}
auth_cache_size = 10M
service pop3-login {{
  inet_listener pop3 {{
    port = {port}
  }}
  service_count = 0
}}
service pop3 {{
  service_count = 0
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)


def test_dovecot_migration_keeps_uidls():
    if shutil.which("dovecot") is None:
        pytest.skip("dovecot is not installed: cannot produce a real dovecot-uidlist")
    try:
        vmail = pwd.getpwnam("vmail")
    except KeyError:
        pytest.skip("no vmail user for Dovecot's mail processes (useradd -r -M vmail)")
    if os.geteuid() != 0:
        pytest.skip("Dovecot is run here as root (it switches to vmail)")
    root = Path(tempfile.mkdtemp(prefix="fastpop-dovecot-", dir="/tmp"))
    dovecot = None
    servers: list[ServerProcess] = []
    try:
        os.chmod(root, 0o755)  # vmail must reach the Maildirs
        fp = ServerProcess(root, "cython")  # makes root/mail and root/passwd
        box = Box(User(fp, "migrant", "secret", fp.mail / "migrant"))
        fp.passwd.write_text("migrant:{PLAIN}secret\n")  # read by both servers
        for sub in ("cur", "new", "tmp"):
            (box.maildir / sub).mkdir(parents=True)
        for i in range(14):  # UIDs past 9, so hex digits a-f appear
            box.put(message(f"dovecot {i}", "line\r\n" * (i + 1)), sizes=(i % 3 == 0), where="cur" if i < 4 else "new")
        os.chmod(fp.mail, 0o755)
        _chown_tree(fp.mail, vmail.pw_uid, vmail.pw_gid)

        conf_dir = root / "dovecot"
        conf_dir.mkdir(mode=0o755)
        port = _free_port()
        (conf_dir / "dovecot.conf").write_text(DOVECOT_CONF.format(
            run=conf_dir / "run", state=conf_dir / "state", log=conf_dir / "dovecot.log",
            mail=fp.mail, passwd=fp.passwd, port=port))
        dovecot = subprocess.Popen(["dovecot", "-F", "-c", str(conf_dir / "dovecot.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                dv = poplib.POP3("127.0.0.1", port, timeout=10)
                break
            except OSError:
                if dovecot.poll() is not None or time.monotonic() > deadline:
                    log = (conf_dir / "dovecot.log").read_text() if (conf_dir / "dovecot.log").exists() else ""
                    pytest.fail(f"Dovecot did not start (rc={dovecot.poll()}): {dovecot.stderr.read()!r}\n{log}")
                time.sleep(0.05)
        assert dv.getwelcome().startswith(b"+OK")
        dv.user("migrant")
        dv.pass_("secret")
        dovecot_view = read_view(dv)
        dv.retr(1)
        dv.retr(6)  # Dovecot marks them \Seen at QUIT: renamed to ':2,S'
        dv.quit()
        dv = poplib.POP3("127.0.0.1", port, timeout=10)
        dv.user("migrant")
        dv.pass_("secret")
        assert read_view(dv) == dovecot_view
        dv.quit()
        dovecot.send_signal(signal.SIGTERM)
        dovecot.wait(15)
        dovecot.stderr.close()
        dovecot = None

        uidlist = (box.maildir / "dovecot-uidlist").read_text()
        validity = int(re.search(r"^3 .*\bV(\d+)", uidlist).group(1))
        assert any(p.name.endswith(":2,S") for p in box.cur.iterdir()), "Dovecot did not set flags"
        assert dovecot_view.stat[0] == 14
        assert [u for _, u in dovecot_view.uidls] == [f"{i:08x}{validity:08x}" for i in range(1, 15)]

        for parser in ("cython", "python"):
            srv = ServerProcess(root / f"fastpop-{parser}", parser)
            srv.passwd, srv.mail = fp.passwd, fp.mail
            srv.start()
            servers.append(srv)
            with contextlib.suppress(FileNotFoundError):
                box.index_path.unlink()
            view = session(box.user, srv)
            assert view.uidls == dovecot_view.uidls
            assert view == dovecot_view  # sizes too: CRLF messages with a final newline
            assert load_index(box).uidvalidity == validity
            assert session(box.user, srv) == dovecot_view

        # a message delivered after the migration: a UIDL of its own; the others keep Dovecot's
        srv = servers[0]
        box.msgs = [Msg(u, s, b"") for (_, u), (_, s) in zip(dovecot_view.uidls, dovecot_view.sizes, strict=True)]
        box.put(message("after dovecot"))
        # delivered as the mail user, as an MDA does (served as root, fastpop serves only
        # the files of the Maildir's owner: a root-owned file there could be a hard link)
        _chown_tree(fp.mail, vmail.pw_uid, vmail.pw_gid)
        view = session(box.user, srv)
        assert view == box.expected()
        assert view.uidls[:14] == dovecot_view.uidls
        new_uidl = view.uidls[14][1]
        assert new_uidl == box.msgs[-1].unique
        assert not re.fullmatch(r"[0-9a-f]{8}" + f"{validity:08x}", new_uidl)
        for s in servers:  # and again from scratch, in either process
            box.index_path.unlink()
            assert session(box.user, s) == view
        for s in servers:
            log = s.log()
            assert "Traceback" not in log and "rebuilding" not in log, log
    finally:
        if dovecot is not None and dovecot.poll() is None:
            dovecot.send_signal(signal.SIGTERM)
            try:
                dovecot.wait(15)
            except subprocess.TimeoutExpired:
                dovecot.kill()
                dovecot.wait()
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
