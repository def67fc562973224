"""``fastpop deliver``: a real process fed on stdin, every sysexits path, and
what it stores fetched back through a real fastpop server."""

from __future__ import annotations

import os
import pty
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.server import AS_ROOT, message

from fastpop.wire.stuffing import pop3_size

NAME = re.compile(r"^(\d+)\.M(\d{6})P(\d+)Q(\d+)\.([^,/:]+),S=(\d+),W=(\d+)$")
IS_ROOT = os.geteuid() == 0


def run_deliver(args: list[str], data: bytes | None = b"", timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, *args],
        input=data,
        capture_output=True,
        timeout=timeout,
        **kw,
    )


class Box:
    """A passwd-file and mail root of the test's own, no server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.passwd = root / "passwd"
        self.mail = root / "mail"
        self.mail.mkdir(parents=True, exist_ok=True)
        self.passwd.write_text("alice:{PLAIN}pw\nbob@example.com:{PLAIN}pw\n")

    def args(self, user: str = "alice") -> list[str]:
        return ["--passwd-file", str(self.passwd), "--mail-location", f"{self.mail}/%u", "--user", user]

    def deliver(self, data: bytes, user: str = "alice", extra: list[str] = (), **kw) -> subprocess.CompletedProcess:
        return run_deliver([*self.args(user), *extra], data, **kw)

    def new(self, user: str = "alice") -> list[Path]:
        d = self.mail / user / "new"
        return sorted(d.iterdir()) if d.exists() else []

    def tmp(self, user: str = "alice") -> list[Path]:
        d = self.mail / user / "tmp"
        return sorted(d.iterdir()) if d.exists() else []


@pytest.fixture
def box(tmp_path):
    return Box(tmp_path)


def assert_failed(r: subprocess.CompletedProcess, code: int, text: str, box: Box | None = None, user: str = "alice"):
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert text in err, err
    assert err.count("\n") == 1 and err.startswith("fastpop deliver: "), err  # one line, no traceback
    if box is not None:
        assert box.new(user) == [], "a failed delivery left a file in new/"
        assert box.tmp(user) == [], "a failed delivery left a file in tmp/"


# -- what is stored


STORED = [
    ("crlf", b"Subject: a\r\n\r\nbody\r\n", b"Subject: a\r\n\r\nbody\r\n"),
    ("lf", b"Subject: a\n\nbody\n", b"Subject: a\r\n\r\nbody\r\n"),
    ("mixed", b"Subject: a\r\n\nline\nline\r\n", b"Subject: a\r\n\r\nline\r\nline\r\n"),
    ("no final newline", b"Subject: a\n\nbody", b"Subject: a\r\n\r\nbody\r\n"),
    ("bare cr is an octet", b"Subject: a\n\nx\ry\n\r", b"Subject: a\r\n\r\nx\ry\r\n\r\r\n"),
    ("dots untouched", b"Subject: a\n\n.\n..x\n.", b"Subject: a\r\n\r\n.\r\n..x\r\n.\r\n"),
    ("empty", b"", b""),
    ("mbox From_ line dropped", b"From bob@example.com Thu Jan  1 00:00:00 2024\nSubject: a\n\nb\n",
     b"Subject: a\r\n\r\nb\r\n"),
    ("8-bit", "Subject: \u00e4\n\n\u00fc\u00df\n".encode("latin-1"),
     "Subject: \u00e4\r\n\r\n\u00fc\u00df\r\n".encode("latin-1")),
]


@pytest.mark.parametrize("data, expected", [s[1:] for s in STORED], ids=[s[0] for s in STORED])
def test_stored_with_crlf_and_sizes_in_name(box, data, expected):
    r = box.deliver(data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and r.stderr == b""
    [path] = box.new()
    assert path.read_bytes() == expected
    m = NAME.match(path.name)
    assert m, path.name
    s, w = int(m.group(6)), int(m.group(7))
    assert s == w == len(expected) == path.stat().st_size
    assert w == pop3_size(str(path))  # what RETR will send, so LIST is right and the file can go as it is
    assert box.tmp() == []
    assert path.stat().st_mode & 0o777 == 0o600


def test_names_are_unique_and_in_delivery_order(box):
    for i in range(5):
        assert box.deliver(message(f"m{i}")).returncode == 0
    files = box.new()
    assert len(files) == 5
    keys = [(int(NAME.match(f.name).group(1)), f.name) for f in files]
    # fastpop.store.maildir orders by (seconds, name); the zero-padded microseconds keep that the delivery order
    by_mtime = sorted(files, key=lambda f: f.stat().st_mtime_ns)
    assert [f.name for f in by_mtime] == [k[1] for k in sorted(keys)]
    assert len({NAME.match(f.name).group(3) for f in files}) == 5  # one process each


def test_address_forms_resolve_to_the_user(box):
    for user in ("alice", "alice@example.com", "alice+lists@example.com", "bob@example.com", "bob+x@EXAMPLE.COM"):
        r = run_deliver(box.args(user), message(user))
        assert r.returncode == 0, (user, r.stderr)
    assert len(box.new("alice")) == 3
    assert len(box.new("bob@example.com")) == 2


def test_config_file(box, tmp_path):
    cfg = tmp_path / "fastpop.toml"
    cfg.write_text(f'[auth]\npasswd_file = "{box.passwd}"\n[mail]\nlocation = "{box.mail}/%u"\n')
    r = run_deliver(["--config", str(cfg), "--user", "alice"], message("via config"))
    assert r.returncode == 0, r.stderr
    assert [p.read_bytes() for p in box.new()] == [message("via config")]


def test_maildir_created_and_maildirsize_updated(box):
    r = box.deliver(message("first"), user="bob@example.com")
    assert r.returncode == 0, r.stderr
    maildir = box.mail / "bob@example.com"
    assert sorted(p.name for p in maildir.iterdir()) == ["cur", "new", "tmp"]
    (maildir / "maildirsize").write_bytes(b"0S,0C\n0 0\n")
    data = message("second")
    assert box.deliver(data, user="bob@example.com").returncode == 0
    assert (maildir / "maildirsize").read_bytes() == b"0S,0C\n0 0\n%d 1\n" % len(data)


def test_max_size(box):
    assert box.deliver(message(size=1000), extra=["--max-size", "1K"]).returncode == 0
    r = box.deliver(message(size=1025), extra=["--max-size", "1K"])
    assert_failed(r, 65, "larger than --max-size", None)
    assert len(box.new()) == 1 and box.tmp() == []


# -- retrieval through a real server


def test_delivered_messages_retrieved_byte_exactly(server):
    user = server.add_user()
    args = ["--passwd-file", str(server.passwd), "--mail-location", f"{server.mail}/%u", "--user", user.name]
    inputs = [
        b"Subject: one\n\n.starts with a dot\n..two dots\n.\nend",
        b"Subject: two\r\n\r\nbare\rcr and \xff 8-bit\r\n",
        b"",
        message("four", size=300_000),
    ]
    for data in inputs:
        r = run_deliver(args, data)
        assert r.returncode == 0, r.stderr
    files = sorted((user.maildir / "new").iterdir(), key=lambda f: (int(f.name.split(".")[0]), f.name))
    stored = [f.read_bytes() for f in files]
    assert stored[0] == b"Subject: one\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n"
    w_sizes = [int(NAME.match(f.name).group(7)) for f in files]
    p = user.login()
    try:
        assert p.stat() == (4, sum(w_sizes))
        listing = [tuple(map(int, line.split())) for line in p.list()[1]]
        assert listing == [(i + 1, w) for i, w in enumerate(w_sizes)]
        for i, expected in enumerate(stored):
            resp, lines, _octets = p.retr(i + 1)
            assert resp == b"+OK %d octets" % w_sizes[i]
            got = b"\r\n".join(lines) + b"\r\n" if lines else b""
            assert got == expected
    finally:
        p.quit()
    # the login brought the mailbox index up to date from the names, and every
    # delivered file is marked as stored exactly as RETR sends it (sendfile)
    from fastpop.store import index

    idx = index.load(str(user.maildir))
    assert idx is not None and idx.count == 4
    assert [idx.size(i) for i in range(4)] == w_sizes
    assert all(idx.record(i)[5] & index.FLAG_STORED_AS_SENT for i in range(4))


# -- every exit status


def test_usage_errors_are_64(box):
    assert_failed(run_deliver(["--passwd-file", str(box.passwd)]), 64, "--user")
    assert_failed(run_deliver([*box.args(), "--max-size", "lots"]), 64, "not a size")
    assert_failed(run_deliver([*box.args(), "--bogus"]), 64, "unrecognized arguments")


def test_unknown_user_is_67(box):
    assert_failed(box.deliver(message(), user="carol"), 67, "no such user: carol", box, "carol")
    # a name that could climb out of the mail root is no user either, and touches nothing
    assert_failed(box.deliver(message(), user="../alice"), 67, "no such user", box)
    assert_failed(box.deliver(message(), user=".hidden"), 67, "no such user", box)
    assert sorted(p.name for p in box.mail.iterdir()) == []


def test_no_stdin_is_66(box):
    r = run_deliver(box.args(), None, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert_failed(r, 66, "standard input is not open", box)


def test_unreadable_stdin_is_74(box):
    master, slave = pty.openpty()
    os.close(slave)  # read() on a pty master without its slave fails with EIO
    try:
        r = run_deliver(box.args(), None, stdin=master)
    finally:
        os.close(master)
    assert_failed(r, 74, "cannot read the message from standard input", box)


def test_user_database_unavailable_is_75(box):
    box.passwd.unlink()
    assert_failed(box.deliver(message()), 75, "user database unavailable", box)
    box.passwd.mkdir()
    assert_failed(box.deliver(message()), 75, "user database unavailable", box)
    box.passwd.rmdir()
    # a broken line costs only its own user (logged and skipped, as Dovecot does): alice's
    # mail is delivered, not deferred while the file waits for a hand fix
    box.passwd.write_text("alice:{PLAIN}pw\n:no-name\n")
    r = box.deliver(message())
    assert r.returncode == 0, r.stderr
    assert len(box.new()) == 1


def _wait_for_handler(pid: int, sig: int, timeout: float = 20) -> None:
    """Until the process catches ``sig`` (SigCgt in /proc): deliver is then running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & (1 << (sig - 1)):
            return
        time.sleep(0.02)
    raise AssertionError("fastpop deliver did not start")


def test_interrupted_by_signal_is_75(box):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, *box.args()],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        proc.stdin.write(b"Subject: half a message\n\n")
        proc.stdin.flush()
        _wait_for_handler(proc.pid, signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err
    assert b"interrupted by SIGTERM, nothing stored" in err
    assert box.new() == [] and box.tmp() == []


def test_mail_location_under_a_file_is_73(box):
    (box.root / "plainfile").write_bytes(b"")
    args = ["--passwd-file", str(box.passwd), "--mail-location", f"{box.root}/plainfile/%u", "--user", "alice"]
    assert_failed(run_deliver(args, message()), 73, "Not a directory")
    # a file where the Maildir's tmp/ should be
    (box.mail / "alice").mkdir()
    (box.mail / "alice" / "tmp").write_bytes(b"")
    assert_failed(box.deliver(message()), 73, "a file is where a directory should be")
    assert box.new() == []


@pytest.fixture
def open_dir():
    """A directory that other users can enter (pytest's tmp_path cannot)."""
    path = Path(tempfile.mkdtemp(prefix="fastpop-deliver-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# The interpreter may live where "nobody" cannot read (/root/.pyenv): start as
# root, import what deliver needs, then drop to nobody and run it.
AS_NOBODY = """
import os, pwd, sys
import fastpop.auth.authenticator, fastpop.cli, fastpop.config, fastpop.delivery.cli, fastpop.delivery.local
import fastpop.delivery.legacy_import, fastpop.auth.passwd_file, fastpop.auth.passwords
fastpop.cli.build_parser()  # imports every subcommand's module while still root
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
sys.exit(fastpop.cli.main(["deliver", *sys.argv[1:]]))
"""


def deliver_as_nobody(box: Box, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AS_NOBODY, *box.args()], input=data, capture_output=True, timeout=30)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run deliver as another user")
def test_maildir_not_writable_is_73(open_dir):
    box = Box(open_dir)
    box.passwd.chmod(0o644)
    (box.mail / "alice" / "new").mkdir(parents=True)  # root's, 0755: nobody cannot write
    (box.mail / "alice" / "cur").mkdir()
    (box.mail / "alice" / "tmp").mkdir()
    r = deliver_as_nobody(box, message())
    # refused before the kernel is asked: a Maildir not the writer's own is not written
    assert_failed(r, 73, "owned by uid 0, served as uid", box)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run deliver as another user")
def test_uid_mismatch_is_77(open_dir):
    box = Box(open_dir)
    box.passwd.write_text("alice:{PLAIN}pw:4321:4321\n")
    box.passwd.chmod(0o644)
    r = deliver_as_nobody(box, message())
    assert_failed(r, 77, "has uid 4321", box)


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_root_switches_to_the_users_uid(open_dir):
    nobody = pwd.getpwnam("nobody")
    box = Box(open_dir)
    box.passwd.write_text(f"alice:{{PLAIN}}pw:{nobody.pw_uid}:{nobody.pw_gid}\n")
    os.chown(box.mail, nobody.pw_uid, nobody.pw_gid)
    r = box.deliver(message("as nobody"))
    assert r.returncode == 0, r.stderr
    [path] = box.new()
    assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert (box.mail / "alice").stat().st_uid == nobody.pw_uid


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_root_writes_as_the_servers_user(open_dir):
    nobody = pwd.getpwnam("nobody")
    box = Box(open_dir)
    os.chown(box.mail, nobody.pw_uid, nobody.pw_gid)
    cfg = open_dir / "fastpop.toml"
    cfg.write_text(f'[server]\nuser = "nobody"\n[auth]\npasswd_file = "{box.passwd}"\n'
                   f'[mail]\nlocation = "{box.mail}/%u"\n')
    r = run_deliver(["--config", str(cfg), "--user", "alice"], message("for the server"))
    assert r.returncode == 0, r.stderr
    [path] = box.new()
    assert path.stat().st_uid == nobody.pw_uid


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_uid_without_gid_is_78(box):
    uid = next(u for u in range(40000, 50000) if not _has_uid(u))
    box.passwd.write_text(f"alice:{{PLAIN}}pw:{uid}\n")
    assert_failed(box.deliver(message()), 78, f"has uid {uid} but no gid", box)


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def test_config_errors_are_78(box, tmp_path):
    assert_failed(run_deliver(["--user", "alice"], message()), 78, "no passwd_file configured")
    bad = tmp_path / "bad.toml"
    bad.write_text("[auth\n")
    assert_failed(run_deliver(["--config", str(bad), "--user", "alice"], message()), 78, "cannot use config")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[auth]\nnope = 1\n")
    assert_failed(run_deliver(["--config", str(unknown), "--user", "alice"], message()), 78, "unknown setting")
    missing = tmp_path / "missing.toml"
    assert_failed(run_deliver(["--config", str(missing), "--user", "alice"], message()), 78, "cannot use config")
    if IS_ROOT:
        no_such = tmp_path / "no-such-user.toml"
        no_such.write_text(f'[server]\nuser = "no-such-user-here"\n[auth]\npasswd_file = "{box.passwd}"\n'
                           f'[mail]\nlocation = "{box.mail}/%u"\n')
        assert_failed(run_deliver(["--config", str(no_such), "--user", "alice"], message()), 78, "no such system user")
    # %h for a user without a home
    args = ["--passwd-file", str(box.passwd), "--mail-location", "%h/Maildir", "--user", "alice"]
    assert_failed(run_deliver(args, message()), 78, "has no home")


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs, or a skip if this machine cannot mount one."""
    if not IS_ROOT or not shutil.which("mount"):
        pytest.skip("disk-full test needs root to mount a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_75_and_leaves_nothing(box, small_fs):
    args = ["--passwd-file", str(box.passwd), "--mail-location", f"{small_fs}/%u", "--user", "alice"]
    r = run_deliver(args, message("too big", size=600_000))
    err = r.stderr.decode()
    assert r.returncode == 75, err
    assert "No space left on device" in err and err.count("\n") == 1
    maildir = small_fs / "alice"
    assert list((maildir / "new").iterdir()) == [] and list((maildir / "tmp").iterdir()) == []
    # the space is given back: a message that fits goes in
    r = run_deliver(args, message("fits"))
    assert r.returncode == 0, r.stderr
    assert [p.read_bytes() for p in (maildir / "new").iterdir()] == [message("fits")]


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_a_user_with_uid_0_is_not_delivered_as_root(box):
    """A uid of 0 from the user database (an LDAP uidNumber, a field injected into a
    passwd-file line) would make deliver write as root: refused like no uid, EX_CONFIG."""
    box.passwd.write_text("alice:{PLAIN}pw:0:0\n")
    r = subprocess.run([sys.executable, "-m", "fastpop", "deliver", *box.args()], input=message(),
                       capture_output=True, timeout=30)
    assert_failed(r, 78, "has uid 0", box)
