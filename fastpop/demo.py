"""The embedded default: a demo user and mailbox, so any POP3 client can connect at once."""

from __future__ import annotations

import os
import socket
import stat
import time

from fastpop.auth.passwd_file import UserRecord, read_records, write_records
from fastpop.store.maildir import ensure_maildir

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_LISTEN = "127.0.0.1:1110"

_SAMPLES = [
    (
        "Welcome to fastpop",
        "Hello!\n\nThis mailbox was created by `fastpop serve --demo`.\n"
        "Fetch it with any POP3 client: user demo, password demo.\n",
    ),
    (
        "Dot-stuffing works",
        ".This line starts with a dot, and so does the next one.\n..\n"
        "RFC 1939 says the server doubles such dots and the client removes them.\n",
    ),
    (
        "Leave mail on the server",
        "Messages are numbered for the session; UIDL gives ids that never change,\n"
        "so clients such as Thunderbird can keep mail on the server.\n",
    ),
]


def prepare(directory: str) -> tuple[str, str]:
    """Create (if missing) the demo passwd-file and Maildir; returns (passwd, mail template)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        # the demo is served as whoever runs it (root too): nobody else may write there
        raise ValueError(f"{directory}: the demo directory must be yours and writable by you alone")
    passwd = os.path.join(directory, "passwd")
    home = os.path.join(directory, "mail", DEMO_USER)
    records = read_records(passwd)
    if not any(r.name == DEMO_USER for r in records):
        # PLAIN so that APOP works for the demo user too (fastpop serve --demo --apop).
        records.append(UserRecord(DEMO_USER, "{PLAIN}" + DEMO_PASSWORD, home=home))
        write_records(passwd, records)
    maildir = os.path.join(home, "Maildir")
    ensure_maildir(maildir)
    if not os.listdir(os.path.join(maildir, "cur")) and not os.listdir(os.path.join(maildir, "new")):
        _seed(maildir)
    return passwd, "%h/Maildir"


def _seed(maildir: str) -> None:
    host = socket.gethostname().replace("/", "_").replace(":", "_")
    now = int(time.time())
    for n, (subject, body) in enumerate(_SAMPLES):
        text = (
            f"From: fastpop <postmaster@localhost>\nTo: {DEMO_USER}@localhost\n"
            f"Subject: {subject}\nDate: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(now))}\n"
            f"Message-ID: <demo{n}.{now}@localhost>\n\n{body}"
        ).replace("\n", "\r\n").encode("utf-8")
        name = f"{now}.M{n}P{os.getpid()}.{host},S={len(text)},W={len(text)}"
        tmp = os.path.join(maildir, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(maildir, "new", name))


def banner(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return (
        f"fastpop demo: user '{DEMO_USER}', password '{DEMO_PASSWORD}' on {listen}\n"
        f"  curl pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/        # list messages\n"
        f"  curl pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/1       # read message 1\n"
        f"  python3 -c \"import poplib; p=poplib.POP3('{host}', {port}); p.user('{DEMO_USER}'); "
        f"p.pass_('{DEMO_PASSWORD}'); print(p.stat())\"\n"
        "Stop with Ctrl-C."
    )
