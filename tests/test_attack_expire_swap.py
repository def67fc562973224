"""A user swaps their whole Maildir between login and QUIT, on a server that
runs as root and serves them as their uid (``--allow-mail-as-root``, the uid
in the passwd-file), with EXPIRE on: at a QUIT after RETR the server writes
the EXPIRE record (``fastpop.retrieved``) into the Maildir, opened again by
its path.  It was opened without checking its owner: with a directory of
root's renamed into the Maildir's place, root created the record (and its
temporary) in root's directory.  A symbolic link in its place was already
refused (no link is followed from the Maildir down); both are attacked here.

The Maildir lies in a directory the user owns, as ``%h/Maildir`` does in
their home (docs/security.md, deployment b), so they may rename it; root's
directory lies there too (a rename within one directory needs no write
access to the directory moved): one an administrator made, or anything root
left in a home.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support.server import ServerProcess, message

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: root serving a user as their uid")


def _as_user(uid: int, gid: int, code: str) -> None:
    prelude = f"import os\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
    subprocess.run([sys.executable, "-c", prelude + code], check=True, timeout=30)


@pytest.mark.parametrize("swap", ["root_directory", "symlink"])
def test_maildir_swapped_before_quit_gets_no_expire_record(swap):
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-expire-swap-"))
    base.chmod(0o755)
    srv = ServerProcess(base / "srv", "cython", extra_args=["--expire", "30"])
    try:
        user = srv.add_user(stored=f"{{PLAIN}}secret:{nobody.pw_uid}:{nobody.pw_gid}")
        user.deliver(message("mine"))
        # the user's home (the Maildir's parent) and their Maildir
        for top, dirs, files in os.walk(srv.mail):
            for n in [top, *(os.path.join(top, x) for x in dirs + files)]:
                os.chown(n, nobody.pw_uid, nobody.pw_gid)
        if swap == "root_directory":
            rootdir = srv.mail / "root-owned"  # root's, 0755, in the user's home
        else:
            rootdir = base / "root-only"  # root's, anywhere: the user links to it
        rootdir.mkdir(mode=0o755)
        (rootdir / "keep").write_bytes(b"root's\n")
        before = sorted(os.listdir(rootdir))
        srv.start()
        p = user.login()
        p.retr(1)  # recorded at QUIT (EXPIRE 30)
        m = str(user.maildir)
        if swap == "root_directory":
            code = f"os.rename({m!r}, {m + '.mine'!r}); os.rename({str(rootdir)!r}, {m!r})"
            after_dir = user.maildir
        else:
            code = f"os.rename({m!r}, {m + '.mine'!r}); os.symlink({str(rootdir)!r}, {m!r})"
            after_dir = rootdir
        _as_user(nobody.pw_uid, nobody.pw_gid, code)
        try:
            reply = p.quit()
            assert reply.startswith(b"+OK"), reply
        except poplib.error_proto:
            pass  # refusing the QUIT's changes is fine; a crash is not (the log below)
        assert sorted(os.listdir(after_dir)) == before, "root wrote the EXPIRE record into root's directory"
        assert os.stat(after_dir).st_uid == 0
        log = srv.log()
        assert "Traceback" not in log, log
        assert "cannot record retrieved messages" in log, log
        # the server goes on serving
        other = srv.add_user([message("theirs")])
        q = other.login()
        assert q.stat()[0] == 1
        q.quit()
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
