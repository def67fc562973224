"""A user stalls every session of the server from their own session: a
message renamed since login (an IMAP client's flag, or the user) is found
for RETR/TOP by listing cur/, in the event loop, once per command.  The
user fills cur/ with tens of thousands of hidden entries (never messages,
so the login stays cheap), renames every message and pipelines a TOP for
each: no other session gets an answer until they are all done.

Not fixed here: remembering every rename one listing shows only helps
until the user renames the files again (a loop of renames costs them
microseconds, each listing the server milliseconds); the listing would have
to leave the event loop (a thread, as the login's) or be rationed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from support.server import ServerProcess, message, pad_dir, raw_login

HIDDEN = 40_000
MESSAGES = 150
STALL_LIMIT = 0.5  # seconds another user's NOOP may wait (about 2 s on the code of this commit)


@pytest.mark.xfail(strict=True, reason="RETR/TOP of a renamed message lists cur/ in the event loop, once per command")
def test_pipelined_top_of_renamed_messages_does_not_stall_other_sessions():
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-retr-relist-"))
    srv = ServerProcess(base / "srv", "cython")
    try:
        attacker = srv.add_user([message(f"m{i}") for i in range(MESSAGES)])
        victim = srv.add_user([message("theirs")])
        cur = attacker.maildir / "cur"
        pad_dir(cur, HIDDEN)
        srv.start()
        v = raw_login(srv.port, victim)
        a = raw_login(srv.port, attacker, timeout=120)
        for name in os.listdir(cur):
            if not name.startswith("."):
                os.rename(cur / name, cur / (name.split(":", 1)[0] + ":2,F"))
        a.send(b"".join(b"TOP %d 0\r\n" % i for i in range(1, MESSAGES + 1)))
        time.sleep(0.05)
        t0 = time.monotonic()
        assert v.cmd("NOOP").startswith(b"+OK")
        waited = time.monotonic() - t0
        for _ in range(MESSAGES):  # every renamed message is still found
            status, _body = a.line(), a.body()
            assert status.startswith(b"+OK"), status
        assert waited < STALL_LIMIT, f"another user's NOOP waited {waited:.2f} s for the attacker's TOPs"
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
