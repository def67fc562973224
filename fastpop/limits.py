"""Connection limits that hold across worker processes, and the descriptor budget.

``ConnectionTable`` counts open connections per client address and in total.
Its counters live in anonymous shared memory that the supervisor maps before
forking, one row per worker: a worker writes only its own row (so no lock and
no atomic operation is needed) and reads the sum of all rows.  A client
address maps to a slot by CRC-32; two addresses sharing a slot are counted
together, which can only make a limit stricter, never looser.  When a worker
dies its row is zeroed before its replacement starts: its connections died
with it.
"""

from __future__ import annotations

import logging
import mmap
import resource
import zlib

log = logging.getLogger("fastpop.limits")

SLOTS = 1 << 16  # address slots per row (256 KiB per worker)
_TOTAL = SLOTS  # the last counter of a row: the worker's connections in total
DESCRIPTOR_RESERVE = 64  # for listeners, logs, index and message files, sendfile dups
# The mailbox lock table's shard files (fastpop.store.locking), kept open by each
# process: all from its start, or under a small descriptor limit each when a
# session first needs it (at most one more descriptor per session then).
MAILBOX_LOCK_SHARDS = 256


class ConnectionTable:
    """Open connections per address key and in total, summed over workers."""

    def __init__(self, per_address: int, total: int, per_worker: int, workers: int = 1) -> None:
        self.per_address = per_address  # 0: no per-address limit
        self.total = total  # 0: no server-wide limit
        self.per_worker = per_worker  # what one process's descriptors allow
        self.workers = workers
        self._map = mmap.mmap(-1, workers * (SLOTS + 1) * 4, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._all = memoryview(self._map).cast("I")
        self._row = 0  # this process's row offset

    def use_row(self, worker: int) -> None:
        """In a worker: count into row ``worker``."""
        self._row = worker * (SLOTS + 1)

    def clear_row(self, worker: int) -> None:
        """In the supervisor, after a worker died: its connections are gone."""
        start = worker * (SLOTS + 1)
        self._all[start : start + SLOTS + 1] = memoryview(bytes((SLOTS + 1) * 4)).cast("I")

    def _sum(self, index: int) -> int:
        counts = self._all
        n = 0
        for row in range(0, self.workers * (SLOTS + 1), SLOTS + 1):
            n += counts[row + index]
        return n

    def open_total(self) -> int:
        return self._sum(_TOTAL)

    def count(self, key: str) -> int:
        return self._sum(zlib.crc32(key.encode()) & (SLOTS - 1))

    def acquire(self, key: str | None) -> str | None:
        """Count a new connection; returns why it is refused (nothing counted), or None.
        ``key`` None: exempt from the per-address limit (trusted networks)."""
        counts = self._all
        row = self._row
        if counts[row + _TOTAL] >= self.per_worker:
            return "descriptors"
        if self.total and self._sum(_TOTAL) >= self.total:
            return "total"
        if key is not None:
            slot = zlib.crc32(key.encode()) & (SLOTS - 1)
            if self.per_address and self._sum(slot) >= self.per_address:
                return "address"
            counts[row + slot] += 1
        counts[row + _TOTAL] += 1
        return None

    def release(self, key: str | None) -> None:
        counts = self._all
        row = self._row
        if key is not None:
            i = row + (zlib.crc32(key.encode()) & (SLOTS - 1))
            if counts[i]:
                counts[i] -= 1
        if counts[row + _TOTAL]:
            counts[row + _TOTAL] -= 1


def raise_descriptor_limit() -> int:
    """Raise the soft descriptor limit to the hard one (as nginx and Dovecot do);
    returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
        return soft


def connections_per_worker(descriptor_limit: int) -> int:
    """Connections one worker can take without running out of descriptors:
    one each (an idle session holds nothing else), less a reserve, less the
    lock table's shards (up to one per session, at most 256 and the older
    single file)."""
    left = descriptor_limit - max(DESCRIPTOR_RESERVE, descriptor_limit // 50)
    if lock_shards_up_front(descriptor_limit):
        return max(16, left - (MAILBOX_LOCK_SHARDS + 1))
    return max(16, left // 2)


def lock_shards_up_front(descriptor_limit: int) -> bool:
    """Whether a process opens all the lock table's shards when it starts
    (before it drops privileges) rather than each when first needed: when its
    descriptor limit leaves room for them and as many sessions (from 578)."""
    left = descriptor_limit - max(DESCRIPTOR_RESERVE, descriptor_limit // 50)
    return left >= 2 * (MAILBOX_LOCK_SHARDS + 1)
