"""Resource faults: a full disk, a Maildir that becomes unreadable, is
replaced or deleted during a session, a message removed between LIST and
RETR.  Each gets its RFC 3206 answer ([SYS/TEMP] or [SYS/PERM]) or a clean
close, a log line, no traceback, and no mail lost or half-written.
docs/reliability.md lists what each test shows.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support.server import AS_ROOT, Raw, ServerProcess, message

from fastpop.store import index as mindex

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (to mount a tmpfs, or to run the server as nobody)")


def sized(tag: str, size: int | None = None) -> bytes:
    data = message(tag, f"Body of {tag}.\r\n", size=size)
    return data[: data.rfind(b"\r\n") + 2]


def fetch(p: poplib.POP3) -> list[bytes]:
    out = []
    for line in p.list()[1]:
        _, lines, _ = p.retr(int(line.split()[0]))
        out.append(b"\r\n".join(lines) + b"\r\n" if lines else b"")
    return out


def err(exc_info) -> bytes:
    return exc_info.value.args[0]


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "cython", extra_args=["--lmtp-listen", "127.0.0.1:0"])
    s.start()
    s.lmtp_port = int(re.search(r"LMTP listening on 127\.0\.0\.1:(\d+)", s.log()).group(1))
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


# -- disk full


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a 2 MiB tmpfs; returns a function that mounts it on a path."""
    if not IS_ROOT or not shutil.which("mount"):
        pytest.skip("disk-full tests need root to mount a tmpfs")
    mounted: list[Path] = []

    def mount(path: Path, size: str = "2m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                           capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write into ``path`` until the file system is full."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    # and the last few blocks, byte by byte
    fd = os.open(filler, os.O_WRONLY | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def run_deliver(srv, user: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, "--passwd-file", str(srv.passwd),
         "--mail-location", f"{srv.mail}/%u", "--user", user],
        input=data, capture_output=True, timeout=30,
    )


def full_maildir(srv, tmpfs, mails):
    """A user whose Maildir is a 2 MiB tmpfs holding ``mails``, filled up."""
    user = srv.add_user()
    shutil.rmtree(user.maildir)
    tmpfs(user.maildir)
    for sub in ("cur", "new", "tmp"):
        (user.maildir / sub).mkdir()
    for data in mails:
        user.deliver(data)
    return user, fill(user.maildir)


def test_disk_full(srv, tmpfs):
    """The Maildir's file system is full (the lock, a symlink, needs no block):
    POP3 still serves (the index cannot be written: served from memory,
    logged, no partial temporary left), deletions still work, fastpop
    deliver exits 75 and LMTP answers 452 with nothing left behind; once
    there is room, both deliver and the index is written."""
    mails = [sized(f"full {i}", 20_000) for i in range(3)]
    user, filler = full_maildir(srv, tmpfs, mails)

    p = user.login()
    assert fetch(p) == mails
    p.dele(2)
    assert p.quit().startswith(b"+OK")
    assert "cannot write index in" in srv.log() and "No space left on device" in srv.log()
    assert not list(user.maildir.glob("fastpop.index*")), "a partial index was left on the full disk"

    r = run_deliver(srv, user.name, sized("refused", 30_000))
    assert r.returncode == 75 and b"No space left on device" in r.stderr, r
    with smtplib.LMTP("127.0.0.1", srv.lmtp_port, timeout=30) as c:
        c.ehlo()
        c.mail("a@example.com")
        assert c.rcpt(user.name)[0] == 250
        code, text = c.data(sized("refused too", 30_000))
        assert (code, text[:6]) == (452, b"4.3.1 "), text  # RFC 3463: a full disk is 4.3.1
    assert list((user.maildir / "new").iterdir()) == [] and list((user.maildir / "tmp").iterdir()) == []

    p = user.login()
    assert fetch(p) == [mails[0], mails[2]]
    p.quit()

    filler.unlink()
    assert run_deliver(srv, user.name, sized("fits", 30_000)).returncode == 0
    with smtplib.LMTP("127.0.0.1", srv.lmtp_port, timeout=30) as c:
        assert c.sendmail("a@example.com", [user.name], sized("fits too", 30_000)) == {}
    p = user.login()
    assert sorted(fetch(p)) == sorted([mails[0], mails[2], sized("fits", 30_000), sized("fits too", 30_000)])
    p.quit()
    assert mindex.load(str(user.maildir)) is not None


def test_login_on_a_completely_full_disk(srv, tmpfs):
    """A full disk (or quota) must not lock users out: POP3 is how they make room."""
    mails = [sized("full a", 20_000), sized("full b")]
    user, _ = full_maildir(srv, tmpfs, mails)
    p = user.login()
    assert fetch(p) == mails
    p.dele(1)
    assert p.quit().startswith(b"+OK")


# -- the Maildir broken under the server (root: replaced, deleted)


def test_cur_replaced_by_a_file(srv):
    """cur/ is a file at login: [SYS/PERM], a log line, the session goes on;
    put back, every message is there."""
    mails = [sized("a"), sized("b")]
    user = srv.add_user(mails)
    (user.maildir / "cur").rmdir()
    (user.maildir / "cur").write_bytes(b"not a directory")
    p = srv.connect()
    p.user(user.name)
    with pytest.raises(poplib.error_proto) as e:
        p.pass_(user.password)
    assert err(e).startswith(b"-ERR [SYS/PERM]"), err(e)
    assert "USER" in p.capa()  # still connected, still in AUTHORIZATION
    p.quit()
    assert f"cannot open mailbox user={user.name}" in srv.log()
    (user.maildir / "cur").unlink()
    (user.maildir / "cur").mkdir()
    p = user.login()
    assert fetch(p) == mails
    p.quit()


def test_maildir_deleted_during_session(srv):
    """rm -rf of the Maildir while a session is open: the listing (taken at
    login) stays, RETR answers [SYS/PERM] and logs, QUIT ends cleanly, and
    the next login finds a new empty mailbox."""
    user = srv.add_user([sized("a"), sized("b", 200_000)])
    p = user.login()
    assert p.stat()[0] == 2
    shutil.rmtree(user.maildir)
    assert len(p.list()[1]) == 2
    for n in (1, 2):
        with pytest.raises(poplib.error_proto) as e:
            p.retr(n)
        assert err(e).startswith(b"-ERR [SYS/PERM]"), err(e)
    p.dele(1)
    assert p.quit().startswith(b"+OK")
    assert f"message vanished user={user.name}" in srv.log()
    p = user.login()
    assert p.stat() == (0, 0)
    p.quit()


@pytest.mark.parametrize("size", [None, 200_000], ids=["small", "sendfile"])
def test_message_removed_between_list_and_retr(srv, size):
    mails = [sized("keep 1"), sized("removed", size), sized("keep 2")]
    user = srv.add_user(mails)
    p = user.login()
    assert [int(line.split()[1]) for line in p.list()[1]] == [len(m) for m in mails]
    [victim] = [f for f in (user.maildir / "cur").iterdir() if f.read_bytes() == mails[1]]
    victim.unlink()
    for call in (lambda: p.retr(2), lambda: p.top(2, 0)):
        with pytest.raises(poplib.error_proto) as e:
            call()
        assert err(e) == b"-ERR [SYS/PERM] Message was removed by another program."
    assert b"\r\n".join(p.retr(3)[1]) + b"\r\n" == mails[2]  # the others are unaffected
    p.dele(2)  # deleting what is gone is not an error
    assert p.quit() == b"+OK Logging out, messages deleted."
    assert f"message vanished user={user.name}" in srv.log()
    p = user.login()
    assert fetch(p) == [mails[0], mails[2]]
    p.quit()


def _changed(data: bytes, how: str) -> bytes:
    if how == "longer":
        return data + b"A line another program added.\r\n" * 40
    cut = 1000 if how == "small" else len(data) // 2
    return data[: data.rfind(b"\r\n", 0, cut) + 2]


@pytest.mark.parametrize("size,how", [(None, "shorter"), (None, "longer"), (300_000, "shorter"),
                                      (300_000, "longer"), (300_000, "small")])
def test_message_changed_between_list_and_retr(srv, size, how):
    """Another program rewrites a message in place (Maildir files never change; this one did):
    RETR sends it as it is now, and its "+OK n octets" counts what is sent, not what LIST said."""
    mails = [sized("changed", size), sized("keep")]
    user = srv.add_user(mails)
    p = user.login()
    assert int(p.list(1).split()[2]) == len(mails[0])
    [victim] = [f for f in (user.maildir / "cur").iterdir() if f.read_bytes() == mails[0]]
    now = _changed(mails[0], how)
    assert len(now) != len(mails[0])
    victim.write_bytes(now)
    resp, lines, _ = p.retr(1)
    assert resp == b"+OK %d octets" % len(now)
    assert b"\r\n".join(lines) + b"\r\n" == now
    assert f"message changed since it was indexed user={user.name}" in srv.log()
    assert b"\r\n".join(p.retr(2)[1]) + b"\r\n" == mails[1]
    p.quit()


# -- the Maildir unreadable (the server runs as nobody: root reads everything)


@pytest.fixture
def nobody_srv(request):
    if not IS_ROOT:
        pytest.skip("needs root to start the server as nobody")
    root = Path(tempfile.mkdtemp(prefix="fastpop-res-"))
    root.chmod(0o755)  # pytest's tmp_path is below a 0700 directory nobody cannot enter
    extra = getattr(request, "param", [])
    s = ServerProcess(root, "cython", extra_args=["--user", "nobody", *extra])
    s.nobody = pwd.getpwnam("nobody")
    s.start()
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()
    shutil.rmtree(root)


def add_owned_user(s, mails):
    user = s.add_user(mails)
    for path in [s.mail, user.maildir, *user.maildir.rglob("*")]:
        os.chown(path, s.nobody.pw_uid, s.nobody.pw_gid)
    return user


def test_maildir_unreadable_at_login(nobody_srv):
    s = nobody_srv
    mails = [sized("a"), sized("b")]
    user = add_owned_user(s, mails)
    user.maildir.chmod(0)
    p = s.connect()
    p.user(user.name)
    with pytest.raises(poplib.error_proto) as e:
        p.pass_(user.password)
    assert err(e).startswith(b"-ERR [SYS/PERM]"), err(e)
    p.quit()
    assert f"user={user.name}" in s.log() and "Permission denied" in s.log()
    user.maildir.chmod(0o700)
    p = user.login()
    assert fetch(p) == mails
    p.quit()


def test_maildir_unreadable_during_session(nobody_srv):
    """cur/ loses its permissions mid-session: RETR and the deletions answer
    with a code, the session ends cleanly, and nothing is lost."""
    s = nobody_srv
    mails = [sized("a"), sized("b", 200_000), sized("c")]
    user = add_owned_user(s, mails)
    p = user.login()
    assert p.stat()[0] == 3
    (user.maildir / "cur").chmod(0)
    for n in (1, 2):
        with pytest.raises(poplib.error_proto) as e:
            p.retr(n)
        assert err(e).startswith(b"-ERR [SYS/PERM] Message cannot be read"), err(e)  # as at login: EACCES
    p.dele(1)
    with pytest.raises(poplib.error_proto) as e:
        p.quit()
    assert err(e).startswith(b"-ERR [SYS/TEMP] Some deleted messages could not be removed"), err(e)
    assert "cannot open message" in s.log()
    assert any("cannot delete message" in line and "Permission denied" in line
               for line in s.log().splitlines())  # which, and why
    (user.maildir / "cur").chmod(0o700)
    p = user.login()
    assert fetch(p) == mails  # the failed deletion lost nothing (the client deletes again)
    p.quit()


def test_unreadable_index_is_rebuilt(nobody_srv):
    """An index the server cannot read (written by root by mistake, mode 0)
    does not lock the user out: it is replaced, with a log line."""
    s = nobody_srv
    mails = [sized("a"), sized("b")]
    user = add_owned_user(s, mails)
    p = user.login()
    p.quit()
    index = user.maildir / mindex.INDEX_FILE
    assert index.exists()
    copy = index.with_name("root-owned")  # a new inode: not the copy cached in the server
    copy.write_bytes(index.read_bytes())
    copy.chmod(0)
    copy.rename(index)
    p = user.login()
    assert fetch(p) == mails
    p.quit()
    assert f"ignoring index {index}" in s.log()


@pytest.mark.parametrize("nobody_srv", [["--mail-lock", "symlink"]], indirect=True)
def test_lock_file_unusable(nobody_srv):
    """fastpop.lock cannot be made (the Maildir is not the server's to
    write): [SYS/PERM] and a log line, not a hang."""
    s = nobody_srv
    user = add_owned_user(s, [sized("a")])
    os.chown(user.maildir, 0, 0)
    user.maildir.chmod(0o755)
    r = Raw(s.port)
    assert r.cmd(f"USER {user.name}").startswith(b"+OK")
    reply = r.cmd(f"PASS {user.password}")
    assert reply.startswith(b"-ERR [SYS/PERM]"), reply
    assert r.cmd("QUIT").startswith(b"+OK")
    r.close()
    assert "cannot lock mailbox" in s.log()


def test_read_only_maildir_top_with_the_lock_table(nobody_srv):
    """The lock table writes nothing into the Maildir: a mailbox whose top
    directory the server may not write (but whose cur/ it may) is served,
    and deletions, which happen in cur/, still work.  (Still the server's
    uid's: a Maildir of another owner is refused, tests/test_hostile_maildir.py.)"""
    s = nobody_srv
    user = add_owned_user(s, [sized("a"), sized("b")])
    user.maildir.chmod(0o555)
    p = user.login()
    assert p.stat()[0] == 2
    assert p.dele(1).startswith(b"+OK")
    assert p.quit().startswith(b"+OK")
    assert user.contents() == [sized("b")]


def test_message_truncated_during_sendfile_retr(srv):
    """Another program truncates a message while RETR sends it with
    sendfile(2): the connection is closed (a client must not take a short
    message for a whole one), logged, the lock is freed, nothing else changes."""
    big = sized("big", 32 << 20)  # more than the socket buffers hold, so the send is still running
    user = srv.add_user([big, sized("small")])
    r = Raw(srv.port)
    assert r.cmd(f"USER {user.name}").startswith(b"+OK")
    assert r.cmd(f"PASS {user.password}").startswith(b"+OK")
    r.send(b"RETR 1\r\n")
    assert r.line() == b"+OK %d octets\r\n" % len(big)
    r.sock.recv(65536)  # the transfer has begun; the socket buffers fill and it waits
    [path] = [f for f in (user.maildir / "cur").iterdir() if f.stat().st_size == len(big)]
    os.truncate(path, 1 << 20)
    rest = r.read_to_eof()
    assert not rest.endswith(b"\r\n.\r\n"), "a short message was ended as if whole"
    r.close()
    assert "sendfile failed, closing connection" in srv.log()
    p = user.login_when_free()
    assert p.stat()[0] == 2
    assert b"\r\n".join(p.retr(2)[1]) + b"\r\n" == sized("small")
    p.quit()
