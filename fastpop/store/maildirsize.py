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

from fastpop.store import safefs

log = logging.getLogger("fastpop.maildir")

MAILDIRSIZE = "maildirsize"


def quota_size(name: str, file_size: int) -> int:
    """The size Maildir++ counts for a message: S= of its name, else the file's."""
    for field in name.split(":", 1)[0].split(",")[1:]:
        if field.startswith("S=") and field[2:].isdigit():
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
