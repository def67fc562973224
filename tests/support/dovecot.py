"""A real Dovecot (Debian's dovecot-imapd and dovecot-pop3d) serving the same
Maildirs as a real fastpop, for the side-by-side tests (issue 20).

``DovecotServer(root, mail, passwd)`` writes a configuration in ``root``
(its base_dir, state and log there too), with Dovecot's *default* Maildir and
POP3 behaviour (unlike fastpop/bench/dovecot.py, which tunes POP3 for
speed): passwd-file auth with PLAIN passwords, ``mail_location =
maildir:MAIL/%u``, IMAP and POP3 on free loopback ports.  It runs as root in
the foreground (``dovecot -F``), mail processes as ``vmail`` (created if
missing: ``chown_tree`` gives it the Maildirs).  ``imap(user)`` and
``pop3(user)`` log in with imaplib and poplib.

``unavailable()`` says why it cannot run here (not root, not installed):
tests skip with that reason.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

from fastpop.bench import dovecot as bench_dovecot
from fastpop.bench.dovecot import MAIL_USER, greets, stop_dovecot
from fastpop.bench.dovecot import ensure_mail_user as mail_user

CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
instance_name = fastpop-test-{imap_port}
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{mail}/%u
mail_uid = {mail_user}
mail_gid = {mail_user}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_user} home={mail}/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{extra}
"""


def binary() -> str | None:
    return shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)


def unavailable() -> str | None:
    """Why Dovecot IMAP and POP3 cannot be run here, or None."""
    if binary() is None:
        return "Dovecot is not installed (apt-get install dovecot-imapd dovecot-pop3d)"
    for part in ("imap", "pop3"):
        if not os.path.exists(f"/usr/lib/dovecot/{part}"):
            return f"Dovecot's {part} is not installed (apt-get install dovecot-{part}d)"
    if os.geteuid() != 0:
        return "running Dovecot needs root (it switches to the mail user)"
    for user in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"system user {user!r} is missing (reinstall dovecot-core)"
    return None


def chown_tree(path: Path) -> None:
    """Give ``path`` and everything below to the mail user (Dovecot's mail processes)."""
    bench_dovecot.chown_tree(path, *mail_user())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DovecotServer:
    def __init__(self, root: Path, mail: Path, passwd: Path, extra: str = "") -> None:
        self.dir = root
        self.mail = mail
        self.passwd = passwd
        self.extra = extra  # more configuration lines (pop3_deleted_flag, ...)
        self.proc: subprocess.Popen | None = None
        self.imap_port = self.pop3_port = 0

    def log(self) -> str:
        try:
            return (self.dir / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30.0) -> None:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        for parent in [self.mail, *self.mail.parents]:
            if not os.stat(parent).st_mode & 0o001:
                os.chmod(parent, os.stat(parent).st_mode | 0o011)  # the mail user must reach the Maildirs
        self.passwd.chmod(0o644)
        mail_user()
        def configure() -> None:
            self.imap_port, self.pop3_port = _free_port(), _free_port()
            (self.dir / "dovecot.conf").write_text(CONF.format(
                dir=self.dir, mail=self.mail, passwd=self.passwd, mail_user=MAIL_USER,
                imap_port=self.imap_port, pop3_port=self.pop3_port, extra=self.extra))

        self.proc = bench_dovecot.start_dovecot(
            self.dir / "dovecot.conf", configure,
            lambda: greets(self.imap_port, b"* OK") and greets(self.pop3_port, b"+OK"), self.log, timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = stop_dovecot(self.proc)
        self.proc = None
        return rc

    def imap(self, user: str, password: str, mailbox: str = "INBOX") -> imaplib.IMAP4:
        """An imaplib session logged in and with ``mailbox`` selected."""
        m = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        m.login(user, password)
        typ, _ = m.select(mailbox)
        assert typ == "OK", typ
        return m

    def pop3(self, user: str, password: str) -> poplib.POP3:
        p = poplib.POP3("127.0.0.1", self.pop3_port, timeout=10)
        p.user(user)
        p.pass_(password)
        return p

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def imap_uids(m: imaplib.IMAP4) -> dict[int, str]:
    """{UID: flags} of the selected mailbox, from UID FETCH 1:* (FLAGS)."""
    m.noop()
    typ, data = m.uid("FETCH", "1:*", "(FLAGS)")
    assert typ == "OK", data
    out: dict[int, str] = {}
    for item in data:
        if not item:
            continue
        text = item.decode() if isinstance(item, bytes) else item[0].decode()
        # '3 (UID 7 FLAGS (\\Seen))'
        uid = int(text.split("UID ", 1)[1].split(" ", 1)[0].rstrip(")"))
        out[uid] = text.split("FLAGS (", 1)[1].split(")", 1)[0] if "FLAGS (" in text else ""
    return out


def uidvalidity(m: imaplib.IMAP4, mailbox: str = "INBOX") -> int:
    typ, data = m.status(mailbox, "(UIDVALIDITY)")
    assert typ == "OK", data
    return int(data[0].decode().split("UIDVALIDITY ", 1)[1].rstrip(")"))


def pop3_uidls(p: poplib.POP3) -> list[str]:
    """The UIDL list of a POP3 session, in message order."""
    return [line.split()[1].decode() for line in p.uidl()[1]]
