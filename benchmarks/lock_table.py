"""What a mailbox lock costs with many sessions held: the single-file lock
table against the sharded one (fastpop.store.locking).

    PYTHONPATH=. python3 benchmarks/lock_table.py [--held 1000,10000,50000,100000] [--single-max 10000] [--pairs 2000]
                                                  [--shards 256]

For each count N in ``--held``, N locks are held at distinct random offsets (as
N logged-in sessions hold them), then ``--pairs`` lock+unlock pairs at other
offsets are timed (what one login and its logout cost in the kernel), and the
mean and 99th percentile per pair are printed, in milliseconds:

- ``single``: every lock in one file, as fastpop did before the shards (an
  OFD byte-range lock per mailbox, F_OFD_SETLK);
- ``sharded``: ``LockTable`` as the server uses it, 256 files, a lock in the
  one its offset picks.

The kernel walks the whole lock list of a file on each lock (and on each
insert), so just *holding* N locks in one file costs O(N²) to set up: the
single file is measured only up to ``--single-max`` held (10,000 by default:
seconds; 50,000 takes minutes and 100,000 about ten).  Everything lives in a
temporary directory removed at the end; one process, no server.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import struct
import tempfile
import time

from fastpop.store import locking

FLOCK = struct.Struct("hhqqi4x")
MASK = (1 << 62) - 1


def _offsets(n: int, rng: random.Random) -> list[int]:
    # odd offsets far apart: one owner's adjacent locks would merge into one
    return [(rng.getrandbits(61) << 1 | 1) & MASK for _ in range(n)]


def _single(directory: str, held: int, pairs: int, rng: random.Random) -> tuple[list[float], float]:
    fd = os.open(os.path.join(directory, "single.locks"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        start = time.perf_counter()
        for off in _offsets(held, rng):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, off, 1, 0))
        setup = time.perf_counter() - start
        times = []
        for off in _offsets(pairs, rng):
            t0 = time.perf_counter()
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, off, 1, 0))
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, off, 1, 0))
            times.append(time.perf_counter() - t0)
        return times, setup
    finally:
        os.close(fd)  # drops them all


def _sharded(directory: str, held: int, pairs: int, rng: random.Random) -> tuple[list[float], float]:
    table = locking.LockTable(os.path.join(directory, f"sharded-{held}", "mailbox.locks"))
    setlk = fcntl.F_OFD_SETLK  # as LockTable.acquire and _release do, without the Maildir's lstat

    def lock(off: int, kind: int) -> None:
        fcntl.fcntl(table._shard(locking.shard_of(off)), setlk, FLOCK.pack(kind, os.SEEK_SET, off, 1, 0))

    try:
        start = time.perf_counter()
        for off in _offsets(held, rng):
            lock(off, fcntl.F_WRLCK)
        setup = time.perf_counter() - start
        times = []
        for off in _offsets(pairs, rng):
            t0 = time.perf_counter()
            lock(off, fcntl.F_WRLCK)
            table._held_by_older(off)  # each login also asks the old single file
            lock(off, fcntl.F_UNLCK)
            times.append(time.perf_counter() - t0)
        return times, setup
    finally:
        table.close()


def _show(kind: str, held: int, times: list[float], setup: float) -> None:
    times.sort()
    mean = sum(times) / len(times) * 1e3
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3
    print(f"{kind:8} {held:>8,} held  lock+unlock mean {mean:8.4f} ms  p99 {p99:8.4f} ms  "
          f"(holding them took {setup:.1f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--held", default="1000,10000,50000,100000", help="counts of locks held, comma-separated")
    ap.add_argument("--single-max", type=int, default=10000, help="measure the single file up to this many held")
    ap.add_argument("--pairs", type=int, default=2000, help="lock+unlock pairs timed per count")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shards", type=int, default=locking.SHARDS,
                    help="try another shard count (the server's is fixed: every process of a host must agree)")
    args = ap.parse_args()
    locking.SHARDS = args.shards  # read by shard_of and LockTable at call time
    counts = [int(c) for c in args.held.split(",")]
    rng = random.Random(args.seed)
    print(f"{os.uname().release}, {os.cpu_count()} CPUs, {locking.SHARDS} shards", flush=True)
    with tempfile.TemporaryDirectory(prefix="lock-table-") as directory:
        os.chmod(directory, 0o700)
        for held in counts:
            if held <= args.single_max:
                _show("single", held, *_single(directory, held, args.pairs, rng))
            _show("sharded", held, *_sharded(directory, held, args.pairs, rng))


if __name__ == "__main__":
    main()
