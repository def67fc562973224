"""A user races root creating their Maildir's cur/, new/ and tmp/ (at the
first login of a server running as root, at ``fastpop import mbox``):
between root's mkdir and its chown of the new directory, the user (who owns
the Maildir, so may remove the empty root-owned directory) puts a hard link
to a file they may write but do not own in its place.  Root must never give
that file to the user.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastpop.store.maildir import SUBDIRS, ensure_maildir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: root creates a user's Maildir")

RACE_SECONDS = 5.0  # the old code lost within a fraction of a second


def test_subdir_swapped_for_hard_link_is_not_chowned():
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-mkdir-"))
    attacker = None
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        victim = base / "shared"
        victim.write_bytes(b"root's\n")
        victim.chmod(0o666)  # writable by the user: fs.protected_hardlinks lets them link it
        maildir = home / "Maildir"
        code = (f"import os\nos.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
                f"m = {str(maildir)!r}\nos.mkdir(m, 0o700)\nprint('ready', flush=True)\n"
                "while True:\n"
                f"    for d in {SUBDIRS!r}:\n"
                "        try:\n"
                "            os.rmdir(m + '/' + d)\n"
                f"            os.link({str(victim)!r}, m + '/' + d)\n"
                "        except OSError:\n"
                "            pass\n")
        attacker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert attacker.stdout is not None and attacker.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + RACE_SECONDS
        rounds = 0
        while time.monotonic() < deadline and victim.stat().st_uid == 0:
            rounds += 1
            try:
                ensure_maildir(str(maildir), nobody.pw_uid)
            except OSError:
                pass  # the user broke their own Maildir: refused, fine
            for d in SUBDIRS:  # start again: root creates them anew
                path = maildir / d
                try:
                    path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
                except OSError:
                    pass
        assert rounds > 10
        assert victim.stat().st_uid == 0, f"root gave the user a file that is not theirs (round {rounds})"
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_maildir_swapped_for_roots_directory_is_not_given_away():
    """The Maildir itself: in a parent the user owns (their home), the user
    removes the Maildir root has just made and renames a directory of root's
    from that same parent into its place (no right on that directory needed);
    root then chowned root's directory, files and all, to the user."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-mkdir-"))
    attacker = None
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        roots = home / "roots"  # root's, in the user's home (as sudo leaves ~/.cache)
        roots.mkdir(mode=0o755)
        (roots / "secret").write_bytes(b"root's\n")
        (roots / "secret").chmod(0o600)
        held = os.open(roots, os.O_RDONLY | os.O_DIRECTORY)  # root's directory, wherever it is moved
        maildir = home / "Maildir"
        code = (f"import os\nos.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
                f"m, r = {str(maildir)!r}, {str(roots)!r}\nprint('ready', flush=True)\n"
                "while True:\n"
                "    try:\n"
                "        os.rmdir(m)\n"
                "        os.rename(r, m)\n"
                "    except OSError:\n"
                "        pass\n")
        attacker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert attacker.stdout is not None and attacker.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + RACE_SECONDS
        rounds = 0
        while time.monotonic() < deadline and os.fstat(held).st_uid == 0:
            rounds += 1
            try:
                ensure_maildir(str(maildir), nobody.pw_uid)
            except OSError:
                pass  # refused: fine
            try:
                if os.lstat(maildir).st_ino == os.fstat(held).st_ino:
                    for d in SUBDIRS:  # what the old code made in root's directory
                        try:
                            os.rmdir(maildir / d)
                        except OSError:
                            pass
                    os.rename(maildir, roots)
                else:
                    subprocess.run(["rm", "-rf", str(maildir)], check=False)
            except FileNotFoundError:
                pass
        assert rounds > 10
        st = os.fstat(held)
        os.close(held)
        assert st.st_uid == 0, f"root gave the user root's directory (round {rounds})"
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        subprocess.run(["rm", "-rf", str(base)], check=False)
