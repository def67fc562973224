"""Thread pools for a session's blocking work that must neither run in the
event loop nor wait behind logins (asyncio's default executor, where logins
open mailboxes): each kind has its own, so one user's slow work of one kind
holds up only that kind.  A pool is made at first use, so in a worker after
its fork, and forgotten in a forked child, which has none of its parent's
threads."""

from __future__ import annotations

import concurrent.futures
import os


class LazyPool:
    """Call it for the process's pool: ``threads`` at most, made as needed."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads = threads
        self.name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def __call__(self) -> concurrent.futures.ThreadPoolExecutor:
        pool = self._pool
        if pool is None:
            pool = self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
        return pool

    def _forget(self) -> None:
        self._pool = None


# cur/ listings for messages renamed under a session (RETR/TOP): a user may make cur/ huge
listing_pool = LazyPool(2, "fastpop-cur-listing")
# octet counts of large messages changed since indexed: a user may make one as
# large as the file system allows, which must not hold up the listings
counting_pool = LazyPool(2, "fastpop-retr-count")
# the UPDATE state's file work (fastpop.session.update): an fsync on a stalled
# disk must not delay logins, nor wait behind a user's listing
update_pool = LazyPool(4, "fastpop-update")
