"""Attacks on ``fastpop import mbox`` run by root on a spool and a Maildir
that a user (``nobody`` here) owns and can write: the user plants files in
their Maildir before the administrator's import; root must not write to,
nor give the user, a file that is not theirs.

The victim is a file the user may write but does not own (mode 0666, root's,
beside the Maildir on the same file system): with fs.protected_hardlinks=1
that is what a user can hard-link into their Maildir.  Owning it would let
them chmod it, keep it when its mode is tightened, make it theirs for quotas.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the import runs as root on a user's files")

SPOOL = (b"From alice@example.org Mon Jan  1 10:00:00 2024\n"
         b"From: alice@example.org\nSubject: one\nX-UIDL: first-uidl\n\nbody one\n\n"
         b"From bob@example.org Mon Jan  1 11:00:00 2024\n"
         b"From: bob@example.org\nSubject: two\n\nbody two\n")
VICTIM = b"root's shared file: its owner stays root\n"


def _as_user(uid: int, gid: int, code: str, *args: str) -> None:
    """Run ``code`` as the user (the attacker's own actions)."""
    prelude = f"import os, sys\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
    subprocess.run([sys.executable, "-c", prelude + code, *args], check=True, timeout=30)


@pytest.fixture
def world():
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-import-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir(mode=0o755)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    spool = base / "spool"
    spool.write_bytes(SPOOL)
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    victim = base / "shared"
    victim.write_bytes(VICTIM)
    victim.chmod(0o666)  # the user may write it, so the kernel lets them hard-link it
    yield nobody, base, home, spool, victim
    subprocess.run(["rm", "-rf", str(base)], check=False)


def _import(spool: Path, maildir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastpop", "import", "mbox", str(spool), "--maildir", str(maildir)],
                          capture_output=True, timeout=60)


def test_hard_linked_manifest_is_not_given_to_the_user(world):
    nobody, base, home, spool, victim = world
    maildir = home / "Maildir"
    # the user makes their Maildir and plants the manifest as a hard link to the victim
    _as_user(nobody.pw_uid, nobody.pw_gid,
             "m = sys.argv[1]\n"
             "for d in ('', '/cur', '/new', '/tmp'): os.mkdir(m + d, 0o700)\n"
             "os.link(sys.argv[2], m + '/fastpop-mbox-import')\n",
             str(maildir), str(victim))
    assert os.stat(maildir / "fastpop-mbox-import").st_ino == victim.stat().st_ino
    result = _import(spool, maildir)
    st = victim.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o666), "root gave the user a file that is not theirs"
    assert victim.read_bytes() == VICTIM, "root appended the manifest to a file outside the Maildir"
    # the import itself: refused with a clear message, or done without that file
    assert b"Traceback" not in result.stderr
    if result.returncode == 0:
        assert len(os.listdir(maildir / "new")) + len(os.listdir(maildir / "cur")) == 2
    else:
        assert b"fastpop-mbox-import" in result.stderr, result.stderr


def test_import_is_not_stopped_by_the_maildir_quota(world):
    """Moving existing mail is not a delivery: a ``maildirsize`` (the user's
    file, or a real quota the old mail already exceeds) must not stop the
    import halfway, as it does not stop ``fastpop import legacy``."""
    nobody, base, home, spool, victim = world
    maildir = home / "Maildir"
    _as_user(nobody.pw_uid, nobody.pw_gid,
             "m = sys.argv[1]\n"
             "for d in ('', '/cur', '/new', '/tmp'): os.mkdir(m + d, 0o700)\n"
             "open(m + '/maildirsize', 'w').write('100S\\n0 0\\n')\n",
             str(maildir))
    result = _import(spool, maildir)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(maildir / "new")) == 2
