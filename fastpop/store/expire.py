"""EXPIRE (RFC 2449 section 6.7): retrieved messages deleted after N days.

With ``[pop3] expire = N`` (or a user's own ``pop3_expire``/``expire``
field), a message RETR'd in a session that ended with QUIT is deleted N or
more days later: at the user's next login, before the mailbox is shown (so
the client never sees it), or by ``fastpop expire`` (a sweep run by cron or
a systemd timer, fastpop.serve.expire_cli).  ``EXPIRE 0`` deletes retrieved
messages at the QUIT itself.

When a message was retrieved is kept in a small per-mailbox record, beside
the index: ``fastpop.retrieved`` in the Maildir, or ``<hash>.retrieved`` in
the ``[mail] index`` directory when one is set (then out of the user's
reach).  One line per message, ``<unix seconds> <UIDL>``: the UIDL is what
survives renames by IMAP flag changes and index rebuilds.  Only a message
whose UIDL is in the record can ever be expired, so a message never retrieved
is never deleted; a user who edits a record in their own Maildir can only
delete their own mail.  The record is written only at a QUIT after a RETR by
a user with EXPIRE on, and read only at such a user's login when it exists:
a session without EXPIRE never touches it.  It is opened relative to the
Maildir's descriptor, never through a link, without blocking on a FIFO, and
must be a regular file (served as root, the owner's or root's); the Maildir
is opened anew for it and must still be the served uid's (at QUIT the user
may have swapped it for a link or a directory of root's since login); it is
replaced by a rename, and the caller holds the mailbox lock.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping

from fastpop.store import index as mindex
from fastpop.store import safefs
from fastpop.store.dovecot_uidlist import LOCK_WAIT
from fastpop.store.durable import replace_file
from fastpop.store.maildir import Mailbox

log = logging.getLogger("fastpop.expire")

RECORD_FILE = "fastpop.retrieved"
EXTERNAL_SUFFIX = ".retrieved"
DAY = 86400
# The user may write it: a larger one is not read (about 200,000 messages fit).
MAX_RECORD_BYTES = 16 * 1024 * 1024
# What one message's line can take: a time of up to 12 digits, a space, a UIDL
# of up to 70 octets (RFC 1939), a newline, and room to spare.
RECORD_LINE_BYTES = 96


def record_limit(messages: int) -> int:
    """The largest record a mailbox of ``messages`` can need: read at QUIT, in
    the event loop, so a user cannot make it cost more than their own mail."""
    return min(MAX_RECORD_BYTES, 4096 + messages * RECORD_LINE_BYTES)


def now() -> int:
    """The time retrievals are stamped with and compared to."""
    return int(time.time())


@functools.lru_cache(maxsize=64)  # twice per login, nearly always ``[pop3] expire`` itself
def parse_days(value: str) -> int | None:
    """'NEVER' -> None, '30' -> 30; ValueError otherwise."""
    text = value.strip().upper()
    if text == "NEVER":
        return None
    if text.isascii() and text.isdigit() and len(text) <= 6:
        return int(text)
    raise ValueError(f"EXPIRE must be NEVER or a number of days, not {value!r}")


def days_for(extra: Mapping[str, str] | None, default: str) -> int | None:
    """A user's EXPIRE days: the ``pop3_expire`` (or ``expire``) field of their
    user database record, else ``default`` (``[pop3] expire``).  A field that
    is not NEVER or a number counts as NEVER: a typo must not delete mail."""
    value = None
    if extra:
        value = extra.get("pop3_expire") or extra.get("expire")
    if value is None:
        return parse_days(default)
    try:
        return parse_days(value)
    except ValueError:
        log.warning("ignoring EXPIRE %r of a user database record: not NEVER or a number of days", value)
        return None


def capa_value(days: int | None) -> str:
    return "NEVER" if days is None else str(days)


def _where(maildir: str, owner: int) -> tuple[int, str, bool]:
    """(directory fd, file name, whether to close the fd) of the record.  The
    Maildir is opened anew, so it must still be a directory of ``owner``: the
    user may have put a link or another's directory in its place since login
    (PermissionError, ELOOP), and root must not write the record there."""
    external = mindex._directory
    if external is not None:
        return external[1], mindex.external_name(maildir) + EXTERNAL_SUFFIX, False
    fd, _ = safefs.open_maildir(maildir, owner)
    return fd, RECORD_FILE, True


def has_record(maildir: str) -> bool:
    """Whether the mailbox has a retrieval record (one lstat)."""
    external = mindex.directory()
    path = (external + "/" + mindex.external_name(maildir) + EXTERNAL_SUFFIX if external is not None
            else safefs.canonical_maildir(maildir) + "/" + RECORD_FILE)
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def read(maildir: str, owner: int, limit: int = MAX_RECORD_BYTES) -> dict[str, int]:
    """{UIDL: retrieval time} of the mailbox; {} when there is no record or it
    is larger than ``limit`` octets.  Lines that do not parse are skipped.
    ``owner``: the uid the mailbox is served as (Mailbox.owner)."""
    dir_fd, name, close = _where(maildir, owner)
    try:
        try:
            fd, st = safefs.open_regular(dir_fd, name)
        except FileNotFoundError:
            return {}
        try:
            if safefs.euid() == 0 and st.st_uid not in (0, owner):
                log.warning("ignoring %s of %s: owned by uid %d", name, maildir, st.st_uid)
                return {}
            if st.st_size > limit:
                log.warning("ignoring %s of %s: larger than %d bytes", name, maildir, limit)
                return {}
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if sum(map(len, chunks)) > limit:
                    return {}
        finally:
            os.close(fd)
    finally:
        if close:
            os.close(dir_fd)
    records: dict[str, int] = {}
    for line in b"".join(chunks).split(b"\n"):
        stamp, _, uidl = line.partition(b" ")
        if stamp.isdigit() and uidl and len(stamp) <= 12:
            text = uidl.decode("ascii", "replace")
            records.setdefault(text, int(stamp))
    return records


def write(maildir: str, owner: int, records: Mapping[str, int]) -> None:
    """Replace the record (a temporary file, fsync, rename); none if empty.
    ``owner``: the uid the mailbox is served as, whose Maildir it must still be."""
    dir_fd, name, close = _where(maildir, owner)
    try:
        if not records:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            return
        data = "".join(f"{stamp} {uidl}\n" for uidl, stamp in records.items()).encode("ascii", "replace")
        replace_file(dir_fd, name, data)
    finally:
        if close:
            os.close(dir_fd)


def at_quit(mailbox: Mailbox, deleted_flags: bytearray, deleted: list[int]) -> list[int]:
    """At QUIT (UPDATE state) of a session with EXPIRE on: the messages to
    delete.  EXPIRE 0 adds those retrieved in this session; otherwise their
    retrieval time goes into the record (an earlier one is kept) and the
    deletions are those the client asked for.  A record that cannot be
    written is logged: those messages are then simply not expired."""
    days = mailbox.expire_days
    retrieved = [i for i in mailbox.retrieved() if not deleted_flags[i]]
    if not retrieved:
        return deleted
    if days == 0:
        return sorted(deleted + retrieved)
    try:
        # (in the event loop: a record larger than the mailbox can need is not read)
        records = read(mailbox.path, mailbox.owner, record_limit(len(mailbox)))
        stamp = now()
        for i in retrieved:
            records.setdefault(mailbox.uidl(i), stamp)
        gone = {mailbox.uidl(i) for i in deleted}
        write(mailbox.path, mailbox.owner, {u: t for u, t in records.items() if u not in gone})
    except (OSError, ValueError) as exc:
        log.error("cannot record retrieved messages of %s: %s", mailbox.path, exc)
    return deleted


def expire(mailbox: Mailbox, days: int, when: int | None = None, lock_wait: float = LOCK_WAIT) -> int:
    """Delete the messages of ``mailbox`` retrieved ``days`` or more days ago
    (the caller holds the lock; the same path as DELE and QUIT) and prune
    the record to the messages still there.  Returns how many were deleted.
    ``lock_wait``: for dovecot-keywords.lock ([pop3] deleted_flag)."""
    records = read(mailbox.path, mailbox.owner)
    if not records:
        return 0
    limit = (now() if when is None else when) - days * DAY
    expired: list[int] = []
    kept: dict[str, int] = {}
    for i in range(len(mailbox)):
        uidl = mailbox.uidl(i)
        stamp = records.get(uidl)
        if stamp is None:
            continue
        if stamp <= limit:
            expired.append(i)
        else:
            kept[uidl] = stamp
    failed = mailbox.delete(expired, lock_wait) if expired else 0
    if failed:  # keep them in the record: the next login or sweep tries again
        kept = {**{mailbox.uidl(i): records[mailbox.uidl(i)] for i in expired}, **kept}
    if kept != records:
        write(mailbox.path, mailbox.owner, kept)
    if expired:
        log.info("expired path=%s messages=%d failed=%d days=%d", mailbox.path, len(expired), failed, days)
    return len(expired) - failed


def open_expired(path: str, owner: int, days: int, lock_wait: float = LOCK_WAIT) -> Mailbox:
    """Open the mailbox at login after expiring what is due (in a thread:
    the caller holds the lock).  The index is brought up to date again after
    deletions, so the client is shown the mailbox without them.
    ``lock_wait``: for Dovecot's locks (Mailbox.open); a login passes 0."""
    mailbox = Mailbox.open(path, owner, lock_wait)
    try:
        removed = expire(mailbox, days, lock_wait=lock_wait)
    except OSError as exc:  # expiring is not worth refusing the login: it is tried again next time
        log.warning("cannot expire messages of %s: %s", path, exc.strerror or exc)
        removed = 1  # something may have been removed: list the mailbox again
    if not removed:
        return mailbox
    mailbox.close()
    return Mailbox.open(path, owner, lock_wait)
