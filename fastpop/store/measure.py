"""Measuring a message file at indexing: its POP3 size (what RETR sends,
CRLF line ends and the end's CRLF counted), its file size and whether any
line starts with "." (fastpop.store.index.FLAG_NO_DOT_LINES), read once
through one bounded buffer (fastpop.wire.stuffing.scan_file).

The file and its name are the user's: opened relative to cur/'s descriptor,
never through a link, only a regular file (as root, only the owner's); a
``W=`` in the name is believed only where a file of this size could have it.
"""

from __future__ import annotations

import errno
import logging
import os
import re

from fastpop.store import safefs
from fastpop.store.index import FLAG_NO_DOT_LINES, FLAG_STORED_AS_SENT
from fastpop.wire.stuffing import scan_file

log = logging.getLogger("fastpop.maildir")

_VSIZE = re.compile(r",W=([0-9]+)")


def measure(cur_fd: int, name: str, owner: int, where: str = "cur") -> tuple[int, int, int] | None:
    """(POP3 size, file size, flags) of cur/name; None if it vanished, is
    unreadable, is not a regular file or (served as root) not the owner's.

    W= in the name is the CRLF size, but writers (Dovecot among them) do not
    count the CRLF that RETR adds to a message lacking a final newline, so
    the last byte is checked; without W= the size is counted.  Either way the
    file is read once, through one bounded buffer, up to its first line
    starting with "." (to the end if it has none, or without W=): a message
    without one goes out with no scan at RETR (index.FLAG_NO_DOT_LINES).
    """
    try:
        fd, st = safefs.open_regular(cur_fd, name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("skipping message %s/%s: %s", where, name, exc.strerror)
        return None
    try:
        if os.geteuid() == 0 and st.st_uid != owner:  # (root reads anything: the owner decides)
            log.warning("skipping message %s/%s: owned by uid %d, served as uid %d", where, name, st.st_uid, owner)
            return None
        file_size = st.st_size
        m = _VSIZE.search(name)
        colon = name.find(":")
        virtual = int(m.group(1)) if m is not None and (colon < 0 or m.start() < colon) else -1  # not the flags'
        # The name is the user's to choose: a W= no file of this size can have (each
        # octet becomes at most two) would be announced by STAT and LIST, and one past
        # 2^64 cannot even be indexed; such a file is counted instead.
        if file_size <= virtual <= 2 * file_size:
            size = virtual
            _, dots, last = scan_file(fd, file_size, count_size=False)
            if size > 0:
                if last < 0:  # the scan stopped at a dot line: the last byte is read by itself
                    tail = os.pread(fd, 1, file_size - 1)
                    last = tail[0] if tail else -1
                if last != 10:
                    size += 2
        else:
            size, dots, _ = scan_file(fd, file_size)
    except OSError as exc:
        log.warning("skipping unreadable message %s/%s: %s", where, name, exc.strerror)
        return None
    finally:
        os.close(fd)
    # Equal sizes mean no bare LF and a final CRLF: the file is what RETR sends.
    flags = FLAG_STORED_AS_SENT if size == file_size else 0
    return size, file_size, flags if dots else flags | FLAG_NO_DOT_LINES
