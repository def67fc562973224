"""A user swaps their Maildir's cur/ between login and QUIT, on a server
that runs as root and serves them as their uid (``--allow-mail-as-root``,
the uid in the passwd-file).  At login fastpop refuses a cur/ that is not
the user's (test_hostile_maildir, "a Maildir that belongs to someone
else"); at QUIT the deletions (DELE), the \\Seen flags of ``seen_on_retr``
and the keyword of ``deleted_flag`` are done by name in cur/ opened anew:
with a directory of root's put in its place, root unlinked or renamed
root's file.

The foreign directory is root's and lies in the user's Maildir (a rename
within one directory needs no write access to the directory moved): one
an administrator made there, or anything root left in a Maildir that is
also a home directory.
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

NAME = "1700000000.M1P1.host:2,"
VICTIM = b"root's file, which the user may not remove\n"


def _as_user(uid: int, gid: int, code: str) -> None:
    prelude = f"import os\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
    subprocess.run([sys.executable, "-c", prelude + code], check=True, timeout=30)


@pytest.mark.parametrize("case", ["dele", "seen_on_retr", "deleted_flag"])
def test_cur_swapped_before_quit(case):
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-cur-"))
    base.chmod(0o755)
    extra = {"dele": [], "seen_on_retr": ["--seen-on-retr"], "deleted_flag": ["--deleted-flag", "Gone"]}[case]
    srv = ServerProcess(base / "srv", "cython", extra_args=extra)
    try:
        user = srv.add_user(stored=f"{{PLAIN}}secret:{nobody.pw_uid}:{nobody.pw_gid}")
        (user.maildir / "cur" / NAME).write_bytes(message("mine"))
        for top, dirs, files in os.walk(srv.mail):
            for n in [top, *(os.path.join(top, x) for x in dirs + files)]:
                os.chown(n, nobody.pw_uid, nobody.pw_gid)
        foreign = user.maildir / "root-owned"  # root's, 0755, in the user's Maildir
        foreign.mkdir(mode=0o755)
        victim = foreign / NAME
        victim.write_bytes(VICTIM)
        victim.chmod(0o644)
        srv.start()
        p = user.login()
        if case == "seen_on_retr":
            p.retr(1)
        else:
            p.dele(1)
        m = str(user.maildir)
        _as_user(nobody.pw_uid, nobody.pw_gid,
                 f"os.rename({m + '/cur'!r}, {m + '/cur.mine'!r}); os.rename({str(foreign)!r}, {m + '/cur'!r})")
        try:
            p.quit()
        except poplib.error_proto:
            pass  # refusing the QUIT's changes is fine
        moved = user.maildir / "cur" / NAME
        assert os.listdir(user.maildir / "cur") == [NAME], "root renamed or removed a file in root's directory"
        assert moved.read_bytes() == VICTIM
        log = srv.log()
        assert "Traceback" not in log, log
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
