"""Maildir++ quota (``maildirsize``), as Dovecot's and Courier's quota keep
it: after POP3 deletions fastpop appends one line ``-<bytes> -<count>``, as
Dovecot's quota-maildir.c does for an expunge, so their count of the user's
usage stays right without a recalculation.

Only a ``maildirsize`` that exists is updated (no quota configured: no file,
nothing to do).  The file is the user's to write: it is opened relative to
the Maildir's descriptor, never through a link, without blocking on a FIFO,
and must be a regular file (served as root, the owner's); the line is
written by one ``write`` with O_APPEND, as the Maildir++ specification asks
of every writer.  (Deliveries add their line in fastpop.delivery.local.)  A message's
size is the ``S=`` of its name when it has one, else its file size: what
Dovecot counts when it recalculates.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time

from fastpop.store import safefs
from fastpop.store.durable import write_and_sync

log = logging.getLogger("fastpop.maildir")

MAILDIRSIZE = "maildirsize"


def quota_size(name: str, file_size: int) -> int:
    """The size Maildir++ counts for a message: S= of its name, else the file's."""
    for field in name.split(":", 1)[0].split(",")[1:]:
        # ASCII: str.isdigit() also takes digits such as "²", which int() refuses; at most
        # MAX_DIGITS, or the line written for it would be one _usage skips
        if field.startswith("S=") and field[2:].isascii() and field[2:].isdigit() and len(field) <= 2 + MAX_DIGITS:
            return int(field[2:])
    return file_size


def record_removed(maildir_fd: int, size: int, count: int, owner: int, where: str = "") -> None:
    """Append ``-size -count`` to the Maildir's maildirsize if there is one
    (a regular file; as root, only the owner's: a hard link to another
    user's file is not written).  Failures are logged: the quota's next
    recalculation corrects them."""
    if count <= 0:
        return
    try:
        fd, st = safefs.open_regular(maildir_fd, MAILDIRSIZE, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot update %s/%s: %s", where, MAILDIRSIZE, exc.strerror)
        return
    try:
        if os.geteuid() == 0 and st.st_uid != owner:
            log.warning("not updating %s/%s: owned by uid %d, served as uid %d", where, MAILDIRSIZE, st.st_uid, owner)
            return
        os.write(fd, f"{-size} {-count}\n".encode())
    except OSError as exc:
        log.warning("cannot update %s/%s: %s", where, MAILDIRSIZE, exc.strerror)
    finally:
        os.close(fd)


# -- enforcing the quota at delivery (fastpop.delivery.local)

# Maildir++: a maildirsize larger than this is recalculated (its lines only grow) ...
RECALC_BYTES = 5120
# ... and so is one that says "over quota" when it is older than this (it may count mail since removed).
RECALC_AGE = 15 * 60
# A larger file is not read: a user who can write it must not make delivery read gigabytes.
MAX_MAILDIRSIZE_BYTES = 1024 * 1024
# A number in the file: ASCII digits that fit in 64 bits, as Dovecot's and Courier's strtoll read
# them.  Longer ones are the user's garbage: their sum could outgrow what int() will print.
MAX_DIGITS = 18
_NUMBER = re.compile(rb"-?[0-9]{1,%d}" % MAX_DIGITS)


def parse_limits(header: str) -> tuple[int, int]:
    """(bytes, messages) of a maildirsize first line such as ``1000000S,1000C``;
    0 means no limit of that kind.  ValueError if it is not one."""
    size = count = 0
    for part in header.strip().split(","):
        if not part:
            continue
        number, kind = part[:-1], part[-1:]
        if not (number.isascii() and number.isdigit()) or len(number) > MAX_DIGITS or kind not in ("S", "C"):
            raise ValueError(f"not a Maildir++ quota definition: {header!r}")
        if kind == "S":
            size = int(number)
        else:
            count = int(number)
    return size, count


def _usage(lines: list[bytes]) -> tuple[int, int]:
    size = count = 0
    for line in lines:
        fields = line.split()
        # a line that is not two such numbers is skipped, as a broken line is
        if len(fields) >= 2 and _NUMBER.fullmatch(fields[0]) and _NUMBER.fullmatch(fields[1]):
            size += int(fields[0])
            count += int(fields[1])
    return size, count


def _open_dir(dir_fd: int, name: str) -> int:
    """A subdirectory (one name) of an open directory, never through a link."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _count_folder(dir_fd: int, size: int, count: int) -> tuple[int, int]:
    for sub in ("cur", "new"):
        try:
            sub_fd = _open_dir(dir_fd, sub)
        except OSError:
            continue
        try:
            with os.scandir(sub_fd) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        file_size = entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
                    size += quota_size(entry.name, file_size)
                    count += 1
        finally:
            os.close(sub_fd)
    return size, count


def recalculate(maildir_fd: int) -> tuple[int, int]:
    """(bytes, messages) of the Maildir and its Maildir++ folders (``.Name/``),
    counted from the files, never through a link: what Dovecot and Courier count."""
    size, count = _count_folder(maildir_fd, 0, 0)
    with os.scandir(maildir_fd) as it:
        folders = [e.name for e in it if e.name.startswith(".") and e.name not in (".", "..")
                   and e.is_dir(follow_symlinks=False)]
    for name in folders:
        try:
            fd = _open_dir(maildir_fd, name)
        except OSError:
            continue
        try:
            size, count = _count_folder(fd, size, count)
        finally:
            os.close(fd)
    return size, count


def _rewrite(maildir_fd: int, header: str, size: int, count: int, owner: int) -> None:
    """Replace maildirsize with its header and one line (Maildir++: written in
    tmp/, fsync'ed and renamed over it)."""
    tmp_fd = _open_dir(maildir_fd, "tmp")
    try:
        name = f"maildirsize.{secrets.token_hex(8)}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=tmp_fd)
        try:
            try:
                if os.geteuid() == 0 and owner > 0:
                    os.fchown(fd, owner, -1)
                # on disk before the rename: after a power cut the new name must not
                # stand for an empty file, which would drop the header, the user's quota
                write_and_sync(fd, f"{header}\n{size} {count}\n".encode("ascii"))
            finally:
                os.close(fd)
            os.rename(name, MAILDIRSIZE, src_dir_fd=tmp_fd, dst_dir_fd=maildir_fd)
        except BaseException:
            try:
                os.unlink(name, dir_fd=tmp_fd)
            except OSError:
                pass
            raise
    finally:
        os.close(tmp_fd)


def over_quota(maildir_fd: int, size: int, owner: int, where: str = "") -> str | None:
    """Why a new message of ``size`` bytes would put the Maildir over its
    Maildir++ quota, or None if it fits (or there is no ``maildirsize``:
    no quota is enforced without one).  A file that is large, or that says
    "over" and is older than 15 minutes, is recalculated first, as the
    Maildir++ specification asks.  A file that cannot be read or parsed
    enforces nothing (logged): a broken quota file must not bounce mail."""
    try:
        fd, st = safefs.open_regular(maildir_fd, MAILDIRSIZE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("not checking the quota of %s: %s", where, exc.strerror)
        return None
    try:
        if os.geteuid() == 0 and st.st_uid != owner:
            log.warning("not checking the quota of %s: maildirsize owned by uid %d", where, st.st_uid)
            return None
        data = os.read(fd, MAX_MAILDIRSIZE_BYTES + 1)
    except OSError as exc:
        log.warning("not checking the quota of %s: %s", where, exc.strerror)
        return None
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    header = lines[0].decode("ascii", "replace").strip()
    try:
        limit_size, limit_count = parse_limits(header)
    except ValueError as exc:
        log.warning("not checking the quota of %s: %s", where, exc)
        return None
    if not limit_size and not limit_count:
        return None
    used_size, used_count = _usage(lines[1:])

    def over(used_size: int, used_count: int) -> str | None:
        if limit_size and used_size + size > limit_size:
            return f"{used_size} + {size} bytes over the quota of {limit_size}"
        if limit_count and used_count + 1 > limit_count:
            return f"{used_count} messages, the quota is {limit_count}"
        return None

    reason = over(used_size, used_count)
    if len(data) > RECALC_BYTES or (reason is not None and time.time() - st.st_mtime > RECALC_AGE):
        # One recalculation per Maildir at a time: its user can keep the file
        # large and the Maildir huge, and every delivery to it would otherwise
        # scan it in a store thread of its own, until no thread is left for
        # anyone else's mail.  Meanwhile the file's own figures stand.
        folder = os.fstat(maildir_fd)
        key = (folder.st_dev, folder.st_ino)
        with _recalculating_lock:
            busy = key in _recalculating
            _recalculating.add(key)
        if busy:
            return reason
        try:
            used_size, used_count = recalculate(maildir_fd)
            _rewrite(maildir_fd, header, used_size, used_count, owner)
        except OSError as exc:
            log.warning("cannot recalculate the quota of %s: %s", where, exc.strerror)
        finally:
            with _recalculating_lock:
                _recalculating.discard(key)
        reason = over(used_size, used_count)
    return reason


_recalculating: set[tuple[int, int]] = set()  # (st_dev, st_ino) of Maildirs being recalculated
_recalculating_lock = threading.Lock()
