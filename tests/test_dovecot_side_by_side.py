"""fastpop beside a real Dovecot IMAP and POP3 on the same Maildirs (issue 20).

With ``[mail] uidl = "dovecot"`` fastpop gives messages their UIDs in
dovecot-uidlist as Dovecot does, under Dovecot's lock, so the three views
agree: fastpop's UIDL list, Dovecot POP3's (its default ``%08Xu%08Xv``) and
IMAP's UID FETCH with UIDVALIDITY, for mail delivered before and after
either server saw the mailbox, and after fastpop's index is lost.  POP3
deletions reach IMAP and IMAP expunges reach POP3; flags IMAP sets during a
POP3 session (file renames) break neither a RETR nor a UIDL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support import dovecot as dv
from support.server import PARSERS, ServerProcess, User, message

from fastpop.store import index as mindex

pytestmark = pytest.mark.skipif(dv.unavailable() is not None, reason=str(dv.unavailable()))

PARSER = next(iter(PARSERS.values()))


class Pair:
    """A fastpop (``--mail-uidl MODE``) and a Dovecot on one mail root."""

    def __init__(self, root: Path, mode: str = "dovecot") -> None:
        self.root = root
        self.fastpop = ServerProcess(root / "fastpop", PARSER, extra_args=["--mail-uidl", mode])
        self.dovecot = dv.DovecotServer(root / "dovecot", self.fastpop.mail, self.fastpop.passwd)
        self._n = 0

    def user(self, count: int = 0) -> User:
        self._n += 1
        u = self.fastpop.add_user(name=f"side{self._n}")
        for i in range(count):
            self.deliver(u, f"message {i}", sizes=i % 2 == 0)
        return u

    def deliver(self, user: User, subject: str, sizes: bool = False) -> Path:
        path = user.deliver(message(subject, "line\r\n" * 3), sizes_in_name=sizes)
        dv.chown_tree(user.maildir)  # delivered as the mail user, as an MDA does
        return path

    def fastpop_uidls(self, user: User) -> list[str]:
        p = user.login_when_free()
        try:
            return dv.pop3_uidls(p)
        finally:
            p.quit()

    def dovecot_uidls(self, user: User) -> list[str]:
        p = self.dovecot.pop3(user.name, user.password)
        try:
            return dv.pop3_uidls(p)
        finally:
            p.quit()

    def imap_uidls(self, user: User) -> list[str]:
        m = self.dovecot.imap(user.name, user.password)
        try:
            validity = dv.uidvalidity(m)
            return [f"{uid:08x}{validity:08x}" for uid in sorted(dv.imap_uids(m))]
        finally:
            m.logout()

    def check_logs(self) -> None:
        log = self.fastpop.log()
        assert "Traceback" not in log, log
        dlog = self.dovecot.log()
        bad = [line for line in dlog.splitlines() if re.search(r"Error|Panic|Fatal|corrupt", line, re.I)]
        assert not bad, "Dovecot complained:\n" + "\n".join(bad)


@pytest.fixture
def pair():
    root = Path(tempfile.mkdtemp(prefix="fastpop-side-", dir="/tmp"))  # the mail user must reach it
    os.chmod(root, 0o755)
    p = Pair(root)
    os.chmod(p.fastpop.mail, 0o755)
    dv.chown_tree(p.fastpop.mail)
    p.dovecot.start()
    p.fastpop.start()
    try:
        yield p
        p.check_logs()
    finally:
        p.fastpop.stop()
        p.dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


def _index_path(user: User) -> Path:
    return user.maildir / mindex.INDEX_FILE


def test_uidls_equal_dovecot_pop3_and_imap(pair):
    u = pair.user(12)  # over 9 messages: hex digits a-f in the UIDs
    first = pair.fastpop_uidls(u)  # fastpop sees the mailbox first: it numbers all 12
    assert len(first) == 12
    assert all(re.fullmatch(r"[0-9a-f]{16}", x) for x in first), first
    assert pair.dovecot_uidls(u) == first
    assert pair.imap_uidls(u) == first
    assert (u.maildir / "dovecot-uidlist").stat().st_uid == os.stat(u.maildir).st_uid  # Dovecot can rewrite it

    # delivered after both started: one numbered by Dovecot IMAP first, one by fastpop first
    pair.deliver(u, "after, IMAP first")
    via_imap = pair.imap_uidls(u)
    pair.deliver(u, "after, fastpop first")
    via_fastpop = pair.fastpop_uidls(u)
    assert via_fastpop[:13] == via_imap and via_fastpop[:12] == first
    assert pair.dovecot_uidls(u) == via_fastpop == pair.imap_uidls(u)

    # fastpop's index lost: the UIDLs come from dovecot-uidlist, unchanged
    _index_path(u).unlink()
    assert pair.fastpop_uidls(u) == via_fastpop
    assert not (u.maildir / "dovecot-uidlist.lock").exists()


def test_uidl_served_from_the_name_survives_dovecot_numbering_and_index_loss(pair):
    """The hazard of issue 20: a message served by fastpop under a UIDL made
    from its file name (``uidl = "maildir"``), numbered by Dovecot IMAP later,
    must keep that UIDL once fastpop runs with ``uidl = "dovecot"`` — even
    after fastpop's index is lost — and Dovecot POP3 must serve it too."""
    u = pair.user(3)
    pair.fastpop.stop()
    pair.fastpop.extra_args = ["--mail-uidl", "maildir"]
    pair.fastpop.start()
    names = pair.fastpop_uidls(u)
    assert not any(re.fullmatch(r"[0-9a-f]{16}", x) for x in names), names  # from the file names
    pair.imap_uidls(u)  # Dovecot IMAP numbers them in dovecot-uidlist
    pair.fastpop.stop()
    pair.fastpop.extra_args = ["--mail-uidl", "dovecot"]
    pair.fastpop.start()
    pair.deliver(u, "new")
    now = pair.fastpop_uidls(u)
    assert now[:3] == names
    assert re.fullmatch(r"[0-9a-f]{16}", now[3])
    _index_path(u).unlink()
    assert pair.fastpop_uidls(u) == now
    assert pair.dovecot_uidls(u) == now  # the P field of the records
    assert pair.imap_uidls(u)[3] == now[3]


def test_pop3_deletion_reaches_imap_and_imap_expunge_reaches_pop3(pair):
    u = pair.user(5)
    uidls = pair.fastpop_uidls(u)
    m = pair.dovecot.imap(u.name, u.password)
    try:
        before = dv.imap_uids(m)
        assert len(before) == 5
        p = u.login_when_free()
        p.dele(2)
        p.quit()
        after = dv.imap_uids(m)  # the open IMAP session notices (NOOP)
        assert sorted(after) == sorted(before)[:1] + sorted(before)[2:]
        # IMAP expunges the (now) first message
        first_uid = sorted(after)[0]
        typ, _ = m.uid("STORE", str(first_uid), "+FLAGS.SILENT", r"(\Deleted)")
        assert typ == "OK"
        typ, _ = m.expunge()
        assert typ == "OK"
    finally:
        m.logout()
    assert pair.fastpop_uidls(u) == uidls[2:]
    assert pair.dovecot_uidls(u) == uidls[2:]
    assert pair.imap_uidls(u) == uidls[2:]


def test_imap_flag_changes_during_a_pop3_session(pair):
    """IMAP sets flags (renaming the files in cur/) while a POP3 session is
    open: RETR still finds each message by its base name, UIDLs stay."""
    u = pair.user(4)
    uidls = pair.fastpop_uidls(u)
    p = u.login_when_free()
    try:
        m = pair.dovecot.imap(u.name, u.password)
        try:
            typ, _ = m.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Flagged \Answered)")
            assert typ == "OK"
        finally:
            m.logout()
        assert all(":2," in f.name and "F" in f.name.split(":2,")[1] for f in (u.maildir / "cur").iterdir())
        for i in range(1, 5):
            lines = p.retr(i)[1]
            assert f"Subject: message {i - 1}".encode() in lines
        assert dv.pop3_uidls(p) == uidls
        p.dele(4)
    finally:
        p.quit()
    assert pair.fastpop_uidls(u) == uidls[:3]
    assert pair.imap_uidls(u) == uidls[:3]


def test_concurrent_imap_and_pop3_keep_one_view(pair):
    """Deliveries while fastpop logins and Dovecot IMAP syncs run at once, for
    a bounded while: dovecot-uidlist is never corrupted (Dovecot logs no
    error), no UID is given twice, and the three views agree at the end."""
    u = pair.user(2)
    stop = time.monotonic() + 8
    errors: list[BaseException] = []

    def imap_loop() -> None:
        try:
            while time.monotonic() < stop:
                m = pair.dovecot.imap(u.name, u.password)
                dv.imap_uids(m)
                m.logout()
        except BaseException as exc:  # (reported by the test)
            errors.append(exc)

    def deliver_loop() -> None:
        try:
            i = 0
            while time.monotonic() < stop and i < 40:
                pair.deliver(u, f"concurrent {i}")
                i += 1
                time.sleep(0.1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=imap_loop), threading.Thread(target=deliver_loop)]
    for t in threads:
        t.start()
    seen: dict[str, int] = {}
    while time.monotonic() < stop:
        for uidl in pair.fastpop_uidls(u):
            seen[uidl] = seen.get(uidl, 0) + 1
    for t in threads:
        t.join()
    assert not errors, errors
    final = pair.fastpop_uidls(u)
    assert len(final) == len(set(final)) == len(u.files()) > 2
    assert set(seen) <= set(final), "a UIDL served once changed or vanished"
    assert pair.imap_uidls(u) == final
    assert pair.dovecot_uidls(u) == final
    with contextlib.suppress(FileNotFoundError):
        _index_path(u).unlink()
    assert pair.fastpop_uidls(u) == final


def test_hostile_uidlist_refused_for_its_own_user_only(pair):
    """dovecot-uidlist is the user's to write: garbage, or a link to another
    file, gets that user -ERR [SYS/PERM] (no UIDL that might change later is
    guessed) and a log line, never a traceback; other users are served."""
    victim = pair.user(2)
    other = pair.user(2)
    (victim.maildir / "dovecot-uidlist").write_bytes(b"3 V1 N2\n\xff\xfe garbage\x00\n" * 1000)
    p = pair.fastpop.connect()
    p.user(victim.name)
    with pytest.raises(Exception, match=r"SYS/PERM"):
        p.pass_(victim.password)
    p.quit()
    (victim.maildir / "dovecot-uidlist").unlink()
    os.symlink("/etc/hostname", victim.maildir / "dovecot-uidlist")
    p = pair.fastpop.connect()
    p.user(victim.name)
    with pytest.raises(Exception, match=r"SYS/PERM"):
        p.pass_(victim.password)
    p.quit()
    assert len(pair.fastpop_uidls(other)) == 2
    os.unlink(victim.maildir / "dovecot-uidlist")  # the operator's fix (Dovecot would renumber too)
    assert len(pair.fastpop_uidls(victim)) == 2
    assert "Traceback" not in pair.fastpop.log()


def _flags_by_subject(pair: Pair, user: User) -> dict[str, str]:
    """{Subject: IMAP flags} as Dovecot IMAP reports them."""
    m = pair.dovecot.imap(user.name, user.password)
    try:
        typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK", data
        out = {}
        for item in data:
            if isinstance(item, tuple):
                subject = item[1].decode().split(":", 1)[1].strip()
                out[subject] = item[0].decode().split("FLAGS (", 1)[1].split(")", 1)[0]
        return out
    finally:
        m.logout()


def test_seen_on_retr_as_dovecot_pop3(pair):
    """``[pop3] seen_on_retr``: RETR'd messages are \\Seen for IMAP after QUIT,
    merged with flags IMAP set during the session; TOP, deleted messages and
    an RSET flag nothing; no UIDL changes; the same as Dovecot's POP3 does."""
    pair.fastpop.stop()
    pair.fastpop.extra_args += ["--seen-on-retr"]
    pair.fastpop.start()
    u = pair.user(5)
    v = pair.user(2)  # (made before Dovecot reads the passwd-file: it may not see a change within a second)
    uidls = pair.fastpop_uidls(u)
    p = u.login_when_free()
    try:
        m = pair.dovecot.imap(u.name, u.password)
        m.store("2", "+FLAGS.SILENT", r"(\Flagged)")  # renamed under the open POP3 session
        m.logout()
        p.retr(1)
        p.retr(5)
        p.dele(4)
        p.rset()  # forgets every RETR and DELE so far, as Dovecot's POP3
        p.retr(2)
        p.top(3, 0)
        p.retr(4)
        p.dele(4)
        p.retr(1)
    finally:
        p.quit()
    flags = _flags_by_subject(pair, u)
    assert set(flags) == {"message 0", "message 1", "message 2", "message 4"}
    assert flags["message 0"] == r"\Seen"
    assert set(flags["message 1"].split()) == {r"\Seen", r"\Flagged"}
    assert flags["message 2"] == flags["message 4"] == ""
    names = sorted(f.name.split(":", 1)[1] for f in (u.maildir / "cur").iterdir())
    assert names == ["2,", "2,", "2,FS", "2,S"], names
    assert pair.fastpop_uidls(u) == uidls[:3] + uidls[4:]
    assert pair.dovecot_uidls(u) == uidls[:3] + uidls[4:]

    # Dovecot's own POP3 gives the same flags for the same commands (the behaviour copied)
    d = pair.dovecot.pop3(v.name, v.password)
    d.retr(1)
    d.top(2, 0)
    d.quit()
    assert _flags_by_subject(pair, v) == {"message 0": r"\Seen", "message 1": ""}


def test_no_seen_flags_by_default(pair):
    u = pair.user(2)
    p = u.login_when_free()
    p.retr(1)
    p.quit()
    assert _flags_by_subject(pair, u) == {"message 0": "", "message 1": ""}


def test_deleted_flag_keeps_pop3_deletions_for_imap(tmp_path):
    """``[pop3] deleted_flag`` = Dovecot's ``pop3_deleted_flag``: a POP3
    deletion (in either server) adds the keyword instead of removing the
    file; neither POP3 shows the message again, IMAP keeps it with the
    keyword, and the other messages keep their UIDLs."""
    root = Path(tempfile.mkdtemp(prefix="fastpop-side-", dir="/tmp"))
    os.chmod(root, 0o755)
    p = Pair(root)
    p.fastpop.extra_args += ["--deleted-flag", "$POP3Deleted"]
    p.dovecot.extra = "pop3_deleted_flag = \"$POP3Deleted\"\n"
    os.chmod(p.fastpop.mail, 0o755)
    try:
        u = p.user(4)
        dv.chown_tree(p.fastpop.mail)
        p.dovecot.start()
        p.fastpop.start()
        m = p.dovecot.imap(u.name, u.password)  # Dovecot knows a keyword first (dovecot-keywords exists)
        m.store("1", "+FLAGS.SILENT", "(Junk)")
        m.logout()
        uidls = p.fastpop_uidls(u)
        s = u.login_when_free()
        s.dele(2)
        s.quit()
        assert len(list((u.maildir / "cur").iterdir())) == 4  # nothing removed
        assert p.fastpop_uidls(u) == [uidls[0], *uidls[2:]]
        assert p.dovecot_uidls(u) == [uidls[0], *uidls[2:]]
        flags = _flags_by_subject(p, u)
        assert "$POP3Deleted" in flags["message 1"].split() and "Junk" in flags["message 0"].split()
        assert "$POP3Deleted" not in flags["message 0"] + flags["message 2"] + flags["message 3"]
        # Dovecot's POP3 deletes one the same way: fastpop hides it too
        d = p.dovecot.pop3(u.name, u.password)
        d.dele(1)
        d.quit()
        assert p.fastpop_uidls(u) == uidls[2:]
        assert "$POP3Deleted" in _flags_by_subject(p, u)["message 0"].split()
        p.check_logs()
    finally:
        p.fastpop.stop()
        p.dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


QUOTA_CONF = """\
mail_plugins = $mail_plugins quota
protocol imap {
  mail_plugins = $mail_plugins imap_quota
}
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=100M
  quota_rule2 = *:messages=1000
}
"""


def _maildirsize_totals(user: User) -> tuple[int, int]:
    lines = (user.maildir / "maildirsize").read_text().splitlines()[1:]
    return sum(int(line.split()[0]) for line in lines), sum(int(line.split()[1]) for line in lines)


def _imap_message_usage(p: Pair, user: User) -> int:
    m = p.dovecot.imap(user.name, user.password)
    try:
        typ, data = m.getquotaroot("INBOX")
        assert typ == "OK", data
        text = " ".join(d.decode() if isinstance(d, bytes) else str(d) for part in data for d in part)
        return int(re.search(r"MESSAGE (\d+) 1000", text).group(1))
    finally:
        m.logout()


def test_maildirsize_follows_pop3_deletions(tmp_path):
    """Maildir++ quota: after fastpop's DELE + QUIT, Dovecot's quota (read
    from maildirsize, not recalculated) counts what is left, and the file's
    totals equal what Dovecot computes when it recalculates from scratch."""
    root = Path(tempfile.mkdtemp(prefix="fastpop-side-", dir="/tmp"))
    os.chmod(root, 0o755)
    p = Pair(root)
    p.dovecot.extra = QUOTA_CONF
    os.chmod(p.fastpop.mail, 0o755)
    try:
        u = p.user(5)
        dv.chown_tree(p.fastpop.mail)
        p.dovecot.start()
        p.fastpop.start()
        assert _imap_message_usage(p, u) == 5  # Dovecot wrote maildirsize
        assert _maildirsize_totals(u)[1] == 5
        s = u.login_when_free()
        s.dele(1)  # (an S= in its name: counted by S=)
        s.dele(4)
        s.quit()
        assert _imap_message_usage(p, u) == 3
        ours = _maildirsize_totals(u)
        (u.maildir / "maildirsize").unlink()  # Dovecot recalculates from the files
        assert _imap_message_usage(p, u) == 3
        assert _maildirsize_totals(u) == ours
        p.check_logs()
    finally:
        p.fastpop.stop()
        p.dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_maildirsize_hostile_is_not_followed(pair):
    """maildirsize as a link or a FIFO: not written through, no hang, the deletion happens."""
    u = pair.user(2)
    outside = pair.root / "outside"
    outside.write_text("100M\n0 0\n")
    os.symlink(outside, u.maildir / "maildirsize")
    s = u.login_when_free()
    s.dele(1)
    s.quit()
    assert outside.read_text() == "100M\n0 0\n"
    os.unlink(u.maildir / "maildirsize")
    os.mkfifo(u.maildir / "maildirsize")
    s = u.login_when_free()
    s.dele(1)
    s.quit()
    assert pair.fastpop_uidls(u) == []
    os.unlink(u.maildir / "maildirsize")
