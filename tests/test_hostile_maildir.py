"""Attacks from issue 16, by a user who can write their own Maildir, against a
real fastpop over TCP: none may read, write, create, append to or delete a
file outside that Maildir.

Two configurations when the tests run as root (as CI does):

- ``dropped``: fastpop started as root with ``--user nobody``; the Maildirs
  belong to nobody.  The outside files attacked are nobody's too (another
  user's mail on a host where every Maildir belongs to one ``vmail`` uid): a
  root-only file would be safe from a process running as nobody anyway.
- ``root``: fastpop started as root with ``--allow-mail-as-root`` (the
  opt-out of issue 16); the outside files are root's, mode 0600.

Run unprivileged, the same attacks run against a server of the test's own
uid (``self``); the tests about root skip.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support.server import Raw, ServerProcess, message

from fastpop.store.index import Entry, encode

IS_ROOT = os.geteuid() == 0
CONFIGS = ["dropped", "root"] if IS_ROOT else ["self"]
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: the attacks on root and on privilege dropping")

SETTLED_NS = 3600 * 10**9  # an mtime this far back is trusted by the index
INDEX = "fastpop.index"
PERM = b"-ERR [SYS/PERM]"
REPLY_TIMEOUT = 5.0  # seconds: a hang (a FIFO opened for reading) shows as a timeout


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover - every Linux has it
        pytest.skip("no user 'nobody' on this host")


# -- the set-up: a server, its Maildirs, and files outside them


class Box:
    """A world-reachable base directory with a fastpop (``srv``) whose mail
    root is ``base/srv/mail`` and an ``outside`` directory next to it, owned
    like the Maildirs (mode 0700) for the victims of the attacks."""

    def __init__(self, mode: str, extra_args: list[str] = ()) -> None:
        self.mode = mode
        self.base = Path(tempfile.mkdtemp(prefix="fastpop-hostile-"))
        self.base.chmod(0o755)  # "nobody" must reach the mail root (pytest's tmp_path is in a 0700 directory)
        args = list(extra_args)
        if mode == "dropped":
            nobody = _nobody()
            self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
            args += ["--user", "nobody"]
        elif mode == "root":
            self.uid = self.gid = 0
            args += ["--allow-mail-as-root"]
        else:
            self.uid, self.gid = os.geteuid(), os.getegid()
        self.srv = ServerProcess(self.base / "srv", "cython", extra_args=args)
        self.outside = self.base / "outside"
        self.outside.mkdir(mode=0o700)
        self.own(self.outside)

    # files
    def own(self, path: Path) -> None:
        """chown ``path`` and what is below it to the served uid, links not followed."""
        if not IS_ROOT:
            return
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        if path.is_dir() and not path.is_symlink():
            for top, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(top, name), self.uid, self.gid, follow_symlinks=False)

    def victim(self, name: str, data: bytes | None = None) -> Path:
        """A file outside every Maildir, mode 0600, that the served uid could read and write."""
        path = self.outside / name
        path.write_bytes(data if data is not None else b"SECRET " + secrets.token_hex(16).encode() + b"\r\n")
        path.chmod(0o600)
        self.own(path)
        return path

    def victim_dir(self, name: str) -> Path:
        path = self.outside / name
        path.mkdir(mode=0o700)
        self.own(path)
        return path

    def fifo(self, path: Path) -> Path:
        os.mkfifo(path, 0o600)
        return path

    # the server
    def add_user(self, **kw):
        return self.srv.add_user(**kw)

    def start(self) -> None:
        self.own(self.srv.mail)
        if IS_ROOT:
            os.chown(self.srv.passwd, self.uid, self.gid)
        self.srv.start()

    def log_since(self, offset: int) -> str:
        return self.srv.log()[offset:]

    def log_size(self) -> int:
        return len(self.srv.log())

    def close(self) -> None:
        fifos = [os.path.join(top, name) for top, _dirs, files in os.walk(self.base) for name in files
                 if stat.S_ISFIFO(os.lstat(os.path.join(top, name)).st_mode)]
        stopped = threading.Event()

        def unblock() -> None:  # a reader blocked in open() gets EOF, one FIFO after the other
            while not stopped.wait(0.01):
                for path in fifos:
                    try:
                        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    except OSError:
                        pass

        helper = threading.Thread(target=unblock, daemon=True)
        if fifos:
            helper.start()
        try:
            if self.srv.proc is not None:
                self.srv.stop()
        finally:
            stopped.set()
            if fifos:
                helper.join()
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(params=CONFIGS)
def box(request):
    b = Box(request.param)
    yield b
    log = b.srv.log()
    b.close()
    assert "Traceback" not in log, log


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything below ``root`` (links not followed): kind, content, mtime."""
    out: dict[str, tuple] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(top, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), st.st_mtime_ns, st.st_ino)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = ("dir" if stat.S_ISDIR(st.st_mode) else "other", st.st_mtime_ns, st.st_ino)
    return out


def file_state(path: Path) -> tuple:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino, st.st_size


def put_cur(user, name: str, data: bytes) -> Path:
    path = user.maildir / "cur" / name
    path.write_bytes(data)
    return path


def write_index(user, entries: list[Entry]) -> None:
    """A valid-looking fastpop.index as the Maildir owner can write it: checksum
    right, cur/'s mtime settled and recorded in the header."""
    cur = user.maildir / "cur"
    then = time.time_ns() - SETTLED_NS
    os.utime(cur, ns=(then, then))
    (user.maildir / INDEX).write_bytes(encode(entries, cur.stat().st_mtime_ns, 0))


def login(box: Box, user, timeout: float = REPLY_TIMEOUT) -> tuple[Raw, bytes]:
    r = Raw(box.srv.port, timeout=timeout)
    assert r.cmd(f"USER {user.name}").startswith(b"+OK")
    return r, r.cmd(f"PASS {user.password}")


def stat_count(r: Raw) -> int:
    reply = r.cmd("STAT")
    assert reply.startswith(b"+OK "), reply
    return int(reply.split()[1])


def retr(r: Raw, n: int) -> bytes | None:
    """Message n as sent (still dot-stuffed), or None for an -ERR."""
    status = r.cmd(f"RETR {n}")
    if not status.startswith(b"+OK"):
        return None
    return r.body()


def quit_(r: Raw) -> bytes:
    reply = r.cmd("QUIT")
    r.close()
    return reply


# -- 1. a crafted fastpop.index


def _crafted_index(box: Box, user) -> tuple[Path, Path, bytes]:
    """cur/ holds one real message; the index lists files outside the Maildir."""
    secret = box.victim("secret")
    secret_dir = box.victim_dir("directory")
    real = message("the real one")
    put_cur(user, "1700000001.M1P1.host:2,", real)
    rel = os.path.relpath(secret, user.maildir / "cur")  # ../../../../outside/secret
    data = secret.read_bytes()
    entries = [
        Entry(rel, len(data), len(data), 1, "evil1"),  # message 1: the outside file
        Entry(str(secret), len(data), len(data), 1, "evil2"),  # an absolute path
        Entry(os.path.relpath(secret_dir, user.maildir / "cur"), 10, 10, 0, "evil3"),  # a directory
        Entry("1700000002.M2P2.host:2,\0/../../secret", len(data), len(data), 1, "evil4"),  # a NUL
        Entry("1700000001.M1P1.host:2,", len(real), len(real), 1, "1700000001"),
    ]
    write_index(user, entries)
    return secret, secret_dir, real


def test_crafted_index_cannot_serve_an_outside_file(box):
    user = box.add_user()
    secret, _, real = _crafted_index(box, user)
    before = file_state(secret)
    box.start()
    offset = box.log_size()
    r, reply = login(box, user)
    assert reply.startswith(b"+OK"), reply
    count = stat_count(r)
    served = []
    for n in range(1, count + 1):
        body = retr(r, n)
        assert body is None or before[0] not in body, f"RETR {n} sent the outside file {secret}"
        served.append(body)
    assert real in served, "the Maildir's own message must still be served (index rebuilt from cur/)"
    assert count == 1
    quit_(r)
    log = box.log_since(offset)
    assert re.search(r"ignoring index .*fastpop\.index.*rebuild", log), log
    assert file_state(secret) == before


def test_crafted_index_cannot_delete_an_outside_file(box):
    user = box.add_user()
    secret, secret_dir, _ = _crafted_index(box, user)
    outside = snapshot(box.outside)
    box.start()
    r, reply = login(box, user)
    assert reply.startswith(b"+OK"), reply
    for n in range(1, 6):  # whatever the server lists: everything the index named
        r.cmd(f"DELE {n}")
    try:
        reply = quit_(r)
    except EOFError as exc:  # (the files are what matters here)
        reply = repr(exc).encode()
    assert secret.exists(), f"DELE + QUIT unlinked {secret}, outside the Maildir ({reply!r})"
    assert secret_dir.is_dir()
    assert snapshot(box.outside) == outside
    assert list((user.maildir / "cur").iterdir()) == []  # the real message was deleted as asked


# -- 2. symlinks in cur/ and new/


def test_symlinks_in_cur_and_new_are_never_listed_served_moved_or_deleted(box):
    user = box.add_user()
    secret = box.victim("secret")
    secret2 = box.victim("secret2")
    real = message("real")
    put_cur(user, "1700000001.M2P1.host:2,", real)
    link_cur = user.maildir / "cur" / "1700000000.M1P1.host:2,"
    link_new = user.maildir / "new" / "1700000002.M3P1.host"
    os.symlink(secret, link_cur)
    os.symlink(secret2, link_new)
    outside = snapshot(box.outside)
    box.start()
    offset = box.log_size()
    r, reply = login(box, user)
    assert reply.startswith(b"+OK"), reply
    count = stat_count(r)
    status = r.cmd("LIST")
    assert status.startswith(b"+OK")
    listing = r.body()
    for n in range(1, count + 1):
        body = retr(r, n)
        assert body is None or (secret.read_bytes() not in body and secret2.read_bytes() not in body), (
            f"RETR {n} sent a symlink's target"
        )
    assert count == 1, f"a symlink was listed: {listing!r}"
    for n in range(1, count + 1):
        r.cmd(f"DELE {n}")
    assert quit_(r).startswith(b"+OK")
    assert os.readlink(link_cur) == str(secret), "the symlink in cur/ was deleted or replaced"
    assert os.readlink(link_new) == str(secret2), "the symlink in new/ was moved"
    assert snapshot(box.outside) == outside
    log = box.log_since(offset)
    assert "1700000000.M1P1.host" in log, "no log line about the skipped symlink in cur/:\n" + log
    assert "1700000002.M3P1.host" in log, "no log line about the skipped symlink in new/:\n" + log


# -- 3. a symlinked Maildir, cur/, new/ or tmp/


@pytest.mark.parametrize("linked", ["maildir", "cur", "new", "tmp"])
def test_symlinked_maildir_or_subdirectory_is_refused(box, linked):
    other = box.add_user()  # another user's Maildir, readable by the served uid
    other.deliver(message("other's new mail"))
    put_cur(other, "1700000001.M1P1.host:2,", message("other's old mail"))
    attacker = box.add_user()
    if linked == "maildir":
        shutil.rmtree(attacker.maildir)
        os.symlink(other.maildir, attacker.maildir)
        where = attacker.maildir
    else:
        where = attacker.maildir / linked
        where.rmdir()
        os.symlink(other.maildir / linked, where)
    box.start()
    before = snapshot(other.maildir)
    offset = box.log_size()
    r, reply = login(box, attacker)
    try:
        assert reply.startswith(PERM), f"login through the symlinked {linked} answered {reply!r}"
    finally:
        r.close()
    assert snapshot(other.maildir) == before, "the other user's Maildir was changed"
    log = box.log_since(offset)
    assert re.search(r"(WARNING|ERROR).*" + re.escape(str(attacker.maildir)), log), (
        "no WARNING/ERROR line naming the Maildir:\n" + log
    )


# -- 4. FIFOs and directories where messages belong


def test_fifos_and_directories_named_like_messages_are_skipped(box):
    user = box.add_user()
    real = message("real")
    put_cur(user, "1700000004.M5P1.host:2,", real)
    odd = [
        box.fifo(user.maildir / "cur" / "1700000000.M1P1.host:2,"),
        box.fifo(user.maildir / "new" / "1700000002.M3P1.host"),
    ]
    for path in (user.maildir / "cur" / "1700000001.M2P1.host:2,", user.maildir / "new" / "1700000003.M4P1.host"):
        path.mkdir()
        odd.append(path)
    box.start()
    offset = box.log_size()
    started = time.monotonic()
    try:
        r, reply = login(box, user)
        assert reply.startswith(b"+OK"), reply
        assert stat_count(r) == 1
        assert retr(r, 1) == real
        assert quit_(r).startswith(b"+OK")
    except TimeoutError:
        pytest.fail(f"the server hung ({time.monotonic() - started:.1f} s): a FIFO was opened for reading")
    for path in odd:  # where they were: not moved from new/ to cur/
        assert os.path.lexists(path), f"{path} was moved or removed"
    log = box.log_since(offset)
    for path in odd:
        assert path.name.split(":")[0] in log, f"no log line about the skipped {path}:\n{log}"


def test_fifo_in_place_of_an_indexed_message_does_not_hang_retr(box):
    user = box.add_user()
    name = "1700000000.M1P1.host:2,"
    data = message("soon a FIFO")
    path = put_cur(user, name, data)
    write_index(user, [Entry(name, len(data), len(data), 1, "1700000000")])  # what the server would have written
    mtime = (user.maildir / "cur").stat().st_mtime_ns
    path.unlink()  # the owner swaps the file for a FIFO and puts cur/'s mtime back
    box.fifo(path)
    os.utime(user.maildir / "cur", ns=(mtime, mtime))
    box.start()
    started = time.monotonic()
    try:
        r, reply = login(box, user)
        assert reply.startswith(b"+OK"), reply
        assert retr(r, 1) is None  # an -ERR: nothing to read there
        quit_(r)
    except TimeoutError:
        pytest.fail(f"the server hung ({time.monotonic() - started:.1f} s): RETR opened a FIFO for reading")
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    probe = Raw(box.srv.port, timeout=REPLY_TIMEOUT)  # and the server still answers others
    assert probe.greeting.startswith(b"+OK")
    probe.close()


# -- 5. the index's temporary file


def test_planted_index_temporary_does_not_overwrite_an_outside_file(box):
    user = box.add_user()
    victim = box.victim("victim", b"precious contents\n")
    # A few thousand new messages without sizes in their names keep the
    # rebuild busy (each file is read), as in the race.
    new = user.maildir / "new"
    for i in range(3000):
        (new / f"{1700000000 + i}.M{i}P1.host").write_bytes(b"Subject: %d\r\n\r\nx\r\n" % i)
    box.srv.extra_args.append("--apop")  # the server's pid, from the greeting's APOP timestamp
    box.start()
    before = file_state(victim)
    r = Raw(box.srv.port, timeout=30)
    m = re.search(rb"<(\d+)\.", r.greeting)
    assert m, r.greeting
    pids = {int(m.group(1)), box.srv.proc.pid}
    names = [user.maildir / f"{INDEX}.tmp.{pid + d}" for pid in pids for d in range(3)]
    stop = threading.Event()

    def plant() -> None:
        while not stop.is_set():
            for link in names:
                try:
                    os.symlink(victim, link)
                    if IS_ROOT:
                        os.chown(link, box.uid, box.gid, follow_symlinks=False)
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    return

    planter = threading.Thread(target=plant, daemon=True)
    planter.start()
    try:
        assert r.cmd(f"USER {user.name}").startswith(b"+OK")
        reply = r.cmd(f"PASS {user.password}")
    finally:
        stop.set()
        planter.join(10)
    for link in names:
        if link.is_symlink():
            link.unlink()
    assert file_state(victim) == before, f"{victim} was overwritten through a planted index temporary"
    assert reply.startswith(b"+OK"), reply
    assert stat_count(r) == 3000
    quit_(r)


# -- 6. delivery through symlinks


def _lmtp_port(box: Box) -> int:
    m = re.search(r"LMTP listening on 127\.0\.0\.1:(\d+)", box.srv.log())
    assert m, box.srv.log()
    return int(m.group(1))


@pytest.fixture(params=CONFIGS)
def lmtp_box(request):
    b = Box(request.param, extra_args=["--lmtp-listen", "127.0.0.1:0"])
    yield b
    log = b.srv.log()
    b.close()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("linked", ["new", "tmp"])
def test_lmtp_does_not_deliver_through_a_symlinked_subdirectory(lmtp_box, linked):
    box = lmtp_box
    user = box.add_user()
    target = box.victim_dir("dropbox")
    (user.maildir / linked).rmdir()
    os.symlink(target, user.maildir / linked)
    box.start()
    before = snapshot(box.outside), target.stat().st_mtime_ns
    with smtplib.LMTP("127.0.0.1", _lmtp_port(box), timeout=REPLY_TIMEOUT * 2) as c:
        assert c.ehlo()[0] == 250
        assert c.mail("attacker@example.com")[0] == 250
        code, _ = c.rcpt(user.name)
        if code == 250:
            code, _ = c.data(message("written outside", "attacker content\r\n"))
    assert (snapshot(box.outside), target.stat().st_mtime_ns) == before, (
        f"delivery wrote into {target} through the symlinked {linked}/ (reply {code})"
    )
    assert 400 <= code < 600, f"delivery through a symlinked {linked}/ answered {code}"


def test_lmtp_does_not_append_to_a_symlinked_maildirsize(lmtp_box):
    box = lmtp_box
    user = box.add_user()
    quota = box.victim("quota", b"0S,0C\n0 0\n")
    os.symlink(quota, user.maildir / "maildirsize")
    box.start()
    before = file_state(quota)
    with smtplib.LMTP("127.0.0.1", _lmtp_port(box), timeout=REPLY_TIMEOUT * 2) as c:
        assert c.ehlo()[0] == 250
        assert c.mail("attacker@example.com")[0] == 250
        code, _ = c.rcpt(user.name)
        if code == 250:
            code, _ = c.data(message("quota"))
    assert file_state(quota) == before, f"delivery appended to {quota} through maildirsize (reply {code})"


def run_deliver(args: list[str], data: bytes, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastpop", "deliver", *args], input=data,
                          capture_output=True, timeout=timeout)


def _deliver_config(box: Box, server_lines: str) -> Path:
    cfg = box.base / "fastpop.toml"
    cfg.write_text(f'[server]\n{server_lines}\n[auth]\npasswd_file = "{box.srv.passwd}"\n'
                   f'[mail]\nlocation = "{box.srv.mail}/%u"\n')
    return cfg


@needs_root
@pytest.mark.parametrize("mode", ["dropped", "root"])
def test_deliver_cli_does_not_write_through_a_symlinked_new(mode):
    box = Box(mode)
    try:
        cfg = _deliver_config(box, 'user = "nobody"' if mode == "dropped" else "allow_mail_as_root = true")
        fine = box.add_user()
        user = box.add_user()
        target = box.victim_dir("dropbox")
        (user.maildir / "new").rmdir()
        os.symlink(target, user.maildir / "new")
        box.own(box.srv.mail)
        before = snapshot(box.outside), target.stat().st_mtime_ns
        r = run_deliver(["--config", str(cfg), "--user", user.name], message("attacker content"))
        assert (snapshot(box.outside), target.stat().st_mtime_ns) == before, (
            f"fastpop deliver wrote into {target} through the symlinked new/ (status {r.returncode}, {r.stderr!r})"
        )
        assert r.returncode != 0, "a delivery through a symlinked new/ reported success"
        ok = run_deliver(["--config", str(cfg), "--user", fine.name], message("fine"))
        assert ok.returncode == 0, ok.stderr  # the configuration itself is accepted
        assert len(list((fine.maildir / "new").iterdir())) == 1
    finally:
        box.close()


@needs_root
def test_deliver_cli_as_root_without_a_user_to_become_is_ex_config():
    box = Box("root")
    try:
        user = box.add_user()  # no uid in the passwd-file
        cfg = _deliver_config(box, "")
        r = run_deliver(["--config", str(cfg), "--user", user.name], message("as root?"))
        err = r.stderr.decode()
        assert r.returncode == 78, f"fastpop deliver as root with nobody to become: status {r.returncode} {err!r}"
        assert err.startswith("fastpop deliver: ") and err.count("\n") == 1, err
        assert list((user.maildir / "new").iterdir()) == []
        cfg = _deliver_config(box, "allow_mail_as_root = true")  # the explicit opt-out
        r = run_deliver(["--config", str(cfg), "--user", user.name], message("as root, allowed"))
        assert r.returncode == 0, r.stderr
        assert len(list((user.maildir / "new").iterdir())) == 1
    finally:
        box.close()


# -- 7. fastpop serve as root


def _serve(base: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """``fastpop serve`` with exactly these arguments (not ServerProcess's, which
    add --allow-mail-as-root when run as root): the process, still running if it
    started to listen, and its output so far."""
    (base / "passwd").touch()
    args = [sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--passwd-file",
            str(base / "passwd"), "--mail-location", f"{base}/mail/%u", "--workers", "1",
            "--shutdown-timeout", "2", *extra]
    out = base / "out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=base)
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        if "listening on" in out.read_text(errors="replace"):
            break
        time.sleep(0.02)
    return proc, out.read_text(errors="replace")


def _end(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@needs_root
def test_serve_as_root_without_user_refuses_to_start():
    base = Path(tempfile.mkdtemp(prefix="fastpop-hostile-"))
    try:
        base.chmod(0o755)
        proc, text = _serve(base, [])
        _end(proc)
        assert "listening on" not in text, "fastpop serve started as root without --user and served:\n" + text
        assert proc.returncode == 78, (proc.returncode, text)
        assert "refusing to serve mail as root" in text, text
        assert "[server] user" in text and "--allow-mail-as-root" in text, text
        assert "Traceback" not in text, text
        # the secure configuration starts
        (base / "mail").mkdir()
        nobody = _nobody()
        os.chown(base / "mail", nobody.pw_uid, nobody.pw_gid)
        proc, text = _serve(base, ["--user", "nobody"])
        running = proc.poll() is None
        assert _end(proc) == 0 and running and "listening on" in text, text
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_allow_mail_as_root_in_the_config_starts_with_a_warning():
    base = Path(tempfile.mkdtemp(prefix="fastpop-hostile-"))
    try:
        cfg = base / "fastpop.toml"
        cfg.write_text("[server]\nallow_mail_as_root = true\n")
        proc, text = _serve(base, ["--config", str(cfg)])
        running = proc.poll() is None
        assert _end(proc) == 0 and running and "listening on" in text, text
        assert re.search(r"WARNING.*root", text), text
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 8. a Maildir that belongs to someone else


@needs_root
@pytest.mark.parametrize("which", ["maildir", "cur"])
def test_maildir_owned_by_another_uid_is_refused(box, which):
    nobody = _nobody()
    if box.mode == "dropped":  # served as nobody; the Maildir is root's
        user = box.add_user()
    else:  # root serves this user as their uid (nobody's); the Maildir is root's
        user = box.add_user(stored=f"{{PLAIN}}secret:{nobody.pw_uid}:{nobody.pw_gid}")
    put_cur(user, "1700000000.M1P1.host:2,", message("root's"))
    box.own(box.srv.mail)
    foreign = user.maildir if which == "maildir" else user.maildir / "cur"
    for path in [foreign, *foreign.rglob("*")]:  # root's, but world-readable: the kernel alone would allow it
        os.chown(path, 0, 0)
        path.chmod(0o755 if path.is_dir() else 0o644)
    if box.mode == "root":
        for path in [user.maildir, *user.maildir.rglob("*")]:
            if path != foreign and foreign not in path.parents:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
    box.srv.start()
    offset = box.log_size()
    r, reply = login(box, user)
    r.close()
    assert reply.startswith(PERM), f"a Maildir owned by another uid answered {reply!r}"
    log = box.log_since(offset)
    assert re.search(r"(WARNING|ERROR).*" + re.escape(str(user.maildir)), log), log
