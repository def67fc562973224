"""A user stalls every session of the server at their QUIT: with
``[pop3] seen_on_retr`` (or ``deleted_flag``) the QUIT renames each
retrieved (deleted) message in cur/, in the event loop; a message renamed
since login (an IMAP client's flag) is looked for by listing cur/.  The
user fills cur/ with tens of thousands of hidden entries (never messages,
so the login stays cheap) and renames every retrieved message before QUIT:
cur/ was listed once per message, and no other session got an answer
meanwhile.  cur/ must be listed at most once per QUIT.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support.server import ServerProcess, message, pad_dir, raw_login

HIDDEN = 40_000  # entries the user puts in cur/
MESSAGES = 150
STALL_LIMIT = 1.0  # seconds another user's NOOP may wait (it was several)


@pytest.mark.parametrize("option", [["--seen-on-retr"], ["--deleted-flag", "Gone"]])
def test_renamed_messages_do_not_relist_cur_per_message(option):
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-relist-"))
    srv = ServerProcess(base / "srv", "cython", extra_args=option)
    try:
        attacker = srv.add_user([message(f"m{i}") for i in range(MESSAGES)])
        victim = srv.add_user([message("theirs")])
        cur = attacker.maildir / "cur"
        pad_dir(cur, HIDDEN)
        srv.start()
        v = raw_login(srv.port, victim)
        a = raw_login(srv.port, attacker, timeout=120)
        for i in range(1, MESSAGES + 1):
            if option[0] == "--seen-on-retr":
                a.multi(f"RETR {i}")
            else:
                assert a.cmd(f"DELE {i}").startswith(b"+OK")
        for name in os.listdir(cur):  # as an IMAP client flagging them all
            if not name.startswith("."):
                os.rename(cur / name, cur / (name.split(":", 1)[0] + ":2,F"))
        replies: list[bytes] = []
        quitter = threading.Thread(target=lambda: replies.append(a.cmd("QUIT")))
        quitter.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        assert v.cmd("NOOP").startswith(b"+OK")
        waited = time.monotonic() - t0
        quitter.join(120)
        assert replies and replies[0].startswith(b"+OK"), replies
        names = [n for n in os.listdir(cur) if not n.startswith(".")]
        assert len(names) == MESSAGES and all(n.endswith("F" + ("S" if option[0] == "--seen-on-retr" else "a"))
                                              for n in names), names[:3]
        assert waited < STALL_LIMIT, f"another user's NOOP waited {waited:.2f} s for the attacker's QUIT"
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
