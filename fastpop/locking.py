"""One POP3 session per mailbox, with a lock that holds no descriptor.

The lock is a symbolic link, ``fastpop.lock`` in the Maildir, whose target
names its owner: process id, process start time, boot and host.  symlink(2)
creates it atomically (it fails if the name exists, also over NFS) and needs
no data block, so a login works on a full disk or quota, when POP3 is how a
user makes room; there is no moment at which the lock exists but names
nobody.  A session holds nothing open while it idles, so a worker can keep
~19,000 logged-in sessions within a 20,000-descriptor limit (an fcntl lock
would need one descriptor per session).

A lock whose owner is gone is stale and may be taken over:
- same host and boot: the owning process no longer exists, is a zombie, or
  its pid now belongs to a process started at another time;
- same host, another boot: the host has restarted since;
- another host: the link is older than ``stale_after`` seconds (we cannot
  see that host's processes; see docs/deploy.md);
- not a link (a file left by something else): at once.
Taking over happens under a short flock(2) on the Maildir directory, so two
sessions of this host that both find a lock stale cannot both win.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
import zlib

from fastpop import faults

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
    return not pid.isdigit() or _start_time(int(pid)) != start


def _read(path: str) -> tuple[str | None, float] | None:
    """(owner, or None if not a link; mtime), or None if there is no lock."""
    try:
        name: str | None = os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError:  # EINVAL: a plain file
        name = None
    if name is not None and name.endswith("@" + _HOST):
        return name, 0.0  # this host's: decided by its process, not by age
    try:
        return name, os.lstat(path).st_mtime
    except FileNotFoundError:
        return None


class MailboxLock:
    """Held from login to logout; ``release`` removes the link if still ours."""

    __slots__ = ("_path",)

    def __init__(self, maildir: str, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        self._path = os.path.join(maildir, LOCK_FILE)
        try:
            self._create()
        except FileExistsError:
            self._take_over(maildir, stale_after)

    def _create(self) -> None:
        os.symlink(owner(), self._path)
        if faults.ACTIVE:
            faults.hit("lock.after_create")

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
            # Ours only if it still names us (after a takeover, because we were
            # presumed dead, it names the new owner).
            if os.readlink(path) == owner():
                os.unlink(path)
        except (FileNotFoundError, OSError):
            pass  # removed by hand meanwhile, or replaced by a plain file
