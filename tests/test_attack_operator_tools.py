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

import fcntl
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support.server import Raw, ServerProcess, message

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


# -- fastpop expire, run as root by cron with [mail] lock = "symlink"

# The user's side of the flock attack: hold an exclusive flock on their own
# Maildir, say so, wait for the word, then (optionally) swap the Maildir for a
# link to somewhere else before letting go.
_HOLDER = """
m, victim, swap = sys.argv[1], sys.argv[2], sys.argv[3] == "swap"
fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
if swap:
    os.rename(m, m + ".real")
    os.symlink(victim, m)
os.close(fd)
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def expire_world():
    """nobody's Maildir with a retrieval record (so the sweep locks it) and a
    plain file where the lock link goes (stale at once: taken over under a
    flock of the Maildir); a victim directory of root's holding a file named
    like the lock."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-expire-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir(mode=0o755)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    maildir = home / "Maildir"
    _as_user(nobody.pw_uid, nobody.pw_gid,
             "m = sys.argv[1]\n"
             "for d in ('', '/cur', '/new', '/tmp'): os.mkdir(m + d, 0o700)\n"
             "open(m + '/fastpop.retrieved', 'w').write('1 nothing\\n')\n"
             "open(m + '/fastpop.lock', 'w').write('a plain file\\n')\n",
             str(maildir))
    victim = base / "victim"
    victim.mkdir(mode=0o755)
    (victim / "fastpop.lock").write_bytes(b"root's file\n")
    config = base / "fastpop.toml"
    config.write_text('[mail]\nlock = "symlink"\n')
    yield nobody, base, maildir, victim, config
    subprocess.run(["rm", "-rf", str(base)], check=False, timeout=60)


def _blocked_flock_waiters() -> int:
    """Lines of /proc/locks for a process waiting for a lock ("->")."""
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and "FLOCK" in line)


def _attack_expire(nobody, maildir: Path, victim: Path, config: Path, swap: bool) -> tuple[str, bool]:
    """Hold the Maildir's flock while root's sweep runs; returns the sweep's
    output and whether it finished within 15 s while the flock was held."""
    # (fcntl before giving up root: the interpreter's own modules may be root's alone)
    prelude = f"import fcntl, os, sys\nos.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
    holder = subprocess.Popen([sys.executable, "-c", prelude + _HOLDER, str(maildir), str(victim),
                               "swap" if swap else "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sweep = None
    try:
        assert holder.stdout.readline().strip() == "held"
        waiting_before = _blocked_flock_waiters()
        sweep = subprocess.Popen([sys.executable, "-m", "fastpop", "expire", "--config", str(config),
                                  "--maildir", str(maildir), "--days", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        finished = False
        try:
            sweep.wait(timeout=15)
            finished = True
        except subprocess.TimeoutExpired:
            # it waits for the user's flock: let go (after the swap, if any)
            assert _blocked_flock_waiters() > waiting_before, "the sweep is stuck, not waiting for the flock"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        out, _ = sweep.communicate(timeout=30)
        return out, finished
    finally:
        for proc in (sweep, holder):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_expire_sweep_does_not_hang_on_a_users_flock_of_their_maildir(expire_world):
    """Taking over a stale lock link waited, without bound, for a flock the
    user can hold on their own Maildir: the root-run sweep, and every mailbox
    after this one, stopped for as long as the user liked."""
    nobody, base, maildir, victim, config = expire_world
    out, finished = _attack_expire(nobody, maildir, victim, config, swap=False)
    assert "Traceback" not in out, out
    assert finished, f"the sweep waited for the user's flock: {out}"


def test_expire_sweep_takes_no_lock_outside_the_maildir(expire_world):
    """While the sweep waited for the flock the user swapped their Maildir for
    a link to a directory of root's: the lock was then taken by path, through
    that link, so root deleted the victim's file named fastpop.lock (taking a
    plain file there as a stale lock), put its own link there, and removed it."""
    nobody, base, maildir, victim, config = expire_world
    out, _ = _attack_expire(nobody, maildir, victim, config, swap=True)
    assert "Traceback" not in out, out
    assert os.path.lexists(victim / "fastpop.lock"), f"root deleted a file outside the Maildir: {out}"
    assert not os.path.islink(victim / "fastpop.lock")
    assert (victim / "fastpop.lock").read_bytes() == b"root's file\n"


def test_server_login_does_not_wait_for_a_users_flock_of_their_maildir():
    """The same wait in the server: the lock is taken in the event loop, so a
    user holding a flock on their own Maildir (with a plain file as the lock)
    froze every session of the worker at their login."""
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-flock-"))
    srv = ServerProcess(base / "srv", "cython", extra_args=["--mail-lock", "symlink"])
    held = None
    try:
        attacker = srv.add_user([message("one")], name="attacker")
        other = srv.add_user([message("two")], name="other")
        (attacker.maildir / "fastpop.lock").write_bytes(b"a plain file: stale at once\n")
        srv.start()
        held = os.open(attacker.maildir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX)  # what the Maildir's owner may do at any time
        r = Raw(srv.port, timeout=10)
        assert r.cmd(f"USER {attacker.name}").startswith(b"+OK")
        reply = r.cmd(f"PASS {attacker.password}")  # a timeout (the loop stuck in flock) raises
        assert reply.startswith(b"-ERR [IN-USE]"), reply
        r2 = Raw(srv.port, timeout=10)
        assert r2.cmd(f"USER {other.name}").startswith(b"+OK")
        assert r2.cmd(f"PASS {other.password}").startswith(b"+OK")
        assert r2.cmd("QUIT").startswith(b"+OK")
        assert "Traceback" not in srv.log()
    finally:
        if held is not None:
            os.close(held)
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_mbox_import_does_not_hold_every_message_of_a_huge_spool():
    """The spool is its user's file: ~100 MB of empty messages (a From_ line
    and an empty line each, 3 million) made the check before the import hold
    a Span per message, ~850 MB; 10 GB of spool would take ~85 GB of root's
    memory.  Checked under a 512 MiB limit, with --dry-run (the same check)."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-spool-"))
    try:
        spool = base / "spool"
        spool.write_bytes(b"From a Mon Jan  1 10:00:00 2024\n\n" * 3_000_000)
        os.chown(spool, nobody.pw_uid, nobody.pw_gid)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))

        result = subprocess.run([sys.executable, "-m", "fastpop", "import", "mbox", str(spool),
                                 "--maildir", str(base / "Maildir"), "--dry-run"],
                                capture_output=True, timeout=120, preexec_fn=limit)
        assert b"MemoryError" not in result.stderr and b"Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.returncode == 0 and b"3000000 messages" in result.stdout, (result.stdout, result.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# The user's side of the read-back attack: as each message lands in new/
# (inotify IN_MOVED_TO), put a sparse file of a terabyte in its place.
_SWAPPER = """
m = sys.argv[1]
libc = ctypes.CDLL("libc.so.6", use_errno=True)
ifd = libc.inotify_init()
libc.inotify_add_watch(ifd, (m + "/new").encode(), 0x80)
print("ready", flush=True)
while True:
    buf = os.read(ifd, 4096)
    i = 0
    while i < len(buf):
        _wd, _mask, _cookie, ln = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16:i + 16 + ln].rstrip(b"\\0").decode()
        i += 16 + ln
        try:
            os.rename(m + "/new/" + name, m + "/moved-" + name)
            fd = os.open(m + "/new/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, 1 << 40)
            os.close(fd)
            print("swapped", flush=True)
        except OSError:
            pass
"""


def test_mbox_import_does_not_read_back_a_huge_file_swapped_in():
    """Each stored message is read back and hashed: the user, watching new/
    with inotify, replaced it at once (the import's fsync of new/ gives them
    the time) by a sparse file of 1 TiB, which root then read to the end, for
    hours.  The read-back now reads no more than what was stored."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="fastpop-attack-readback-"))
    base.chmod(0o755)
    swapper = None
    try:
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        maildir = home / "Maildir"
        _as_user(nobody.pw_uid, nobody.pw_gid,
                 "for d in ('', '/cur', '/new', '/tmp'): os.mkdir(sys.argv[1] + d, 0o700)\n", str(maildir))
        spool = base / "spool"
        spool.write_bytes(b"".join(b"From a Mon Jan  1 10:00:%02d 2024\nSubject: %d\n\nbody\n\n" % (i, i)
                                   for i in range(10)))
        os.chown(spool, nobody.pw_uid, nobody.pw_gid)
        # (ctypes and struct before giving up root: the interpreter's modules may be root's alone)
        prelude = ("import ctypes, os, struct, sys\nctypes.CDLL('libc.so.6')\n"
                   f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n")
        swapper = subprocess.Popen([sys.executable, "-c", prelude + _SWAPPER, str(maildir)],
                                   stdout=subprocess.PIPE, text=True)
        assert swapper.stdout.readline().strip() == "ready"
        try:
            result = subprocess.run([sys.executable, "-m", "fastpop", "import", "mbox", str(spool),
                                     "--maildir", str(maildir)], capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the import was still reading the file swapped in after 60 s")
        assert b"Traceback" not in result.stderr, result.stderr
        if result.returncode != 0:  # the swap was seen: refused, at once
            assert b"reads back differently" in result.stderr, result.stderr
    finally:
        if swapper is not None:
            swapper.kill()
            swapper.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
