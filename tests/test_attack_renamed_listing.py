"""A user stalls every session of the server at their QUIT: with
``[pop3] seen_on_retr`` (or ``deleted_flag``) the QUIT renames each
retrieved (deleted) message in cur/, in the event loop; a message renamed
since login (an IMAP client's flag) is looked for by listing cur/.  The
user fills cur/ with tens of thousands of hidden entries (never messages,
so the login stays cheap) and renames every retrieved message before QUIT:
cur/ was listed once per message, and no other session got an answer
meanwhile.  cur/ must be listed at most once per QUIT, and (the test at the
end) not in the event loop at all: a QUIT that needs the listing finishes its
update in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server import PARSERS, ServerProcess, message, pad_dir, pinging, raw_login

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


HIDDEN_MANY = 120_000  # enough that listing cur/ takes a while (~50 ms) on any machine


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> Iterator[Path]:
    """A directory of HIDDEN_MANY hidden entries, made once (it takes seconds):
    each test renames it into place as the attacker's cur/ and back."""
    path = tmp_path_factory.mktemp("padded") / "cur"
    path.mkdir()
    pad_dir(path, HIDDEN_MANY)
    yield path


@contextlib.contextmanager
def as_cur(padded: Path, cur: Path) -> Iterator[None]:
    """``padded`` in place of ``cur`` (same owner and mode, same messages), and back."""
    st = cur.stat()
    os.chown(padded, st.st_uid, st.st_gid)
    os.chmod(padded, st.st_mode & 0o7777)
    for name in os.listdir(cur):
        os.rename(cur / name, padded / name)
    cur.rmdir()
    os.rename(padded, cur)
    try:
        yield
    finally:
        for name in os.listdir(cur):
            if not name.startswith("."):
                os.unlink(cur / name)
        os.rename(cur, padded)


@pytest.mark.parametrize("option", [[], ["--seen-on-retr"], ["--deleted-flag", "Gone"]],
                         ids=["delete", "seen", "deleted-flag"])
@pytest.mark.parametrize("parser", list(PARSERS.values()), ids=list(PARSERS))
def test_quit_lists_cur_outside_the_event_loop(option, parser, padded):
    """The listing a QUIT needs for a message renamed under the session is
    as slow as the user makes cur/; done in the event loop (once per QUIT,
    as above) it still held every other session of the worker for as long
    (150-200 ms with 200,000 entries, and a user can repeat it at every QUIT).
    It runs in a thread now: another user's NOOPs are answered meanwhile,
    and the renamed message is still deleted (or flagged)."""
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-quit-listing-"))
    srv = ServerProcess(base / "srv", parser, extra_args=option)
    stack = contextlib.ExitStack()
    try:
        attacker = srv.add_user([message("one"), message("two")])
        victim = srv.add_user([message("theirs")])
        cur = attacker.maildir / "cur"
        stack.enter_context(as_cur(padded, cur))
        srv.start()
        v = raw_login(srv.port, victim)
        a = raw_login(srv.port, attacker, timeout=120)
        if option == ["--seen-on-retr"]:
            a.multi("RETR 1")
        else:
            assert a.cmd("DELE 1").startswith(b"+OK")
        [first] = [n for n in sorted(os.listdir(cur)) if not n.startswith(".")][:1]
        unique = first.split(":", 1)[0]
        os.rename(cur / first, cur / f"{unique}:2,F")  # as an IMAP client flagging it
        with pinging(v) as waits:
            t0 = time.monotonic()
            reply = a.cmd("QUIT")
            took = time.monotonic() - t0
            time.sleep(0.02)
        assert reply.startswith(b"+OK"), reply
        names = [n for n in os.listdir(cur) if not n.startswith(".") and n.startswith(unique)]
        if option == []:
            assert names == [], names
        else:
            assert names == [f"{unique}:2,F" + ("S" if option == ["--seen-on-retr"] else "a")], names
        assert took > 0.03, f"QUIT took {took * 1000:.0f} ms: too few entries to tell"
        assert max(waits) < took / 3, (f"another user's NOOP waited {max(waits) * 1000:.0f} ms during the "
                                       f"attacker's QUIT ({took * 1000:.0f} ms)")
    finally:
        srv.stop()
        stack.close()
        shutil.rmtree(base, ignore_errors=True)
