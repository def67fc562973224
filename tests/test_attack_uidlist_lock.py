"""Users stall everyone's logins with a planted ``dovecot-uidlist.lock``
(``[mail] uidl = "dovecot"``).  A login whose mailbox needs UIDs from
dovecot-uidlist takes Dovecot's lock, in a thread of the login pool (the
event loop's default executor: min(32, CPUs + 4) threads, shared by every
login), and waited there up to 10 s for a lock whose ``pid:host`` names a
live process.  Users who plant such a lock in their own Maildir and log in,
as many as the pool has threads, held every thread for 10 s at each try:
every other user's login waited behind them.

Fixed by never waiting in the pool: a live lock fails the open at once and
the login tries again from the event loop, holding no thread, until the
10 s are up; then that user gets ``-ERR [SYS/TEMP]``.  A lock Dovecot holds
for a moment is still waited for (the second test).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from support.server import Raw, ServerProcess, message

from fastpop.store.dovecot_uidlist import LOCK, LOCK_WAIT, UIDLIST

# asyncio's (and uvloop's) default executor: the threads every login shares
POOL = min(32, (os.cpu_count() or 1) + 4)
LOGIN_LIMIT = 2.0  # seconds another user's login and STAT may take meanwhile


def _live_lock(maildir: Path) -> None:
    """A lock naming a live process of this host (this test), fresh: not stale."""
    (maildir / LOCK).write_text(f"{os.getpid()}:{socket.gethostname()}")


def test_planted_uidlist_locks_do_not_starve_other_logins():
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-uidlist-lock-"))
    srv = ServerProcess(base / "srv", "cython", extra_args=["--mail-uidl", "dovecot"])
    attackers = []
    try:
        users = [srv.add_user([message(f"mine {i}")]) for i in range(POOL + 2)]
        victim = srv.add_user([message("theirs")])
        for user in users:
            _live_lock(user.maildir)
        srv.start()
        t0 = time.monotonic()
        for user in users:  # every attacker's PASS is in flight at once
            r = Raw(srv.port, timeout=LOCK_WAIT + 20)
            assert r.cmd(f"USER {user.name}").startswith(b"+OK")
            r.send(f"PASS {user.password}\r\n".encode())
            attackers.append(r)
        time.sleep(0.5)  # their opens have reached the lock
        start = time.monotonic()
        v = Raw(srv.port, timeout=LOCK_WAIT + 20)
        assert v.cmd(f"USER {victim.name}").startswith(b"+OK")
        assert v.cmd(f"PASS {victim.password}").startswith(b"+OK")
        assert v.cmd("STAT").startswith(b"+OK 1 ")
        took = time.monotonic() - start
        assert took < LOGIN_LIMIT, f"another user's login and STAT took {took:.1f} s behind {len(users)} planted locks"
        assert v.cmd("QUIT").startswith(b"+OK")
        for r in attackers:
            reply = r.line()
            assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
        waited = time.monotonic() - t0
        assert waited < LOCK_WAIT + 5, f"the planting users waited {waited:.1f} s"
        for user in users:
            assert (user.maildir / LOCK).exists()  # a live lock is never taken over
        # the lock gone, the user logs in as ever
        (users[0].maildir / LOCK).unlink()
        p = users[0].login_when_free()
        assert p.stat()[0] == 1
        p.quit()
        log = srv.log()
        assert "Traceback" not in log, log
    finally:
        for r in attackers:
            r.close()
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_lock_held_briefly_is_waited_for():
    """Dovecot holding its lock for a moment (a sync): the login waits for it,
    then numbers the messages under the lock, as before."""
    base = Path(tempfile.mkdtemp(prefix="fastpop-uidlist-brief-"))
    srv = ServerProcess(base / "srv", "cython", extra_args=["--mail-uidl", "dovecot"])
    try:
        user = srv.add_user([message("one"), message("two")])
        _live_lock(user.maildir)
        srv.start()
        release = threading.Timer(0.7, (user.maildir / LOCK).unlink)
        release.start()
        start = time.monotonic()
        p = user.login()
        took = time.monotonic() - start
        release.join()
        assert 0.6 < took < LOCK_WAIT, took
        assert p.stat()[0] == 2
        uidls = [line.split()[1] for line in p.uidl()[1]]
        p.quit()
        listed = (user.maildir / UIDLIST).read_text().splitlines()
        validity = int(listed[0].split()[1][1:])
        assert uidls == [f"{uid:08x}{validity:08x}".encode() for uid in (1, 2)]
        assert not (user.maildir / LOCK).exists()
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
