"""One POP3 session per mailbox, with locks that hold no descriptor.

Two kinds, chosen by ``[mail] lock``:

``table`` (the default): one lock table per host, 256 shard files opened
once per process, and an OFD byte-range lock (fcntl F_OFD_SETLK) per mailbox
at an offset hashed from the Maildir's device and inode, in the shard that
offset picks (so no file's lock list grows past ~1/256 of the sessions held:
the kernel walks that list on every lock and unlock).  A login costs one
stat and two fcntl, writes nothing to the Maildir (it works on a full disk
or quota, when POP3 is how a user makes room), and the kernel drops a dead
process's locks with its descriptors, so nothing is ever stale.  Every fastpop
process of the host (workers, and an old server draining beside a new one)
uses the same table, so they see each other's locks; an in-process set
covers the sessions of one process, whose locks share one open file
description per shard and so never conflict with each other in the kernel.

``symlink``: ``fastpop.lock`` in the Maildir, a symbolic link whose target
names its owner (process id, start time, boot and host).  For several hosts
on one NFS store, where a host-local table cannot see the other hosts.
symlink(2) creates it atomically (it fails if the name exists, also over
NFS) and needs no data block; there is no moment at which it exists but
names nobody.  A lock whose owner is gone is stale and may be taken over:
- same host and boot: the owning process no longer exists, is a zombie, or
  its pid now belongs to a process started at another time;
- same host, another boot: the host has restarted since;
- another host: the link is older than ``stale_after`` seconds (we cannot
  see that host's processes; see docs/deploy.md);
- not a link (a file left by something else): at once.
Taking over happens under a short flock(2) on the Maildir directory, so two
sessions of this host that both find a lock stale cannot both win; it is never
waited for (the Maildir's user may hold it): busy, the mailbox is in use.  The
lock is made, read and removed relative to the Maildir opened without
following a link, never by path (root's ``fastpop expire`` takes it too).

Either way a session holds nothing open while it idles, so a worker can keep
~19,000 logged-in sessions within a 20,000-descriptor limit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
import stat
import struct
import tempfile
import time
import weakref
import zlib

from fastpop import faults
from fastpop.limits import MAILBOX_LOCK_SHARDS, lock_shards_up_front

LOCK_FILE = "fastpop.lock"
DEFAULT_STALE_AFTER = 3600.0  # seconds after which another host's lock is presumed dead


class MailboxLocked(Exception):
    """Another session holds this mailbox."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return "noboot"


def _short_host(host: str) -> str:
    """The host name, shortened (keeping it distinct) so the whole owner fits
    in an inode: a "fast" symlink needs no data block."""
    host = host.replace("/", "_")
    return host if len(host) <= 24 else f"{host[:15]}~{zlib.crc32(host.encode()):08x}"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None if it is
    gone or a zombie (a killed worker not yet reaped holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # the command name may hold spaces
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


_HOST = _short_host(socket.gethostname())
_BOOT = _boot_id()
_identity: tuple[int, str] = (0, "")


def owner() -> str:
    """This process's owner name, pid.start.boot@host; recomputed after a fork."""
    global _identity
    pid = os.getpid()
    if _identity[0] != pid:
        _identity = (pid, f"{pid}.{_start_time(pid) or 0}.{_BOOT}@{_HOST}")
    return _identity[1]


def is_stale(name: str | None, mtime: float, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    """Whether a lock naming ``name`` (None: not a link) belongs to nobody alive."""
    if name is None or "@" not in name:
        return True  # a plain file or a link no fastpop made
    ident, _, host = name.rpartition("@")
    parts = ident.split(".")
    if host != _HOST:
        return time.time() - mtime > stale_after
    if len(parts) != 3 or parts[2] != _BOOT:
        return True  # another boot of this host (or nonsense)
    pid, start = parts[0], parts[1]
    # the user may write the link: ASCII digits of a pid's length only ("²" passes
    # str.isdigit() but not int(), and int() refuses over 4300 digits)
    if not (pid.isascii() and pid.isdigit()) or len(pid) > 10:
        return True
    return _start_time(int(pid)) != start


def _read(dir_fd: int) -> tuple[str | None, float] | None:
    """(owner, or None if not a link; mtime) of the lock in the Maildir open
    as ``dir_fd``, or None if there is no lock."""
    try:
        name: str | None = os.readlink(LOCK_FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:  # EINVAL: a plain file
        name = None
    if name is not None and name.endswith("@" + _HOST):
        return name, 0.0  # this host's: decided by its process, not by age
    try:
        return name, os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None


def _check_maildir(st: os.stat_result, maildir: str) -> None:
    """A Maildir is locked as itself: a link there (its user may have made it,
    to hold another user's mailbox) is refused, as opening it would be."""
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "a symbolic link (refused)", maildir)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a directory should be", maildir)


def _open_locked_dir(maildir: str, st: os.stat_result | None) -> int:
    """The Maildir, not through a link, and (``st``) still the directory that
    was checked: its user may swap it for a link or another directory at any
    moment, and the lock is then never made, read or removed there."""
    try:
        fd = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _check_maildir(os.lstat(maildir), maildir)  # says what is there instead
        raise
    if st is not None:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise OSError(errno.ESTALE, "replaced while it was locked", maildir)
    return fd


class MailboxLock:
    """Held from login to logout; ``release`` removes the link if still ours.
    Every step is relative to the Maildir opened without following a link,
    never by path: as root (fastpop expire) the user must not be able to make
    the lock be taken, or a file be removed, in a directory they swapped in."""

    __slots__ = ("_path", "_dev", "_ino")

    def __init__(self, maildir: str, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        st = os.lstat(maildir)  # FileNotFoundError: the caller creates the Maildir
        _check_maildir(st, maildir)
        self._path = ""
        dir_fd = _open_locked_dir(maildir, st)
        try:
            try:
                self._create(dir_fd)
            except FileExistsError:
                self._take_over(dir_fd, maildir, stale_after)
        finally:
            os.close(dir_fd)  # (drops the flock of a takeover)
        self._path = maildir
        self._dev, self._ino = st.st_dev, st.st_ino

    def _create(self, dir_fd: int) -> None:
        os.symlink(owner(), LOCK_FILE, dir_fd=dir_fd)
        if faults.ACTIVE:
            faults.hit("lock.after_create")

    def _take_over(self, dir_fd: int, maildir: str, stale_after: float) -> None:
        seen = _read(dir_fd)
        if seen is not None and not is_stale(*seen, stale_after):
            raise MailboxLocked(maildir)
        try:
            # held for a few system calls only, by whoever holds it: never waited
            # for (the Maildir's user may hold it for ever); busy is in use
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MailboxLocked(maildir) from None
        seen = _read(dir_fd)  # again: another session may have won
        if seen is not None:
            if not is_stale(*seen, stale_after):
                raise MailboxLocked(maildir)
            os.unlink(LOCK_FILE, dir_fd=dir_fd)
        try:
            self._create(dir_fd)
        except FileExistsError:
            raise MailboxLocked(maildir) from None

    def release(self) -> None:
        path = self._path
        if not path:
            return
        self._path = ""
        try:
            dir_fd = _open_locked_dir(path, None)
        except OSError:
            return  # not a directory (of ours) there any more: nothing of ours to remove
        try:
            st = os.fstat(dir_fd)
            # Ours only if it is the Maildir it was taken in and still names us
            # (after a takeover, because we were presumed dead, it names the new owner).
            if (st.st_dev, st.st_ino) == (self._dev, self._ino) and os.readlink(LOCK_FILE, dir_fd=dir_fd) == owner():
                os.unlink(LOCK_FILE, dir_fd=dir_fd)
        except OSError:
            pass  # removed by hand meanwhile, or replaced by a plain file
        finally:
            os.close(dir_fd)


class SymlinkLocks:
    """``[mail] lock = "symlink"``: fastpop.lock in each Maildir (see above)."""

    method = "symlink"

    def __init__(self, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        self.stale_after = stale_after

    def acquire(self, maildir: str) -> MailboxLock:
        return MailboxLock(maildir, self.stale_after)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the lock table

_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)  # Linux 3.15+; None elsewhere
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid (0 for OFD locks)
_OFFSET_MASK = (1 << 62) - 1  # l_start is a signed off_t; keep start + 1 far from overflow
_M64 = (1 << 64) - 1


def slot(st_dev: int, st_ino: int) -> int:
    """The byte a mailbox locks: a 62-bit mix of its Maildir's device and
    inode (splitmix64), the same in every process and Python version.  Two
    mailboxes share a byte with odds ~n²/2^63 for n mailboxes open at once."""
    z = (st_ino + st_dev * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & _OFFSET_MASK


def default_table_path() -> str:
    """Where the host's fastpop processes meet: /run/fastpop for root, else a
    directory of the user's own (XDG_RUNTIME_DIR, or one in the temp dir)."""
    if os.geteuid() == 0:
        return "/run/fastpop/mailbox.locks"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "fastpop", "mailbox.locks")
    return os.path.join(tempfile.gettempdir(), f"fastpop-{os.geteuid()}", "mailbox.locks")


SHARDS = MAILBOX_LOCK_SHARDS  # the table's files: part of its layout on disk (every fastpop of the host agrees)
SHARD_DIR_SUFFIX = ".shards"  # the shards live in "<lock_table>.shards/00" .. "ff"


def shard_of(offset: int) -> int:
    """The shard file a mailbox's lock lives in (``offset`` is its ``slot``)."""
    return offset % SHARDS


def shard_directory(path: str) -> str:
    return path + SHARD_DIR_SUFFIX


def _check_directory(directory: str) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        # whoever may write the directory may swap the table for another file, and
        # then two processes hold the same mailbox (/tmp/fastpop-UID made first by another user)
        raise PermissionError(
            f"lock table directory {directory} must be a directory of uid {os.geteuid()} (or root) "
            "that nobody else may write"
        )


def _open_file(path: str, dir_fd: int | None = None) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)  # someone else's file could let them hold every mailbox
        raise PermissionError(f"lock table {path} must be a regular file owned by uid {os.geteuid()}")
    return fd


def _open_table(path: str) -> int:
    """The single file of the unsharded table (asked, never locked), and the
    shards' directory made ready."""
    _check_directory(os.path.dirname(path) or ".")
    fd = _open_file(path)
    try:
        _check_directory(shard_directory(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


class TableLock:
    """Held from login to logout; ``release`` is idempotent."""

    __slots__ = ("_table", "_slot")

    def __init__(self, table: LockTable, slot: int) -> None:
        self._table: LockTable | None = table
        self._slot = slot

    def release(self) -> None:
        table = self._table
        if table is not None:
            self._table = None
            table._release(self._slot)


class LockTable:
    """``[mail] lock = "table"``: per-host files of OFD byte-range locks.

    The kernel keeps the byte-range locks of a file in one list and walks it
    on every lock and unlock: with every session's lock in one file a
    lock+unlock cost 0.016 ms with 1,000 sessions held and 14 ms with
    100,000.  So the table is ``SHARDS`` files, a mailbox's lock living in
    the one its slot picks (``shard_of``), and each list holds ~1/256 of
    the sessions (benchmarks/lock_table.py).  Each process keeps the shards
    open: all 256 from the start (before a server drops privileges) when its
    descriptor limit is 578 or more, with the old file below 257 descriptors
    whatever the sessions.  Under a smaller limit it is frugal: a shard is
    open only while one of its sessions holds a lock there, and the old file
    only while it is asked, so it never needs more descriptors than it has
    sessions.

    The single file of older versions (``path`` itself) is still opened and
    asked (F_OFD_GETLK, never locked) at each login, so a mailbox that an
    older fastpop of the host holds is refused here too (docs/operations.md,
    upgrading); once no older version runs its list is empty and the
    question costs one system call.

    Opened per process (after a fork: a forked child sharing its parent's
    open file descriptions would share its locks too, so the child's first
    ``acquire`` reopens them)."""

    method = "table"

    def __init__(self, path: str | None = None) -> None:
        if _OFD_SETLK is None or _OFD_GETLK is None:
            raise OSError("the lock table needs OFD locks (Linux); use [mail] lock = \"symlink\"")
        self._setlk: int = _OFD_SETLK
        self._getlk: int = _OFD_GETLK
        self.path = path or default_table_path()
        self._legacy = -1
        self._shards: list[int] = [-1] * SHARDS  # -1: not open
        self._counts: list[int] = [0] * SHARDS  # this process's locks per shard (frugal: to close idle ones)
        self._open_files()
        self._forked = False  # set in a forked child (not asked per login: getpid is a system call)
        self._held: set[int] = set()  # this process's slots
        self._closed = False
        _tables.add(self)

    def acquire(self, maildir: str) -> TableLock:
        st = os.lstat(maildir)  # FileNotFoundError: the caller creates the Maildir
        _check_maildir(st, maildir)
        if self._forked:
            self._reopen()
        offset = slot(st.st_dev, st.st_ino)
        if offset in self._held:
            raise MailboxLocked(maildir)
        index = shard_of(offset)
        shard = self._shard(index)
        try:
            try:
                fcntl.fcntl(shard, self._setlk, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
            except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: another process holds it
                raise MailboxLocked(maildir) from None
            try:
                older = self._held_by_older(offset)
            except BaseException:
                fcntl.fcntl(shard, self._setlk, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
                raise
            if older:  # by a fastpop of an older version
                fcntl.fcntl(shard, self._setlk, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
                raise MailboxLocked(maildir)
        except BaseException:
            self._maybe_close(index)
            raise
        self._held.add(offset)
        self._counts[index] += 1
        if faults.ACTIVE:
            faults.hit("lock.after_create")
        return TableLock(self, offset)

    def _release(self, offset: int) -> None:
        if offset in self._held and not self._forked:
            self._held.discard(offset)
            index = shard_of(offset)
            self._counts[index] -= 1
            fcntl.fcntl(self._shards[index], self._setlk, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
            self._maybe_close(index)

    def _open_files(self) -> None:
        """Up front: the old single file and every shard.  Frugal (a descriptor
        limit under 578): only the checks, then each file when needed."""
        self._frugal = not lock_shards_up_front(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._legacy = _open_table(self.path)
        if self._frugal:
            os.close(self._legacy)  # opened for each question instead
            self._legacy = -1
            return
        try:
            for i in range(SHARDS):
                self._shard(i)
        except BaseException:
            self._close_files()
            raise

    def _shard(self, index: int) -> int:
        fd = self._shards[index]
        if fd < 0:  # OSError (EMFILE): the login fails with [SYS/TEMP]
            fd = self._shards[index] = _open_file(os.path.join(shard_directory(self.path), f"{index:02x}"))
        return fd

    def _maybe_close(self, index: int) -> None:
        """Frugal: a shard in which this process holds no lock is closed (closing
        it drops nothing), so its descriptors never outnumber its sessions."""
        if self._frugal and not self._counts[index] and self._shards[index] >= 0:
            os.close(self._shards[index])
            self._shards[index] = -1

    def _held_in(self, fd: int, offset: int) -> bool:
        got = fcntl.fcntl(fd, self._getlk, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK

    def _held_by_older(self, offset: int) -> bool:
        if self._legacy >= 0:
            return self._held_in(self._legacy, offset)
        fd = _open_file(self.path)
        try:
            return self._held_in(fd, offset)
        finally:
            os.close(fd)

    def _close_files(self) -> None:
        for fd in (self._legacy, *self._shards):
            if fd >= 0:
                os.close(fd)  # only this process's reference: a parent's locks stay
        self._legacy, self._shards, self._counts = -1, [-1] * SHARDS, [0] * SHARDS

    def _reopen(self) -> None:
        self._close_files()
        self._open_files()
        self._forked = False
        self._held = set()

    def holder(self, maildir: str) -> bool:
        """Whether any process of this host holds ``maildir`` (for tests and tools)."""
        st = os.stat(maildir)
        offset = slot(st.st_dev, st.st_ino)
        if offset in self._held and not self._forked:
            return True
        index = shard_of(offset)
        try:
            return self._held_in(self._shard(index), offset) or self._held_by_older(offset)
        finally:
            self._maybe_close(index)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_files()  # drops every lock this process holds
            self._held.clear()


_tables: weakref.WeakSet[LockTable] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for table in _tables:
        table._forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def mailbox_locks(method: str = "table", table_path: str | None = None,
                  stale_after: float = DEFAULT_STALE_AFTER) -> LockTable | SymlinkLocks:
    """The locks of ``[mail] lock`` (``table`` or ``symlink``)."""
    if method == "table":
        return LockTable(table_path)
    if method == "symlink":
        return SymlinkLocks(stale_after)
    raise ValueError(f"mail lock must be 'table' or 'symlink', not {method!r}")
