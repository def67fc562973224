"""Maildir++ quota enforced at delivery (issue 20 item 1): with a
``maildirsize`` whose first line is ``NS,MC`` (as Dovecot and Courier write
it), a message that would go over is refused: LMTP ``452 4.2.2 Mailbox
full`` (RFC 3463), ``fastpop deliver`` exit 75 (EX_TEMPFAIL), nothing left
in new/ or tmp/.  A stale file (over, and older than 15 minutes) is
recalculated from the Maildir first, as the Maildir++ specification asks."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import time

import pytest
from support.server import AS_ROOT, ServerProcess, message, serving


class LMTPServer(ServerProcess):
    def start(self, port: int = 0) -> None:
        super().start(port)
        m = re.search(r"LMTP listening on 127\.0\.0\.1:(\d+)", self.log()[self._log_offset:])
        assert m, self.log()
        self.lmtp_port = int(m.group(1))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    yield from serving(LMTPServer(tmp_path_factory.mktemp("quota"), "cython",
                                  extra_args=["--lmtp-listen", "127.0.0.1:0"]))


def quota(user, header: str, *lines: str, age: float = 0) -> None:
    path = user.maildir / "maildirsize"
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines))
    if age:
        old = time.time() - age
        os.utime(path, (old, old))


def lmtp_send(srv, user, data: bytes) -> tuple[int, bytes]:
    with smtplib.LMTP("127.0.0.1", srv.lmtp_port, timeout=30) as c:
        c.ehlo()
        c.mail("a@example.com")
        assert c.rcpt(user.name)[0] == 250
        return c.data(data)


def deliver(srv, user, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, "--user", user.name, "--passwd-file", str(srv.passwd),
         "--mail-location", str(srv.mail) + "/%u"], input=data, capture_output=True, timeout=30)


def nothing_left(user) -> bool:
    return not list((user.maildir / "new").iterdir()) and not list((user.maildir / "tmp").iterdir())


def test_lmtp_over_the_byte_quota_is_452_4_2_2_and_under_it_is_stored(srv):
    user = srv.add_user()
    quota(user, "10000S,100C", "9000 3")
    code, text = lmtp_send(srv, user, message("big", size=2000))
    assert (code, text[:6]) == (452, b"4.2.2 "), text
    assert b"Mailbox full" in text
    assert nothing_left(user)
    code, text = lmtp_send(srv, user, message("small", size=500))
    assert code == 250, text
    [stored] = list((user.maildir / "new").iterdir())
    assert (user.maildir / "maildirsize").read_text().splitlines()[-1] == f"{stored.stat().st_size} 1"


def test_lmtp_message_count_quota(srv):
    user = srv.add_user()
    quota(user, "0S,2C", "100 1", "100 1")
    code, text = lmtp_send(srv, user, message("third"))
    assert (code, text[:6]) == (452, b"4.2.2 "), text


def test_pop3_deletion_makes_room(srv):
    """maildirsize is kept right by POP3 deletions: after a DELE, the next delivery fits."""
    user = srv.add_user()
    quota(user, "3000S")
    for i in range(2):
        assert lmtp_send(srv, user, message(f"m{i}", size=1200))[0] == 250
    assert lmtp_send(srv, user, message("no room", size=1200))[0] == 452
    p = user.login()
    p.dele(1)
    p.quit()
    assert lmtp_send(srv, user, message("room", size=1200))[0] == 250


def test_fastpop_deliver_over_quota_exits_75(srv):
    user = srv.add_user()
    quota(user, "1000S", "900 1")
    r = deliver(srv, user, message("over", size=500))
    assert r.returncode == 75, r
    assert b"mailbox full" in r.stderr
    assert nothing_left(user)
    quota(user, "100000S", "900 1")
    r = deliver(srv, user, message("fits", size=500))
    assert r.returncode == 0, r


def test_no_maildirsize_no_quota_and_a_broken_one_enforces_nothing(srv):
    user = srv.add_user()
    assert lmtp_send(srv, user, message("free", size=5000))[0] == 250
    quota(user, "lots of bytes please", "999999999 9")
    assert lmtp_send(srv, user, message("still", size=5000))[0] == 250


def test_a_stale_maildirsize_is_recalculated(srv):
    """It says over quota, but it is older than 15 minutes and the mail it counts is gone:
    recalculated from the Maildir, the message goes in, and the file is rewritten."""
    user = srv.add_user([message("real", size=1000)])
    quota(user, "5000S", "4800 10", age=3600)
    code, text = lmtp_send(srv, user, message("fits", size=1000))
    assert code == 250, text
    lines = (user.maildir / "maildirsize").read_text().splitlines()
    assert lines[0] == "5000S"
    on_disk = sum(f.stat().st_size for f in user.files())
    assert sum(int(line.split()[0]) for line in lines[1:]) == on_disk < 4800
    # a fresh file that says over is believed (no recalculation on every delivery)
    quota(user, "5000S", "4800 10")
    assert lmtp_send(srv, user, message("refused", size=1000))[0] == 452


def test_a_maildirsize_link_is_not_followed(srv, tmp_path):
    """A user's maildirsize linked to a file claiming a tiny quota is not read through the link."""
    user = srv.add_user()
    target = tmp_path / "other"
    target.write_text("1S\n")
    (user.maildir / "maildirsize").symlink_to(target)
    assert lmtp_send(srv, user, message("through"))[0] == 250
    assert target.read_text() == "1S\n"


@pytest.mark.unit
def test_a_rewritten_maildirsize_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    """A recalculated maildirsize replaces the old one by rename; its data is
    fsync'ed first, or a power cut could leave the new name on an empty file,
    whose lost header would end the user's quota."""
    from fastpop.store import maildirsize

    maildir = tmp_path / "m"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "cur" / "1.M1.host:2,").write_bytes(b"x" * 700)
    (maildir / "maildirsize").write_text("100000S\n" + "0 0\n" * 2000)  # large: recalculated
    synced: list[int] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fd = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert maildirsize.over_quota(fd, 10, os.geteuid()) is None
    finally:
        os.close(fd)
    assert (maildir / "maildirsize").read_text() == "100000S\n700 1\n"
    assert (maildir / "maildirsize").stat().st_ino in synced
