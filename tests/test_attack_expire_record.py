"""A user stalls every session of the server through the EXPIRE record: at
a QUIT after RETR (``[pop3] expire`` on) the server reads ``fastpop.retrieved``
from the user's Maildir, up to 16 MiB, parses it and writes it back, in the
event loop.  The user fills it after logging in (the login prunes it, in a
thread) with a million and a half made-up UIDLs; each
of their QUITs then holds every other session for about a second, and a
login/RETR/QUIT loop keeps the server busy.

Fixed by bounding what QUIT reads to what the user's own mailbox can need
(fastpop.store.expire.record_limit: 96 octets a message); a larger record is
ignored (logged) and replaced by this session's retrievals.  A user with a
very large mailbox still costs its own size at QUIT: moving the UPDATE
state's work to a thread would remove that too.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from support.server import Raw, ServerProcess, message

STALL_LIMIT = 0.3  # seconds another user's NOOP may wait for the attacker's QUIT
RECORD_BYTES = 16 * 1024 * 1024  # fastpop.store.expire.MAX_RECORD_BYTES: what is still read


def test_huge_expire_record_does_not_stall_other_sessions():
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-expire-"))
    srv = ServerProcess(base / "srv", "cython", extra_args=["--expire", "30"])
    try:
        attacker = srv.add_user([message("mine")])
        victim = srv.add_user([message("theirs")])
        lines = []
        size = i = 0
        while True:
            line = b"1 %x\n" % i
            if size + len(line) > RECORD_BYTES:
                break
            lines.append(line)
            size += len(line)
            i += 1
        record = b"".join(lines)
        srv.start()
        v = Raw(srv.port)
        assert v.cmd(f"USER {victim.name}").startswith(b"+OK")
        assert v.cmd(f"PASS {victim.password}").startswith(b"+OK")
        a = Raw(srv.port, timeout=60)
        assert a.cmd(f"USER {attacker.name}").startswith(b"+OK")
        assert a.cmd(f"PASS {attacker.password}").startswith(b"+OK", )
        a.multi("RETR 1")
        # planted after the login (which prunes the record to the mailbox's messages, in a thread)
        (attacker.maildir / "fastpop.retrieved").write_bytes(record)
        replies: list[bytes] = []
        quitter = threading.Thread(target=lambda: replies.append(a.cmd("QUIT")))
        quitter.start()
        time.sleep(0.1)  # the QUIT is being handled
        t0 = time.monotonic()
        assert v.cmd("NOOP").startswith(b"+OK")
        waited = time.monotonic() - t0
        quitter.join(60)
        assert replies and replies[0].startswith(b"+OK"), replies
        assert waited < STALL_LIMIT, f"another user's NOOP waited {waited:.2f} s for the attacker's QUIT"
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
