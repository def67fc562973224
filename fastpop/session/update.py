"""The UPDATE state's file work (RFC 1939 section 6), off the event loop.

A QUIT that deletes messages unlinks them and fsyncs cur/, and may rename
messages (``[pop3] seen_on_retr``, ``deleted_flag``), list cur/ for messages
renamed under the session, and write the EXPIRE record.  An fsync waits for
the disk (tens of milliseconds while other programs write, more on a busy
array) and a listing takes as long as the user makes cur/: in the event loop
either would hold every session of the worker.  So the work runs in a pool
of its own while the session waits; its reply is sent once the work is done,
and the mailbox stays locked until then, even if the client leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastpop.store import expire

if TYPE_CHECKING:
    from fastpop.store.maildir import Mailbox


def apply_update(mailbox: Mailbox, deleted_flags: bytearray, deleted: list[int]) -> tuple[int, bool]:
    """Delete ``deleted`` (and, with EXPIRE, what it adds or records), flag
    what was retrieved \\Seen: (messages that could not be removed, whether
    any was to be deleted).  Blocking: run in fastpop.session.pools.update_pool."""
    if mailbox.expire_days is not None:  # EXPIRE 0 deletes what was retrieved; else it is recorded
        deleted = expire.at_quit(mailbox, deleted_flags, deleted)
    # lock_wait 0: a dovecot-keywords.lock the user planted must not hold a thread ([pop3] deleted_flag)
    failed = mailbox.delete(deleted, 0.0) if deleted else 0
    mailbox.apply_seen(deleted_flags)  # [pop3] seen_on_retr: renames in cur/, never a deletion
    return failed, bool(deleted)


def marked(flags: bytearray, count: int) -> list[int]:
    """Indexes of the set bytes, found at C speed (a mailbox may hold 100,000)."""
    out: list[int] = []
    i = flags.find(1)
    while i >= 0 and len(out) < count:
        out.append(i)
        i = flags.find(1, i + 1)
    return out
