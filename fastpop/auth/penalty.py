"""Defence against password guessing: failure penalties and connection caps.

``PenaltyBox`` tracks failed logins per client address and per user name, as
Dovecot's auth penalty does: after failures, every further login attempt is
answered only after a delay of ``initial`` seconds doubling with each
failure up to ``maximum`` (2, 4, 8, 15, 15, ... by default).  The delay is
applied before the credentials are checked, so an attacker learns nothing
earlier by hanging up; it is a timer on the event loop, so nobody else waits.

- Failure counts decay: each halves every ``half_life`` seconds without a
  new failure, so a user who mistyped a password is soon back to no delay.
- Repeating the same wrong credentials (a client configured with an old
  password) does not raise the count again: the last few credential
  fingerprints per address are remembered, as Dovecot does.
- Memory is bounded: each table holds at most ``max_entries`` keys, the
  least recently failed dropped first; entries that decayed away are purged.
- IPv6 clients are tracked by /64 (one customer's whole prefix), IPv4 by
  address.
- Addresses in the trusted networks (webmail, proxies) are never penalised;
  the protocol does not ask for them.

With workers, the counts are shared (``SharedFailures``): a failure seen by
one worker delays the next attempt on any of them.  Open connections per
address (the same key) are counted by ``fastpop.limits.ConnectionTable``,
across workers.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Callable

RECENT_CREDENTIALS = 10  # per address: wrong credentials seen lately


class _Entry:
    __slots__ = ("count", "last", "recent")

    def __init__(self) -> None:
        self.count = 0.0
        self.last = 0.0
        self.recent: list[bytes] | None = None


class SharedFailures:
    """Failure counts shared by the workers of one server, so a guesser gets
    no more attempts for spreading them over workers.

    Memory shared before the fork holds one row per worker; a worker writes
    only its own row (``use_row``) and reads all of them.  A row is a hash
    table of ``BUCKETS`` buckets of ``WAYS`` slots, each slot a sequence
    number (a seqlock, as in LastLogins), a 64-bit keyed hash of the
    address or user name, a decaying count and the time it was last
    changed.  Counts decay at one rate, so the sum of the rows' decayed
    counts is the decayed total.  A full bucket drops its smallest count:
    a flood of new addresses evicts one-off failures, not a busy guesser.
    A success is written as a negative count cancelling the other rows'.
    """

    BUCKETS = 8192
    WAYS = 4
    _WORDS = 4  # per slot: sequence number, key, count (a double), time (a double)

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._stride = self.BUCKETS * self.WAYS * self._WORDS
        self._map = mmap.mmap(-1, workers * self._stride * 8, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._words = memoryview(self._map).cast("Q")
        self._floats = memoryview(self._map).cast("d")  # the same words, read as doubles
        self._row = 0
        self._hash_key = os.urandom(16)  # made before the fork: the same in every worker, unknown outside

    def use_row(self, worker: int) -> None:
        """In a worker: write into row ``worker``."""
        self._row = worker * self._stride

    def key(self, kind: bytes, name: str) -> int:
        digest = hashlib.blake2b(kind + b"\0" + name.encode("utf-8", "surrogateescape"),
                                 key=self._hash_key, digest_size=8).digest()
        return int.from_bytes(digest, "little") | 1  # never 0 (an empty slot)

    def _bucket(self, key: int) -> int:
        return (key >> 1) % self.BUCKETS * self.WAYS * self._WORDS

    def total(self, key: int, decay: Callable[[float, float], float]) -> float:
        """The decayed count of ``key`` summed over the workers (0 at least);
        ``decay(count, since)`` applies the half-life."""
        words, floats = self._words, self._floats
        bucket = self._bucket(key)
        total = 0.0
        for row in range(0, self.workers * self._stride, self._stride):
            for i in range(row + bucket, row + bucket + self.WAYS * self._WORDS, self._WORDS):
                seq = words[i]
                if seq & 1 or words[i + 1] != key:
                    continue  # being written (a miss), or another key
                count, last = floats[i + 2], floats[i + 3]
                if words[i] == seq:  # unchanged while read
                    total += decay(count, last)
                break
        return max(total, 0.0)

    def add(self, key: int, amount: float, now: float, decay: Callable[[float, float], float]) -> None:
        """Add ``amount`` to this worker's decayed count of ``key`` at ``now``
        (CLOCK_MONOTONIC: common to all processes)."""
        words, floats = self._words, self._floats
        start = self._row + self._bucket(key)
        slot = -1
        smallest = math.inf
        for i in range(start, start + self.WAYS * self._WORDS, self._WORDS):
            if words[i + 1] == key:
                slot = i
                break
            value = -math.inf if words[i + 1] == 0 else abs(decay(floats[i + 2], floats[i + 3]))
            if value < smallest:
                slot, smallest = i, value
        count = decay(floats[slot + 2], floats[slot + 3]) if words[slot + 1] == key else 0.0
        seq = words[slot]
        words[slot] = seq + 1  # odd: readers skip the slot
        words[slot + 1] = key
        floats[slot + 2] = count + amount
        floats[slot + 3] = now
        words[slot] = seq + 2

    def cancel(self, key: int, now: float, decay: Callable[[float, float], float]) -> None:
        """Bring the total of ``key`` to zero (a success clears a user's count)."""
        total = self.total(key, decay)
        if total > 0:
            self.add(key, -total, now, decay)


class PenaltyBox:
    def __init__(
        self,
        initial: float = 2.0,
        maximum: float = 15.0,
        half_life: float = 300.0,
        max_entries: int = 100_000,
        per_user: bool = True,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedFailures | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.half_life = half_life
        self.max_entries = max_entries
        self.per_user = per_user
        self.clock = clock
        self._ips: OrderedDict[str, _Entry] = OrderedDict()
        self._users: OrderedDict[str, _Entry] = OrderedDict()
        self._key = os.urandom(16)  # credential fingerprints are keyed: never a stored hash
        # Workers: counts in the shared rows; this process's tables still
        # remember the recent wrong credentials (and stay bounded by trimming).
        self.shared = shared

    def configure(self, initial: float, maximum: float, half_life: float, per_user: bool) -> None:
        """New settings (SIGHUP), keeping the failure counts."""
        self.initial, self.maximum, self.half_life, self.per_user = initial, maximum, half_life, per_user

    @property
    def enabled(self) -> bool:
        return self.initial > 0 and self.maximum > 0

    def _decayed(self, entry: _Entry, now: float) -> float:
        if self.half_life <= 0:
            return entry.count
        return entry.count * 0.5 ** ((now - entry.last) / self.half_life)

    def _seconds(self, count: float) -> float:
        n = math.floor(count + 0.5)  # a count decays continuously: round it
        if n <= 0:
            return 0.0
        if n > 60:
            return self.maximum
        return min(self.initial * 2.0 ** (n - 1), self.maximum)

    def _decay_at(self, now: float) -> Callable[[float, float], float]:
        half_life = self.half_life
        if half_life <= 0:
            return lambda count, last: count
        return lambda count, last: count * 0.5 ** ((now - last) / half_life)

    def failures(self, key: str, user: str | None = None) -> float:
        """The decayed failure count that decides the delay (the larger of the two)."""
        now = self.clock()
        shared = self.shared
        if shared is not None:
            decay = self._decay_at(now)
            count = shared.total(shared.key(b"a", key), decay)
            if self.per_user and user is not None:
                count = max(count, shared.total(shared.key(b"u", user), decay))
            return count
        count = 0.0
        entry = self._ips.get(key)
        if entry is not None:
            count = self._decayed(entry, now)
        if self.per_user and user is not None:
            entry = self._users.get(user)
            if entry is not None:
                count = max(count, self._decayed(entry, now))
        return count

    def delay(self, key: str, user: str | None = None) -> float:
        """Seconds to wait before checking this attempt's credentials."""
        if not self.enabled:
            return 0.0
        return self._seconds(self.failures(key, user))

    def failed(self, key: str, user: str | None, credentials: bytes | None = None) -> None:
        """Record a failed login from ``key`` naming ``user``."""
        if not self.enabled:
            return
        now = self.clock()
        fingerprint = None
        if credentials is not None:
            fingerprint = hashlib.blake2b(credentials, key=self._key, digest_size=8).digest()
        entry = self._bump(self._ips, key, now, fingerprint)
        if entry is None:
            return  # the same wrong credentials again: no higher penalty
        counted = user if self.per_user else None  # the user whose own count goes up too, if any
        if counted is not None:
            self._bump(self._users, counted, now, None)
        shared = self.shared
        if shared is not None:
            decay = self._decay_at(now)
            shared.add(shared.key(b"a", key), 1.0, now, decay)
            if counted is not None:
                shared.add(shared.key(b"u", counted), 1.0, now, decay)

    def succeeded(self, key: str, user: str) -> None:
        """A login succeeded: the user's own count is cleared (the address's decays)."""
        self._users.pop(user, None)
        shared = self.shared
        if shared is not None:
            now = self.clock()
            shared.cancel(shared.key(b"u", user), now, self._decay_at(now))

    def _bump(self, table: OrderedDict, name: str, now: float, fingerprint: bytes | None) -> _Entry | None:
        entry = table.get(name)
        if entry is None:
            self._trim(table, now)
            entry = table[name] = _Entry()
        else:
            table.move_to_end(name)
        if fingerprint is not None:
            recent = entry.recent
            if recent is None:
                recent = entry.recent = []
            elif fingerprint in recent:
                return None
            recent.append(fingerprint)
            if len(recent) > RECENT_CREDENTIALS:
                del recent[0]
        entry.count = self._decayed(entry, now) + 1.0
        entry.last = now
        return entry

    def _trim(self, table: OrderedDict, now: float) -> None:
        """Make room for one more entry."""
        while len(table) >= self.max_entries:
            table.popitem(last=False)
        # Drop a few decayed entries from the old end on every insertion.
        for _ in range(4):
            if not table:
                return
            name, entry = next(iter(table.items()))
            if self._decayed(entry, now) >= 0.5:
                return
            del table[name]

    def __len__(self) -> int:
        return len(self._ips) + len(self._users)


class LastLogins:
    """Time of each user's last login, for LOGIN-DELAY; bounded by expiry.

    Within a process the table is exact.  The workers of one server share
    the listening sockets, so a user's next login may reach another worker:
    with ``workers`` > 1 each worker also writes its logins into its own row
    of a shared memory table (made before the fork; ``use_row`` in the
    worker), a slot per 64-bit hash of the name, and reads every row.  A
    login another worker recorded is missed only if a later login of a
    user whose hash falls in the same slot overwrote it (that login then
    goes through early); nobody is refused for another user's login, as
    the whole 64-bit key must match and a per-slot sequence number (a
    seqlock: one writer per row) shows a slot rewritten while it was read.
    (That relies on stores being seen in order, as on x86-64; on weaker
    memory models a rare torn read can only misjudge one login's delay.)
    """

    SLOTS = 1 << 16  # per worker: 1.5 MiB
    _WORDS = 3  # per slot: a sequence number (odd while its owner writes), the key, the login time

    def __init__(self, clock: Callable[[], float] = time.monotonic, workers: int = 1) -> None:
        self.clock = clock  # shared rows need a clock common to all processes: CLOCK_MONOTONIC
        self._last: OrderedDict[str, tuple[float, float]] = OrderedDict()  # user -> (time, delay)
        self.workers = workers
        self._row = 0
        if workers > 1:
            self._stride = self.SLOTS * self._WORDS
            self._map = mmap.mmap(-1, workers * self._stride * 8, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            self._words = memoryview(self._map).cast("Q")
            self._times = memoryview(self._map).cast("d")  # the same words, read as times

    def use_row(self, worker: int) -> None:
        """In a worker: record into row ``worker``."""
        self._row = worker * self.SLOTS * self._WORDS

    @staticmethod
    def _key(user: str) -> int:
        # never 0 (an empty slot)
        return int.from_bytes(hashlib.blake2b(user.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                              "little") | 1

    def too_soon(self, user: str, delay: float) -> bool:
        if delay <= 0:
            return False
        seen = self._last.get(user)
        now = self.clock()
        if seen is not None and now - seen[0] < delay:
            return True
        if self.workers > 1:
            key = self._key(user)
            words, times = self._words, self._times
            slot = (key >> 1) % self.SLOTS * self._WORDS
            for row in range(0, self.workers * self._stride, self._stride):
                i = row + slot
                seq = words[i]
                if seq & 1 or words[i + 1] != key:
                    continue  # being written (taken as a miss), or another user's
                when = times[i + 2]
                if words[i] == seq and now - when < delay:  # a seqlock: unchanged while read
                    return True
        return False

    def record(self, user: str, delay: float) -> None:
        if delay <= 0:
            return
        now = self.clock()
        if self.workers > 1:  # (one writer per row: this worker)
            key = self._key(user)
            i = self._row + (key >> 1) % self.SLOTS * self._WORDS
            words = self._words
            seq = words[i]
            words[i] = seq + 1  # odd: readers skip the slot
            words[i + 1] = key
            self._times[i + 2] = now
            words[i] = seq + 2
        self._last.pop(user, None)
        self._last[user] = (now, delay)
        # Entries are in login order; drop the expired ones at the front.
        while self._last:
            name, (when, d) = next(iter(self._last.items()))
            if now - when < d and len(self._last) <= 1_000_000:
                break
            del self._last[name]

    def active(self) -> bool:
        """Whether any login with a delay may be on record (metrics ask before they look)."""
        return bool(self._last) or self.workers > 1
