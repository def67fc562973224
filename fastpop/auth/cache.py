"""The auth cache: recent user database answers, as Dovecot's auth_cache_*.

It holds what the database said, never a verdict: a cached user keeps its
stored ``{SCHEME}`` password and every login is checked against it again, so
a user name alone never logs anyone in.  "No such user" answers are kept for
the (shorter) negative TTL.  When a password does not match the cached
hash, the caller asks the database again (``fastpop.auth.authenticator``), so a changed
password works at once and the old one stops working within the TTL.

Bounded in entries (least recently used goes first); ``flush`` empties it
(SIGHUP, ``fastpop user flush``).  Only the network drivers use it: the
passwd-file is in memory already.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from fastpop.auth.passwd_file import UserRecord

MISSING = object()  # not in the cache (None is a cached "no such user")


class AuthCache:
    def __init__(self, size: int, ttl: float, negative_ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._entries: OrderedDict[object, tuple[float, UserRecord | None]] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def get(self, key: object) -> UserRecord | None | object:
        """The cached record, None for a cached "no such user", or MISSING."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return MISSING
        expires, record = entry
        if self._clock() >= expires:
            del self._entries[key]
            self.misses += 1
            return MISSING
        self._entries.move_to_end(key)
        self.hits += 1
        return record

    def put(self, key: object, record: UserRecord | None) -> None:
        if self.size <= 0:
            return
        ttl = self.ttl if record is not None else self.negative_ttl
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock() + ttl, record)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, key: object) -> None:
        self._entries.pop(key, None)

    def flush(self) -> int:
        """Empty the cache; returns how many entries there were."""
        n = len(self._entries)
        self._entries.clear()
        return n

    def __len__(self) -> int:
        return len(self._entries)
