"""Started as root with --user, the server binds first and then runs as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest
from support.server import ServerProcess, mailbox_held, message

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


@pytest.fixture
def world_reachable_dir():
    # pytest's tmp_path sits below a 0700 root directory that "nobody" cannot enter
    path = Path(tempfile.mkdtemp(prefix="fastpop-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("lock", ["table", "symlink"])
def test_drops_to_user_after_binding(world_reachable_dir, lock):
    nobody = pwd.getpwnam("nobody")
    root = world_reachable_dir
    srv = ServerProcess(root, "cython", extra_args=["--user", "nobody", "--mail-lock", lock])
    user = srv.add_user([message("hi")])
    for path in [srv.mail, *srv.mail.rglob("*"), srv.passwd]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    srv.start()
    try:
        assert set(_uids(srv.proc.pid)) == {nobody.pw_uid}
        p = user.login()
        assert p.stat()[0] == 1
        if lock == "table":  # opened as root before the drop, held by the dropped process
            assert mailbox_held(user.maildir)
            p.quit()
            assert not mailbox_held(user.maildir)
        else:
            link = user.maildir / "fastpop.lock"
            assert link.lstat().st_uid == nobody.pw_uid  # created by the dropped user
            p.quit()
            assert not os.path.lexists(link)  # removed at logout
    finally:
        assert srv.stop() == 0


def test_unknown_user_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    (tmp_path / "passwd").touch()
    r = subprocess.run(
        [sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--passwd-file",
         str(tmp_path / "passwd"), "--user", "no-such-user-fastpop"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert "no such system user" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_listener_accepts_before_privileges_are_dropped(tmp_path):
    """Ports are bound as root, but a listener only starts listening (and so a
    client is only ever served) after setuid: a connection that arrived while
    LMTP or metrics were still starting was served as root, and a login then
    created that user's Maildir owned by root."""
    import re
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "passwd").touch()
    trace = tmp_path / "trace"
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=listen,setuid", "-o", str(trace),
         sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--lmtp-listen", "127.0.0.1:0",
         "--passwd-file", str(tmp_path / "passwd"), "--mail-location", str(tmp_path / "%u"),
         "--user", "nobody", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"listening on .*pid (\d+)\)", err := proc.stderr.readline())):
            assert err and time.monotonic() < deadline, "fastpop did not start"
        os.kill(int(m.group(1)), signal.SIGTERM)  # strace ends with it
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    calls = [m.group(1) for line in trace.read_text().splitlines() if (m := re.search(r"\b(listen|setuid)\(", line))]
    assert calls.count("listen") == 2, calls  # POP3 and LMTP
    assert "setuid" in calls and calls.index("setuid") < calls.index("listen"), calls
