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

import concurrent.futures
import os
from typing import TYPE_CHECKING

from fastpop.store import expire

if TYPE_CHECKING:
    from fastpop.store.maildir import Mailbox

# Not the pool logins open mailboxes in (an fsync on a stalled disk must not
# delay logins), nor the one RETR/TOP list cur/ in; threads are made as needed
UPDATE_THREADS = 4
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def update_pool() -> concurrent.futures.ThreadPoolExecutor:
    """This process's pool for UPDATE states (made at first use, so after a worker's fork)."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(UPDATE_THREADS, thread_name_prefix="fastpop-update")
    return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has none of its parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def apply_update(mailbox: Mailbox, deleted_flags: bytearray, deleted: list[int]) -> tuple[int, bool]:
    """Delete ``deleted`` (and, with EXPIRE, what it adds or records), flag
    what was retrieved \\Seen: (messages that could not be removed, whether
    any was to be deleted).  Blocking: run in update_pool()."""
    if mailbox.expire_days is not None:  # EXPIRE 0 deletes what was retrieved; else it is recorded
        deleted = expire.at_quit(mailbox, deleted_flags, deleted)
    # lock_wait 0: a dovecot-keywords.lock the user planted must not hold a thread ([pop3] deleted_flag)
    failed = mailbox.delete(deleted, 0.0) if deleted else 0
    mailbox.apply_seen(deleted_flags)  # [pop3] seen_on_retr: renames in cur/, never a deletion
    return failed, bool(deleted)
