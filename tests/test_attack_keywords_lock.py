"""A user stalls every session of the server: with ``[pop3] deleted_flag``
a QUIT after DELE takes ``dovecot-keywords.lock`` in the user's Maildir to
add the keyword.  The user plants that lock (its mtime in the future, so it
never turns stale) and removes the keyword from ``dovecot-keywords``; the
QUIT then waited for the lock, sleeping in the server's event loop, and no
other session got an answer meanwhile.  Other users' sessions must be
answered at once; the attacker's messages simply stay (a QUIT that could
not delete says so).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from support.server import Raw, ServerProcess, message

STALL_LIMIT = 2.0  # seconds a NOOP of another user may take while the attacker QUITs (the wait was 10 s)


def test_planted_keywords_lock_does_not_stall_other_sessions():
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-kwlock-"))
    srv = ServerProcess(base / "srv", "cython", extra_args=["--deleted-flag", "Gone"])
    try:
        attacker = srv.add_user([message("mine")])
        victim = srv.add_user([message("theirs")])
        lock = attacker.maildir / "dovecot-keywords.lock"
        lock.write_text("1:elsewhere")
        future = time.time() + 3600
        os.utime(lock, (future, future))
        srv.start()
        v = Raw(srv.port)
        assert v.cmd(f"USER {victim.name}").startswith(b"+OK")
        assert v.cmd(f"PASS {victim.password}").startswith(b"+OK")
        a = Raw(srv.port, timeout=30)
        assert a.cmd(f"USER {attacker.name}").startswith(b"+OK")
        assert a.cmd(f"PASS {attacker.password}").startswith(b"+OK")
        assert a.cmd("DELE 1").startswith(b"+OK")
        replies: list[bytes] = []
        quitter = threading.Thread(target=lambda: replies.append(a.cmd("QUIT")))
        quitter.start()
        time.sleep(0.3)  # the QUIT is being handled
        t0 = time.monotonic()
        assert v.cmd("NOOP").startswith(b"+OK")
        waited = time.monotonic() - t0
        quitter.join(30)
        assert waited < STALL_LIMIT, f"another user's NOOP waited {waited:.1f} s for the attacker's QUIT"
        assert replies and replies[0].startswith(b"-ERR"), replies  # not deleted, and it says so
        assert len(os.listdir(attacker.maildir / "cur")) + len(os.listdir(attacker.maildir / "new")) == 1
        assert v.cmd("QUIT").startswith(b"+OK")
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
