"""One POP3 session per mailbox, with a lock that holds no descriptor.

The lock is a file, ``fastpop.lock`` in the Maildir, created with O_EXCL and
naming its owner: host, boot, process id and process start time.  A session
holds nothing open while it idles, so a worker can keep ~19,000 logged-in
sessions within a 20,000-descriptor limit (an fcntl lock would need one
descriptor per session).  O_EXCL creation is atomic on local filesystems and
NFSv3+, so the lock also works between hosts sharing a store.

A lock whose owner is gone is stale and may be taken over:
- same host and boot: the owning process no longer exists, is a zombie, or
  its pid now belongs to a process started at another time;
- same host, another boot: the host has restarted since;
- another host: the file is older than ``stale_after`` seconds (we cannot
  see that host's processes; see docs/deploy.md);
- empty (the owner died between create and write): older than a few seconds.
Taking over happens under a short flock(2) on the Maildir directory, so two
sessions that both find a lock stale cannot both win.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from fastpop import faults

LOCK_FILE = "fastpop.lock"
EMPTY_GRACE = 10.0  # seconds an empty lock file is presumed to be being written
DEFAULT_STALE_AFTER = 3600.0  # seconds after which another host's lock is presumed dead

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


class MailboxLocked(Exception):
    """Another session holds this mailbox."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


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


_HOST = socket.gethostname()
_BOOT = _boot_id()
_identity: tuple[int, bytes] = (0, b"")


def _owner_line() -> bytes:
    """This process's owner line; recomputed after a fork (workers)."""
    global _identity
    pid = os.getpid()
    if _identity[0] != pid:
        _identity = (pid, f"{pid} {_start_time(pid) or 0} {_BOOT} {_HOST}\n".encode())
    return _identity[1]


def is_stale(content: bytes, mtime: float, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    """Whether a lock file with this content and mtime belongs to nobody alive."""
    age = time.time() - mtime
    parts = content.split()
    if len(parts) != 4:
        return age > EMPTY_GRACE  # being written, or torn by a crash
    pid, start, boot, host = (p.decode(errors="replace") for p in parts)
    if host != _HOST:
        return age > stale_after
    if boot != _BOOT:
        return True
    return not pid.isdigit() or _start_time(int(pid)) != start


def _read(path: str) -> tuple[bytes, float] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 512), os.fstat(fd).st_mtime
    finally:
        os.close(fd)


class MailboxLock:
    """Held from login to logout; ``release`` removes the file if still ours."""

    __slots__ = ("_path",)

    def __init__(self, maildir: str, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        self._path = os.path.join(maildir, LOCK_FILE)
        try:
            self._create()
        except FileExistsError:
            self._take_over(maildir, stale_after)

    def _create(self) -> None:
        fd = os.open(self._path, _CREATE, 0o600)
        try:
            if faults.ACTIVE:
                faults.hit("lock.after_create")
            os.write(fd, _owner_line())
        except BaseException:
            os.unlink(self._path)  # never leave a lock nobody owns
            raise
        finally:
            os.close(fd)

    def _take_over(self, maildir: str, stale_after: float) -> None:
        seen = _read(self._path)
        if seen is not None and not is_stale(*seen, stale_after):
            raise MailboxLocked(maildir)
        dir_fd = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # held for a few system calls only
            seen = _read(self._path)  # again: another session may have won
            if seen is not None:
                if not is_stale(*seen, stale_after):
                    raise MailboxLocked(maildir)
                os.unlink(self._path)
            try:
                self._create()
            except FileExistsError:
                raise MailboxLocked(maildir) from None
        finally:
            os.close(dir_fd)  # drops the flock

    def release(self) -> None:
        path = self._path
        if not path:
            return
        self._path = ""
        try:
            seen = _read(path)
            # Ours only if it still names us: after a takeover (we were presumed
            # dead) the new file may even reuse our inode number.
            if seen is not None and seen[0] == _owner_line():
                os.unlink(path)
        except FileNotFoundError:
            pass  # removed by hand meanwhile
