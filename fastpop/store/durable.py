"""Making writes survive a crash: the fsync steps Maildir delivery, the
index and deletions share."""

from __future__ import annotations

import errno
import os


def write_and_sync(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (short writes continued), then fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory, so that names created, renamed or removed in it are
    on disk; file systems that cannot do it (EINVAL, ENOTSUP) are let be."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
