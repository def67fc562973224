"""Memory-mapped indexes (fastpop.store.index), through real servers.

Three configurations, each a root server on 127.0.0.1 (``--allow-mail-as-root``):

- ``copy``: the Maildirs are root's, the server's own uid: whoever writes the
  Maildir can write its index in place, so the index is read into memory;
- ``mapped``: the Maildirs belong to their user (nobody): the index in the
  Maildir is root's, mode 0600, which that user cannot write, so it is mapped;
- ``external``: ``[mail] index`` names a directory of the server's own, outside
  every Maildir (root's Maildirs here, the case that needs it); its indexes
  are mapped.  The server is told with ``[mail] index`` in its configuration file.

A mapped index is in the worker's address space only while a session uses
it, no copy stays in the worker, and no user can truncate one under a
session: what they can do instead (truncate, replace or plant their own
files) leaves the session, the worker and other sessions as they were.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import poplib
import pwd
import shutil
import stat
import tempfile
import time
import traceback
from pathlib import Path

import pytest
from support.server import ServerProcess, User, message

from fastpop.store import index as mindex
from fastpop.store import safefs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: Maildirs of another uid, served as root")

HOUR_NS = 3600 * 10**9
MODES = ["copy", "mapped", "external"]


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this host")


class World:
    """A server in one of the MODES, its users, and where their indexes are."""

    def __init__(self, mode: str, monkeypatch) -> None:
        self.mode = mode
        self.base = Path(tempfile.mkdtemp(prefix="fastpop-mmap-"))
        self.base.chmod(0o755)  # nobody must reach its Maildir (pytest's tmp_path is in a 0700 directory)
        self.srv = ServerProcess(self.base / "srv", "cython")
        self.srv.mail.chmod(0o755)
        self.nobody = _nobody()
        self.index_dir = self.base / "index"
        if mode == "external":
            conf = self.base / "fastpop.toml"
            conf.write_text(f'[mail]\nindex = "{self.index_dir}"\n')
            self.srv.extra_args += ["--config", str(conf)]

    def add_user(self, messages=()) -> User:
        if self.mode == "mapped":
            n = self.nobody
            user = self.srv.add_user(stored=f"{{PLAIN}}secret:{n.pw_uid}:{n.pw_gid}", password="secret")
            for top, dirs, files in os.walk(user.maildir):
                for name in [*dirs, *files]:
                    os.chown(os.path.join(top, name), n.pw_uid, n.pw_gid)
            os.chown(user.maildir, n.pw_uid, n.pw_gid)
        else:
            user = self.srv.add_user()
        for data in messages:
            self.deliver(user, data)
        return user

    def deliver(self, user: User, data: bytes) -> None:
        path = user.deliver(data)
        if self.mode == "mapped":
            os.chown(path, self.nobody.pw_uid, self.nobody.pw_gid)

    def index_of(self, user: User) -> Path:
        if self.mode == "external":
            name = hashlib.sha256(os.fsencode(safefs.canonical_maildir(str(user.maildir)))).hexdigest()
            return self.index_dir / name
        return user.maildir / mindex.INDEX_FILE

    def settle(self, user: User) -> None:
        """Log in (new/ moves to cur/), give cur/ an old mtime and log in again, so
        the index records it and is trusted."""
        stamp = time.time_ns() - HOUR_NS
        for step in range(2):
            if step:
                os.utime(user.maildir / "cur", ns=(stamp, stamp))
            p = user.login_when_free()
            p.stat()
            p.quit()
        assert mindex.MailboxIndex(self.index_of(user).read_bytes()).cur_mtime_ns == stamp

    def mapped(self, path: Path) -> bool:
        """Whether the server maps ``path`` now (/proc/PID/maps)."""
        with open(f"/proc/{self.srv.proc.pid}/maps") as f:
            return any(line.rstrip("\n").endswith(" " + str(path)) for line in f)

    def rss_anon_kib(self) -> int:
        with open(f"/proc/{self.srv.proc.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        raise AssertionError("no RssAnon in /proc/PID/status")

    def close(self) -> None:
        if self.srv.proc is not None:
            self.srv.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(params=MODES)
def world(request, monkeypatch):
    w = World(request.param, monkeypatch)
    yield w
    log = w.srv.log()
    w.close()
    assert "Traceback" not in log, log


def view(p: poplib.POP3) -> tuple:
    return p.stat(), p.list()[1], p.uidl()[1]


def craft_index(world: World, user: User, count: int) -> int:
    """A valid index of ``count`` messages (none of them in cur/: STAT and LIST
    come from the index alone), trusted for cur/'s mtime, put in place as
    fastpop writes one (root's, 0600, renamed).  Returns its size."""
    stamp = time.time_ns() - HOUR_NS
    entries = [mindex.Entry(f"{1700000000 + i}.M{i}P1.crafted:2,", 1000 + i % 7, 1000, 3, f"u{i:09d}")
               for i in range(count)]
    data = mindex.encode(entries, stamp, 0)
    path = world.index_of(user)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(path.name + ".crafted")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.replace(tmp, path)
    os.utime(user.maildir / "cur", ns=(stamp, stamp))
    return len(data)


def as_user(uid: int, gid: int, action) -> int:
    """Run ``action()`` in a child process of uid/gid; returns its int result (0-255)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 255
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = action()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


# --------------------------------------------------------------------------- mapped, and only while used

def test_index_is_mapped_while_a_session_uses_it(world):
    user = world.add_user([message(f"m{i}") for i in range(30)])
    world.srv.start()
    world.settle(user)
    path = world.index_of(user)
    p = user.login_when_free()
    before = view(p)
    assert before[0][0] == 30
    in_session = world.mapped(path)
    p.quit()
    deadline = time.monotonic() + 2
    while world.mapped(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    if world.mode == "copy":
        assert not in_session, "an index its Maildir's owner can write was mapped"
    else:
        assert in_session, f"the index {path} was not mapped during the session ({world.mode})"
        assert not world.mapped(path), "the index stayed mapped after the session"


def test_worker_keeps_no_copy_of_the_indexes_it_served(world):
    """Twelve mailboxes of 50,000 messages each (3 MB indexes), logged in and
    STAT'ed one after the other: a worker that copies indexes grows by about
    their sum; one that maps them, by nothing that lasts."""
    if world.mode == "copy":
        pytest.skip("an index its owner can write is read into a bounded per-process cache, by design")
    users = [world.add_user() for _ in range(12)]
    sizes = [craft_index(world, u, 50_000) for u in users]
    world.srv.start()
    warm = world.add_user([message("warm-up")])
    world.settle(warm)  # the server's own imports and buffers, before measuring
    before = world.rss_anon_kib()
    for u in users:
        p = u.login_when_free()
        assert p.stat()[0] == 50_000
        p.quit()
    grown = world.rss_anon_kib() - before
    assert grown < sum(sizes) // 1024 // 4, (
        f"the worker's anonymous memory grew by {grown} KiB after serving {len(users)} indexes "
        f"of {sizes[0] // 1024} KiB: it kept copies")


# --------------------------------------------------------------------------- truncation under a session

def _attack(world: World, user: User) -> int:
    """What the Maildir's owner may do to the index of a session open on it;
    returns a bit mask of what reached the index that session uses (1:
    truncated by path, 2: by a descriptor opened for writing).

    - copy: the owner is root, the server's own uid, and truncates it in place;
    - mapped: the owner (nobody) tries both and is refused by the kernel;
    - external: the owner (root, as a service confined to the Maildir would
      be) truncates whatever is in the Maildir; the index is not there.
    Each then puts a file of its own in the Maildir's index place and truncates it."""
    path = world.index_of(user)
    maildir = user.maildir

    def action() -> int:
        done = 0
        if world.mode != "external":
            try:
                os.truncate(path, 0)
                done |= 1
            except OSError as exc:
                assert exc.errno in (errno.EACCES, errno.EPERM), exc
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                os.ftruncate(fd, 0)
                os.close(fd)
                done |= 2
            except OSError as exc:
                assert exc.errno in (errno.EACCES, errno.EPERM), exc
        for name in os.listdir(maildir):  # every file of the Maildir's top that it may write
            if os.path.isfile(maildir / name) and not os.path.islink(maildir / name):
                with contextlib.suppress(PermissionError):
                    os.truncate(maildir / name, 0)
        own = maildir / (mindex.INDEX_FILE + ".mine")
        own.write_bytes(b"FASTPOPI" + bytes(4096))
        os.replace(own, maildir / mindex.INDEX_FILE)
        os.truncate(maildir / mindex.INDEX_FILE, 0)
        return done

    if world.mode == "mapped":
        return as_user(world.nobody.pw_uid, world.nobody.pw_gid, action)
    return action()


def test_truncating_an_index_under_a_session(world):
    """A session logged in (its index mapped, or read), then the Maildir's
    owner truncates what it can of the index: the worker lives, the session's
    LIST and UIDL are what they were, another session is untouched, and the
    next login is right."""
    user = world.add_user([message(f"t{i}", "x\r\n" * (i % 5)) for i in range(900)])
    other = world.add_user([message(f"o{i}") for i in range(40)])
    world.srv.start()
    world.settle(user)
    world.settle(other)
    other_p = other.login_when_free()
    other_view = view(other_p)
    p = user.login_when_free()
    stat_before = p.stat()
    assert world.mapped(world.index_of(user)) == (world.mode != "copy")
    size = world.index_of(user).stat().st_size
    done = _attack(world, user)
    if world.mode == "copy":
        assert done == 3 and world.index_of(user).stat().st_size == 0
    else:
        assert done == 0, f"the Maildir's owner truncated a mapped index (mask {done})"
    if world.mode == "external":
        assert world.index_of(user).stat().st_size == size
    try:
        after = view(p)
    except (poplib.error_proto, OSError, EOFError) as exc:  # a clean end would do; death would not
        after = exc
    finally:
        with contextlib.suppress(Exception):
            p.quit()
    time.sleep(0.05)
    assert world.srv.proc.poll() is None, f"the server died ({world.srv.proc.returncode}): SIGBUS?"
    assert not isinstance(after, Exception) and after[0] == stat_before, after
    assert view(other_p) == other_view
    other_p.quit()
    p = user.login_when_free()
    assert p.stat() == stat_before
    p.quit()


# --------------------------------------------------------------------------- [mail] index

def test_external_index_is_fastpops_alone(world):
    """``[mail] index``: the index is in the server's directory (0700, its own),
    named by the hash of the canonical Maildir path, a regular file of its
    own, 0600; a ``fastpop.index`` planted in the Maildir is not read, even a
    valid one that lies."""
    if world.mode != "external":
        pytest.skip("the [mail] index directory only")
    user = world.add_user([message(f"e{i}") for i in range(5)])
    world.srv.start()
    world.settle(user)
    path = world.index_of(user)
    st = os.stat(path, follow_symlinks=False)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    d = os.stat(world.index_dir)
    assert d.st_uid == os.geteuid() and stat.S_IMODE(d.st_mode) & 0o077 == 0
    assert not (user.maildir / mindex.INDEX_FILE).exists()
    # a planted index in the Maildir, valid and trusted, claiming 3 messages
    lie = mindex.encode([mindex.Entry(f"{n}.lie:2,", 7, 7, 3, f"lie{n}") for n in range(3)],
                        os.stat(user.maildir / "cur").st_mtime_ns, 0)
    (user.maildir / mindex.INDEX_FILE).write_bytes(lie)
    p = user.login_when_free()
    assert p.stat()[0] == 5
    p.quit()


def test_index_directory_must_be_the_servers_alone(tmp_path):
    """configure() refuses a directory others may write, one of another uid, and a link."""
    nobody = _nobody()
    others = tmp_path / "others"
    others.mkdir(mode=0o777)
    others.chmod(0o777)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(good)
    try:
        for bad in (others, foreign, link):
            with pytest.raises(PermissionError):
                mindex.configure(str(bad))
            assert mindex.directory() is None
        fresh = tmp_path / "fresh" / "index"
        mindex.configure(str(fresh))
        assert mindex.directory() == str(fresh)
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    finally:
        mindex.configure(None)
    assert mindex.directory() is None
