"""A user stalled every session of the server from their own session: a
message renamed since login (an IMAP client's flag, or the user) was found
for RETR/TOP by listing cur/, in the event loop, once per command.  The
user fills cur/ with tens of thousands of hidden entries (never messages,
so the login stays cheap), renames every message and pipelines a TOP for
each: no other session got an answer until they were all done (about 2 s).

Now the listing runs in a thread while the session's command pull waits
(pipelined commands stay in order), one listing finds every renamed
message, and a session lists cur/ at most once per
fastpop.session.retrieval.RELIST_INTERVAL: the 150 TOPs cost one listing.
The other tests here check the answers: renamed messages, pipelined, each
answered with its own content in order; a message deleted under the session
still answered "removed by another program", with or without a listing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from support.server import PARSERS, ServerProcess, User, message, pad_dir, raw_login

from fastpop.session.retrieval import RELIST_INTERVAL
from fastpop.wire import responses as R

HIDDEN = 40_000
MESSAGES = 150
STALL_LIMIT = 0.5  # seconds another user's NOOP may wait (about 2 s before the fix)
LISTED = "listed cur/ for renamed messages user=%s "  # the session's debug line per listing


def flag(user: User, base: str, info: str = "2,F") -> str:
    """Rename a message of ``user``'s cur/ as an IMAP server setting a flag
    does: same unique name (``base``), another info; returns the new name."""
    cur = user.maildir / "cur"
    [old] = [n for n in os.listdir(cur) if n.split(":", 1)[0] == base]
    os.rename(cur / old, cur / f"{base}:{info}")
    return f"{base}:{info}"


def bases(user: User) -> list[str]:
    """The unique names of ``user``'s messages, in POP3 order."""
    return sorted(n.split(":", 1)[0] for n in os.listdir(user.maildir / "cur") if not n.startswith("."))


def listings(srv: ServerProcess, user: User) -> int:
    return srv.log().count(LISTED % user.name)


def headers(data: bytes) -> bytes:
    """TOP n 0's body of a message from ``message()``: its header and the blank line."""
    return data[: data.index(b"\r\n\r\n") + 4]


@pytest.mark.parametrize("parser", list(PARSERS.values()), ids=list(PARSERS))
def test_pipelined_top_of_renamed_messages_does_not_stall_other_sessions(parser):
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-retr-relist-"))
    srv = ServerProcess(base / "srv", parser)
    try:
        mails = [message(f"m{i}") for i in range(MESSAGES)]
        attacker = srv.add_user(mails)
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
        for i in range(MESSAGES):  # every renamed message is still found, in order
            status, body = a.line(), a.body()
            assert status == R.OK_TOP, (i, status)
            assert body == headers(mails[i]), (i, body)
        assert a.cmd("NOOP") == R.OK_NOOP
        assert waited < STALL_LIMIT, f"another user's NOOP waited {waited:.2f} s for the attacker's TOPs"
        assert listings(srv, attacker) == 1, "one listing of cur/ serves every renamed message"
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_pipelined_retr_and_top_of_renamed_messages_in_order(server):
    """Renamed, not renamed, small and large (streamed) messages, RETR and TOP
    and other commands pipelined in one write: each answered with its own
    message, in order, with one listing; QUIT deletes a renamed message by
    its new name."""
    big = message("big", body=("y" * 70 + "\r\n") * 3000)  # over SMALL_MESSAGE: streamed
    mails = [message("one"), message("two", body="line 1\r\nline 2\r\n"), message("three"), big, message("five")]
    user = server.add_user(mails)
    c = raw_login(server.port, user)
    names = bases(user)
    for i in (0, 1, 3, 4):  # all but the third renamed under the session
        flag(user, names[i], "2,S" if i % 2 else "2,FS")
    c.send(b"RETR 1\r\nTOP 2 1\r\nNOOP\r\nRETR 4\r\nRETR 3\r\nTOP 4 0\r\nLIST 4\r\nUIDL 5\r\nRETR 5\r\n"
           b"TOP 1 0\r\nRETR 2\r\nDELE 4\r\nSTAT\r\n")
    assert c.line() == b"+OK %d octets\r\n" % len(mails[0])
    assert c.body() == mails[0]
    assert c.line() == R.OK_TOP
    assert c.body() == headers(mails[1]) + b"line 1\r\n"
    assert c.line() == R.OK_NOOP
    assert c.line() == b"+OK %d octets\r\n" % len(big)
    assert c.body() == big
    assert c.line() == b"+OK %d octets\r\n" % len(mails[2])
    assert c.body() == mails[2]
    assert c.line() == R.OK_TOP
    assert c.body() == headers(big)
    assert c.line() == b"+OK 4 %d\r\n" % len(big)
    assert c.line() == b"+OK 5 %s\r\n" % names[4].encode()
    assert c.line() == b"+OK %d octets\r\n" % len(mails[4])
    assert c.body() == mails[4]
    assert c.line() == R.OK_TOP
    assert c.body() == headers(mails[0])
    assert c.line() == b"+OK %d octets\r\n" % len(mails[1])
    assert c.body() == mails[1]
    assert c.line() == R.OK_DELETED
    assert c.line() == b"+OK 4 %d\r\n" % (sum(map(len, mails)) - len(big))
    assert c.cmd("QUIT") == R.OK_LOGOUT_DELETED
    c.close()
    assert listings(server, user) == 1
    assert sorted(user.contents()) == sorted(mails[:3] + mails[4:])


def test_message_deleted_under_the_session(server):
    """A message another program deleted is answered as before the listing
    left the event loop: [SYS/PERM] removed by another program, logged; so
    is one deleted after the session's listing showed it (a new listing,
    rationed, tells); the session goes on."""
    mails = [message(f"m{i}") for i in range(4)]
    user = server.add_user(mails)
    c = raw_login(server.port, user)
    names = bases(user)
    cur = user.maildir / "cur"
    os.unlink(cur / f"{names[1]}:2,")
    flag(user, names[0])
    c.send(b"RETR 2\r\nTOP 2 0\r\nRETR 1\r\nNOOP\r\n")
    assert c.line() == R.ERR_MESSAGE_GONE
    assert c.line() == R.ERR_MESSAGE_GONE
    assert c.line() == b"+OK %d octets\r\n" % len(mails[0])
    assert c.body() == mails[0]
    assert c.line() == R.OK_NOOP
    assert listings(server, user) == 1
    os.unlink(cur / f"{names[2]}:2,")  # as the listing showed it
    t0 = time.monotonic()
    c.send(b"TOP 3 0\r\nRETR 4\r\n")
    assert c.line() == R.ERR_MESSAGE_GONE
    assert time.monotonic() - t0 >= RELIST_INTERVAL / 2  # the listing before this one had just been made
    assert c.line() == b"+OK %d octets\r\n" % len(mails[3])
    assert c.body() == mails[3]
    assert listings(server, user) == 2
    assert f"message vanished user={user.name}" in server.log()
    assert c.cmd("DELE 3") == R.OK_DELETED  # deleting what is gone is not an error
    assert c.cmd("QUIT") == R.OK_LOGOUT_DELETED
    c.close()
    assert sorted(user.contents()) == sorted([mails[0], mails[3]])


def test_message_renamed_again_after_the_listing(server):
    """A message renamed again after the session's listing found it is found
    by the next listing, no sooner than RELIST_INTERVAL after the one before;
    so is one renamed back to its name at login."""
    mails = [message("again"), message("other")]
    user = server.add_user(mails)
    c = raw_login(server.port, user)
    [first, _] = bases(user)
    flag(user, first, "2,F")
    assert c.cmd("RETR 1") == b"+OK %d octets\r\n" % len(mails[0])
    assert c.body() == mails[0]
    flag(user, first, "2,FS")
    t0 = time.monotonic()
    assert c.cmd("TOP 1 0") == R.OK_TOP
    assert time.monotonic() - t0 >= RELIST_INTERVAL / 2
    assert c.body() == headers(mails[0])
    assert listings(server, user) == 2
    flag(user, first, "2,")  # its name at login
    assert c.cmd("RETR 1") == b"+OK %d octets\r\n" % len(mails[0])
    assert c.body() == mails[0]
    assert c.cmd("QUIT") == R.OK_LOGOUT
    c.close()
    assert listings(server, user) == 3


def test_the_kept_listing_holds_only_the_sessions_messages(server):
    """The session keeps its listing of cur/ until it ends.  It kept every
    name in cur/: a user who put 20,000 files there after logging in (a
    million would be 255 MB) made each of their sessions hold them all.  Now
    only the names of the session's own messages are kept."""
    mails = [message(f"m{i}") for i in range(5)]
    user = server.add_user(mails)
    c = raw_login(server.port, user)
    cur = user.maildir / "cur"
    for n in range(20_000):  # visible Maildir names, none of them the session's
        (cur / f"1700000000.M{n}P1.junk:2,").touch()
    names = bases(user)
    flag(user, [b for b in names if "junk" not in b][0])
    c.send(b"TOP 1 0\r\nNOOP\r\n")
    assert c.line() == R.OK_TOP
    assert c.body() == headers(mails[0])
    assert c.line() == R.OK_NOOP
    assert listings(server, user) == 1
    kept = re.search(re.escape(LISTED % user.name) + r"names=(\d+)", server.log())
    assert kept is not None and int(kept.group(1)) == len(mails), kept
