"""Fault injection for the crash-safety tests (``tests/test_crash.py``).

``FASTPOP_FAULT=point:n`` makes the process kill itself with SIGKILL the
n-th time it reaches ``point`` (n defaults to 1); ``point:n:EIO`` raises
``OSError(EIO)`` there instead (any errno name), to exercise the error path
that follows a failed write or fsync.  Several specs may be given, separated
by commas.  Before dying, one line goes to standard error naming the point,
so a test can tell its fault from any other death.

The variable is read once, at import.  Unset, a fault point costs one global
lookup and one attribute test::

    if faults.ACTIVE:
        faults.hit("update.after_unlink")

The points (where they sit is documented in docs/reliability.md):

=========================  ==================================================
lock.after_create          login: fastpop.lock created, its owner not written
update.before_unlink       UPDATE, before each message file is unlinked
update.after_unlink        UPDATE, after each unlink
update.before_reply        UPDATE done (cur/ fsync'ed), before the +OK
deliver.after_create       delivery: the tmp/ file exists, nothing written
deliver.before_rename      delivery: tmp/ file written, fsync'ed and closed
deliver.after_rename       delivery: renamed into new/, new/ not yet fsync'ed
deliver.after_fsync        delivery: stored durably, success not yet reported
sync.after_move            login: after each rename of new/X to cur/X:2,
index.before_rename        index: temporary file written and fsync'ed
index.after_rename         index: the new index is in place
=========================  ==================================================
"""

from __future__ import annotations

import errno
import os
import signal
import threading

POINTS = frozenset({
    "lock.after_create",
    "update.before_unlink",
    "update.after_unlink",
    "update.before_reply",
    "deliver.after_create",
    "deliver.before_rename",
    "deliver.after_rename",
    "deliver.after_fsync",
    "sync.after_move",
    "index.before_rename",
    "index.after_rename",
})


def _parse(spec: str) -> dict[str, list]:
    """{point: [remaining hits, errno or 0]}; a malformed spec is an error at
    start-up, not a fault that silently never fires."""
    out: dict[str, list] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = item.partition(":")
        count, _, action = rest.partition(":")
        if name not in POINTS:
            raise ValueError(f"FASTPOP_FAULT: unknown fault point {name!r}")
        if count and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"FASTPOP_FAULT: {item!r}: the count must be a positive integer")
        code = 0
        if action:
            code = getattr(errno, action, 0)
            if not code:
                raise ValueError(f"FASTPOP_FAULT: {item!r}: unknown errno name {action!r}")
        out[name] = [int(count or 1), code]
    return out


_SPEC = os.environ.get("FASTPOP_FAULT", "")
_armed = _parse(_SPEC) if _SPEC else {}
_lock = threading.Lock()  # points are reached from worker threads too (index sync, LMTP stores)
ACTIVE = bool(_armed)


def hit(name: str) -> None:
    """Count one arrival at ``name``; on the armed one, die (or raise)."""
    assert name in POINTS, name
    with _lock:
        state = _armed.get(name)
        if state is None or state[0] <= 0:
            return
        state[0] -= 1
        if state[0]:
            return
        code = state[1]
    if code:
        os.write(2, f"fastpop: fault point {name} reached, raising {errno.errorcode[code]}\n".encode())
        raise OSError(code, f"{os.strerror(code)} (injected at {name})")
    os.write(2, f"fastpop: fault point {name} reached, killing pid {os.getpid()}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
