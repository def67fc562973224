"""One POP3 session per mailbox, enforced with an OS lock.

An open-file-description lock (F_OFD_SETLK) on ``fastpop.lock`` in the
Maildir: it conflicts across processes *and* within one process (a classic
POSIX lock does not, and closing any descriptor of the file would drop it),
and the kernel releases it if the process dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

LOCK_FILE = "fastpop.lock"

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = "hhqqi4x"
_WRITE_LOCK = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_SETLK = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)


class MailboxLocked(Exception):
    """Another session holds this mailbox."""


class MailboxLock:
    __slots__ = ("_fd",)

    def __init__(self, maildir: str) -> None:
        fd = os.open(os.path.join(maildir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.fcntl(fd, _SETLK, _WRITE_LOCK)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise MailboxLocked(maildir) from None
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the description releases the OFD lock
            self._fd = -1
