"""Dovecot's ``dovecot-keywords``: which Maildir info letter (``a`` to ``z``)
stands for which IMAP keyword, for ``[pop3] deleted_flag`` (Dovecot's
``pop3_deleted_flag``): a POP3-deleted message gets the keyword instead of
being removed, and POP3 no longer shows it; IMAP users keep it.

Format (src/lib-storage/index/maildir/maildir-keywords.c): one line per
keyword, ``<index> <name>``, index 0-25 for letters a-z.  A writer takes
``dovecot-keywords.lock`` (O_EXCL), writes the whole new file into the lock
file and renames it over ``dovecot-keywords``, as Dovecot's
file_dotlock_open/file_dotlock_replace do; a lock unchanged for two minutes
is stale.  The file is the user's to write: read bounded and without
following a link; lines Dovecot would skip are skipped.
"""

from __future__ import annotations

import errno
import os
import re
import time

from fastpop.store import safefs
from fastpop.store.durable import write_and_sync

KEYWORDS = "dovecot-keywords"
LOCK = KEYWORDS + ".lock"
MAX_KEYWORDS = 26  # Dovecot's MAILDIR_MAX_KEYWORDS: letters a-z
MAX_BYTES = 64 * 1024
STALE_SECONDS = 120  # Dovecot's KEYWORDS_LOCK_STALE_TIMEOUT
LOCK_WAIT = 10.0
# An IMAP flag-keyword (RFC 3501 atom, no "\"): what Dovecot accepts as a keyword
VALID_KEYWORD = re.compile(r"[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]{1,64}")


class KeywordsLocked(OSError):
    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, "dovecot-keywords is locked by another process", LOCK)


def read(dir_fd: int) -> dict[str, int]:
    """{keyword: index} from the Maildir's dovecot-keywords ({} if absent).
    OSError if it is not a readable regular file."""
    try:
        fd, st = safefs.open_regular(dir_fd, KEYWORDS)
    except FileNotFoundError:
        return {}
    try:
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise OSError(errno.EFBIG, "dovecot-keywords is too large", KEYWORDS)
    slots: dict[int, str] = {}  # as Dovecot's array: index -> name
    seen: set[str] = set()
    for line in data.decode("utf-8", "replace").split("\n"):
        index, sep, name = line.partition(" ")
        # as Dovecot: a bad, out-of-range or duplicate line is skipped
        # (ASCII digits: str.isdigit() also takes "²", which int() refuses)
        if (not sep or not name or not (index.isascii() and index.isdigit()) or len(index) > 2
                or int(index) >= MAX_KEYWORDS):
            continue
        if name in seen:
            continue
        seen.add(name)
        slots[int(index)] = name  # (an index given twice: the later line wins)
    return {name: i for i, name in slots.items()}


def letter(index: int) -> str:
    return chr(ord("a") + index)


def letter_for(dir_fd: int, keyword: str, owner: int | None = None, wait: float = LOCK_WAIT) -> str | None:
    """The info letter of ``keyword`` in this Maildir, added to dovecot-keywords
    under its lock if missing; None if all 26 are taken."""
    known = read(dir_fd)
    if keyword in known:
        return letter(known[keyword])
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            break
        except FileExistsError:
            try:
                age = time.time() - os.stat(LOCK, dir_fd=dir_fd, follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if age > STALE_SECONDS:
                try:
                    os.unlink(LOCK, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
                continue
            if time.monotonic() > deadline:
                raise KeywordsLocked() from None
            time.sleep(0.05)
    renamed = False
    try:
        if owner is not None and owner >= 0 and owner != os.geteuid():
            os.fchown(fd, owner, -1)  # it becomes dovecot-keywords, which Dovecot rewrites
        known = read(dir_fd)  # again, under the lock
        if keyword in known:
            return letter(known[keyword])
        free = [i for i in range(MAX_KEYWORDS) if i not in known.values()]
        if not free:
            return None
        known[keyword] = free[0]
        text = "".join(f"{i} {name}\n" for name, i in sorted(known.items(), key=lambda kv: kv[1]))
        write_and_sync(fd, text.encode())
        os.rename(LOCK, KEYWORDS, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        renamed = True
        return letter(free[0])
    finally:
        os.close(fd)
        if not renamed:
            try:
                os.unlink(LOCK, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
