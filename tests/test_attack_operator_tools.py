"""Attacks on the operator's commands (``fastpop import ...``, ``fastpop
expire``) run by root over Maildirs that a user (``nobody`` here) owns and
can write: the user plants files in their Maildir before the command runs;
root must not write to a file that is not the user's, nor run out of memory
on a file the user made as large as they like.

The victim of a hard link is a file the user may write but does not own
(mode 0666, root's, on the same file system): with fs.protected_hardlinks=1
that is what a user can hard-link into their Maildir.
"""

from __future__ import annotations

import os
import pwd
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the commands run as root on a user's files")

VICTIM = b"root's shared file: nothing is appended to it\n"
MESSAGE = b"From: someone@example.org\r\nSubject: legacy\r\n\r\nbody\r\n"


def _as_user(uid: int, gid: int, code: str, *args: str) -> None:
    """Run ``code`` as the user (the attacker's own actions)."""
    prelude = f"import os, sys\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
    subprocess.run([sys.executable, "-c", prelude + code, *args], check=True, timeout=30)


@pytest.fixture
def legacy_world():
    """A legacy ROOT with one user, alice@example.com, whose Maildir under
    the mail root already exists and is the user's (made for them before the
    import, or a second run after the Maildirs were given to their users)."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-tools-"))
    base.chmod(0o755)
    folder = base / "legacy" / "example.com" / "alice"
    folder.mkdir(parents=True)
    (folder / "Secr3t.pwd").write_bytes(b"")
    (folder / "1.eml").write_bytes(MESSAGE)
    mail = base / "mail"
    (mail / "example.com").mkdir(parents=True, mode=0o755)
    maildir = mail / "example.com" / "alice"
    maildir.mkdir(mode=0o700)
    os.chown(maildir, nobody.pw_uid, nobody.pw_gid)
    victim = base / "shared"
    victim.write_bytes(VICTIM)
    victim.chmod(0o666)  # the user may write it, so the kernel lets them hard-link it
    yield nobody, base, maildir, victim
    subprocess.run(["rm", "-rf", str(base)], check=False, timeout=60)


def _import_legacy(base: Path, limit_memory: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if limit_memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    return subprocess.run(
        [sys.executable, "-m", "fastpop", "import", "legacy", str(base / "legacy"),
         "--passwd-file", str(base / "passwd"), "--mail-root", str(base / "mail")],
        capture_output=True, timeout=120, preexec_fn=limit)


def test_legacy_import_does_not_append_to_a_hard_linked_manifest(legacy_world):
    nobody, base, maildir, victim = legacy_world
    _as_user(nobody.pw_uid, nobody.pw_gid,
             "m = sys.argv[1]\n"
             "for d in ('/cur', '/new', '/tmp'): os.mkdir(m + d, 0o700)\n"
             "os.link(sys.argv[2], m + '/fastpop-legacy-import')\n",
             str(maildir), str(victim))
    assert os.stat(maildir / "fastpop-legacy-import").st_ino == victim.stat().st_ino
    result = _import_legacy(base)
    st = victim.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o666)
    assert victim.read_bytes() == VICTIM, "root appended the manifest to a file outside the Maildir"
    assert b"Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1 and b"fastpop-legacy-import" in result.stderr, result.stderr


def test_legacy_import_does_not_read_a_huge_manifest_into_memory(legacy_world):
    """A manifest of one endless line (a sparse file costs the user nothing):
    read whole, line by line, it takes its size in memory and more."""
    nobody, base, maildir, victim = legacy_world
    _as_user(nobody.pw_uid, nobody.pw_gid,
             "m = sys.argv[1]\n"
             "for d in ('/cur', '/new', '/tmp'): os.mkdir(m + d, 0o700)\n"
             "f = os.open(m + '/fastpop-legacy-import', os.O_WRONLY | os.O_CREAT, 0o600)\n"
             "os.ftruncate(f, 2 << 30); os.close(f)\n",
             str(maildir))
    result = _import_legacy(base, limit_memory=1 << 30)
    assert b"Traceback" not in result.stderr and b"MemoryError" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 1 and b"fastpop-legacy-import" in result.stderr, result.stderr
    assert not (base / "passwd").exists() or b"alice" not in (base / "passwd").read_bytes()


def test_legacy_import_does_not_read_a_huge_message_file_into_memory(legacy_world):
    """The legacy users write their folders in ROOT: a message file of 2 GiB
    (sparse: it costs them nothing) was read whole, twice (scan, copy)."""
    nobody, base, maildir, victim = legacy_world
    folder = base / "legacy" / "example.com" / "alice"
    with open(folder / "2.eml", "wb") as f:
        f.truncate(2 << 30)
    result = _import_legacy(base, limit_memory=1 << 30)
    assert b"Traceback" not in result.stderr and b"MemoryError" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 1 and b"2.eml: larger than" in result.stderr, result.stderr
    assert os.listdir(maildir) == [], "nothing is written when ROOT is refused"
