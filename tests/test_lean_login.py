"""The lean login (issue 19), through real servers: what a login no longer
asks of the kernel, and that nothing it stopped asking goes unseen.

The passwd-file is watched with inotify instead of stat'ed at every login:
an edit in place, a replacement by rename and a removal made on this host
are seen by the very next login; the file's path through a link is stat'ed
at every login as before.  (new/ seen empty is checked by one lstat:
tests/test_index.py; the mapped index unmapped at the session's end:
tests/test_session_inprocess.py.)
"""

from __future__ import annotations

import mmap
import os
import poplib
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support.server import ServerProcess, message, tracer_of


def stat_after_login(srv: ServerProcess, name: str, password: str) -> bytes:
    p = srv.connect()
    try:
        p.user(name)
        p.pass_(password)
        return p._shortcmd("STAT")
    finally:
        p.quit()


def login_fails(srv: ServerProcess, name: str, password: str) -> None:
    p = srv.connect()
    try:
        p.user(name)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.pass_(password)
    finally:
        p.close()


class SyscallTrace:
    """strace -f of one process's file-system status calls, attached while in use."""

    def __init__(self, pid: int, out: Path, calls: str = "newfstatat,statx,stat,lstat,openat,openat2") -> None:
        if shutil.which("strace") is None:
            pytest.skip("strace is not installed: cannot observe the server's system calls")
        self.pid, self.out = pid, out
        self.proc = subprocess.Popen(
            ["strace", "-f", "-e", f"trace={calls}", "-o", str(out), "-p",
             str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            tasks = os.listdir(f"/proc/{pid}/task")
            if tasks and all(tracer_of(pid, t) == self.proc.pid for t in tasks):
                break
            assert self.proc.poll() is None and time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)

    def stop(self) -> list[str]:
        self.proc.terminate()
        self.proc.wait(10)
        return self.out.read_text().splitlines()


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "cython")
    yield s
    if s.proc is not None:
        s.stop()
    assert "Traceback" not in s.log(), s.log()


def test_logins_do_not_stat_the_watched_passwd_file(srv, tmp_path):
    """Ten logins within a second: the passwd-file is stat'ed at most once
    (the once-a-second backstop), not once per login (the old code: ten)."""
    srv.start()
    users = [srv.add_user(messages=[message("x")]) for _ in range(3)]
    for user in users:  # the file read since the last edit
        assert stat_after_login(srv, user.name, "secret").startswith(b"+OK 1 ")
    trace = SyscallTrace(srv.proc.pid, tmp_path / "logins.trace")
    try:
        started = time.monotonic()
        for i in range(10):
            assert stat_after_login(srv, users[i % 3].name, "secret").startswith(b"+OK 1 ")
        elapsed = time.monotonic() - started
    finally:
        lines = trace.stop()
    stats = [line for line in lines if re.search(r"stat[a-z0-9]*\([^)]*\"" + re.escape(str(srv.passwd)) + '"', line)]
    assert any(str(srv.mail) in line for line in lines), "strace saw none of the logins"
    assert len(stats) <= 1 + int(elapsed), (elapsed, stats)


def test_writes_beside_the_passwd_file_do_not_wake_the_server(srv, tmp_path):
    """A file written in the passwd-file's directory (a log file: the
    benchmark's layout, or an operator's) raises no event the server reads:
    the directory is watched for names only and the file itself for writes.
    The old code watched the directory for writes and read an event per
    write of any file in it."""
    srv.start()
    user = srv.add_user(messages=[message("x")])
    assert stat_after_login(srv, user.name, "secret").startswith(b"+OK 1 ")
    beside = srv.passwd.with_name("beside.log")
    beside.write_bytes(b"")  # (made before the trace: a new name is an event the server reads)
    trace = SyscallTrace(srv.proc.pid, tmp_path / "reads.trace", calls="read")
    try:
        with open(beside, "ab", buffering=0) as log_file:
            for i in range(20):
                log_file.write(b"line %d\n" % i)
                time.sleep(0.005)
        assert stat_after_login(srv, user.name, "secret").startswith(b"+OK 1 ")  # (the server's reads are traced)
    finally:
        lines = trace.stop()
    assert any("STAT" in line for line in lines), "strace saw none of the session"
    woken = [line for line in lines if "beside.log" in line]
    assert not woken, woken


def test_passwd_edits_are_seen_by_the_next_login(srv):
    """Each change, made right after a login that read the file (within its
    second), counts for the very next login: a line appended in place, the
    file replaced by rename (as ``fastpop user`` and editors write it), a
    password changed in place with the size kept, a user removed."""
    srv.start()
    alice = srv.add_user(messages=[message("a")])
    assert stat_after_login(srv, alice.name, "secret").startswith(b"+OK 1 ")

    with open(srv.passwd, "a") as f:  # in place
        f.write("bob:{PLAIN}bobpw\n")
    assert stat_after_login(srv, "bob", "bobpw") == b"+OK 0 0"

    new = srv.passwd.with_name("passwd.new")  # replaced by rename
    new.write_text(f"{alice.name}:{{PLAIN}}second\nbob:{{PLAIN}}bobpw\n")
    os.replace(new, srv.passwd)
    login_fails(srv, alice.name, "secret")
    assert stat_after_login(srv, alice.name, "second").startswith(b"+OK 1 ")

    # the same size, rewritten in place within the same second: the inode, the
    # size and perhaps the mtime tick unchanged; inotify still reports it
    text = srv.passwd.read_text()
    with open(srv.passwd, "r+") as f:
        f.write(text.replace("second", "thirdd"))
    login_fails(srv, alice.name, "second")
    assert stat_after_login(srv, alice.name, "thirdd").startswith(b"+OK 1 ")

    new.write_text("bob:{PLAIN}bobpw\n")  # alice removed
    os.replace(new, srv.passwd)
    login_fails(srv, alice.name, "thirdd")
    assert stat_after_login(srv, "bob", "bobpw") == b"+OK 0 0"

    # removed, then made anew in place: the new file's edits in place are seen
    # too (the watch of its inode is made when its name appears)
    srv.passwd.unlink()
    p = srv.connect()
    try:
        p.user("bob")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):  # no user database: not a wrong password
            p.pass_("bobpw")
    finally:
        p.close()
    srv.passwd.write_text("bob:{PLAIN}fourth\n")
    assert stat_after_login(srv, "bob", "fourth") == b"+OK 0 0"
    with open(srv.passwd, "r+") as f:
        f.write("bob:{PLAIN}fifthh\n")
    login_fails(srv, "bob", "fourth")
    assert stat_after_login(srv, "bob", "fifthh") == b"+OK 0 0"


def test_passwd_file_through_a_link_is_checked_at_every_login(tmp_path):
    """A passwd-file named through a link is not watched (a watch of the
    link's directory would not see its target edited elsewhere): it is
    stat'ed at every login, so an edit of the target, or the link pointed
    elsewhere, is seen by the next login."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "one").write_text("carol:{PLAIN}one\n")
    (real / "two").write_text("carol:{PLAIN}two\n")
    link = tmp_path / "passwd-link"
    link.symlink_to(real / "one")
    srv = ServerProcess(tmp_path / "srv", "cython", extra_args=["--passwd-file", str(link)])
    srv.start()
    try:
        assert stat_after_login(srv, "carol", "one") == b"+OK 0 0"
        (real / "one").write_text("carol:{PLAIN}uno\n")  # the target, edited in its own directory
        login_fails(srv, "carol", "one")
        assert stat_after_login(srv, "carol", "uno") == b"+OK 0 0"
        tmp = tmp_path / "passwd-link.new"
        tmp.symlink_to(real / "two")
        os.replace(tmp, link)
        assert stat_after_login(srv, "carol", "two") == b"+OK 0 0"
        login_fails(srv, "carol", "uno")
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_an_edit_inotify_does_not_report_is_seen_within_a_second(srv):
    """An edit written through a shared mapping raises no inotify event
    until the mapping goes (as an edit made by another host of an NFS mount
    raises none at all) but changes the mtime: the once-a-second stat sees it."""
    srv.start()
    alice = srv.add_user(stored="{PLAIN}secret1")
    data = srv.passwd.read_bytes()
    at = data.index(b"secret1")
    fd = os.open(srv.passwd, os.O_RDWR)
    mapped = mmap.mmap(fd, len(data))
    os.close(fd)  # (the file stays open, and evented, until the mapping is closed)
    try:
        assert stat_after_login(srv, alice.name, "secret1") == b"+OK 0 0"  # the file read since the open
        mapped[at : at + 7] = b"secret2"
        mapped.flush()
        deadline = time.monotonic() + 1.0 + 1.0  # CHECK_INTERVAL, and a second of slack for a busy machine
        while True:
            p = srv.connect()
            try:
                p.user(alice.name)
                try:
                    p.pass_("secret2")
                    break
                except poplib.error_proto:
                    assert time.monotonic() < deadline, "the edit was not seen within a second"
            finally:
                p.close()
            time.sleep(0.05)
        login_fails(srv, alice.name, "secret1")
    finally:
        mapped.close()


def test_every_worker_sees_an_edit_at_its_next_login(tmp_path):
    """Each worker watches the file with its own inotify instance: with two
    workers, every login after a rename-replace sees the new file."""
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2"])
    srv.start()
    try:
        user = srv.add_user()
        for _ in range(6):  # both workers have read the file (connections go to either)
            assert stat_after_login(srv, user.name, "secret") == b"+OK 0 0"
        new = srv.passwd.with_name("passwd.new")
        new.write_text(f"{user.name}:{{PLAIN}}changed\n")
        os.replace(new, srv.passwd)
        for _ in range(8):
            login_fails(srv, user.name, "secret")
            assert stat_after_login(srv, user.name, "changed") == b"+OK 0 0"
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()
