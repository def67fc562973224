"""Making writes survive a crash: the fsync steps Maildir delivery, the
index and deletions share."""

from __future__ import annotations

import errno
import os
import secrets


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


def replace_file(dir_fd: int, name: str, data: bytes, owner: int | None = None) -> None:
    """Replace ``name`` in ``dir_fd`` whole: ``data`` goes to a new file of an
    unpredictable name (O_EXCL|O_NOFOLLOW, 0600, given to ``owner`` when that is
    another uid), is fsync'ed and renamed over ``name``, so a reader sees the old
    file or the new one, never a part; a failed write leaves no temporary file."""
    tmp = f"{name}.tmp.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            if owner is not None and owner >= 0 and owner != os.geteuid():
                os.fchown(fd, owner, -1)
            write_and_sync(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
