"""Crash safety: the server, a worker, ``fastpop deliver`` and the LMTP
listener killed with SIGKILL at fault points (``fastpop.faults``,
``FASTPOP_FAULT=point:n``) during UPDATE deletions, deliveries and index
writes; then, after a restart, every message not deleted by a completed QUIT
is there, byte for byte, exactly once, the index is valid and the mailbox
lock is free at once.  docs/reliability.md explains what this shows.

Every test checks that its process died by SIGKILL *at its point* (the
line fastpop.faults writes before dying), so a point that is renamed or
moved out of the path cannot let a test pass silently.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.server import AS_ROOT, ServerProcess, message

from fastpop.store import index as mindex

FAULT = "FASTPOP_FAULT"


# -- harness


def start(srv: ServerProcess, fault: str | None = None) -> None:
    """Start ``srv`` with FASTPOP_FAULT set to ``fault`` (or unset) for that process only."""
    saved = os.environ.pop(FAULT, None)
    if fault:
        os.environ[FAULT] = fault
    try:
        srv.start()
    finally:
        os.environ.pop(FAULT, None)
        if saved is not None:
            os.environ[FAULT] = saved


def marker(point: str) -> str:
    return f"fastpop: fault point {point} reached, killing pid"


def reap_killed(srv: ServerProcess, point: str) -> None:
    """The server must have died by SIGKILL at ``point``."""
    assert srv.proc is not None
    try:
        rc = srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        srv.kill()
        pytest.fail(f"fault point {point} was never reached; server still running\n{srv.log()}")
    srv.log_file.close()
    srv.proc = None
    assert rc == -signal.SIGKILL, f"server exit {rc}, expected SIGKILL at {point}\n{srv.log()}"
    assert marker(point) in srv.log(), srv.log()


def wait_for_log(srv: ServerProcess, ready, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not ready(srv.log()):
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.02)


def stop_clean(srv: ServerProcess) -> None:
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "cython")
    yield s
    if s.proc is not None:
        s.stop()
    assert "Traceback" not in s.log(), s.log()


def sized(tag: str, size: int | None = None) -> bytes:
    """message(), cut back to whole lines: stored as RETR sends it (final CRLF)."""
    data = message(tag, f"Body of {tag}.\r\n", size=size)
    return data[: data.rfind(b"\r\n") + 2]


def originals(n: int, tag: str) -> list[bytes]:
    """Distinct messages of several sizes (one above sending.SMALL_MESSAGE, so
    RETR takes the sendfile path)."""
    sizes = [None, 3000, None, 200_000, None, 40_000]
    return [sized(f"{tag} {i}", sizes[i % len(sizes)]) for i in range(n)]


def fetch(p: poplib.POP3) -> dict[str, bytes]:
    """{UIDL: exact message} of every message in the session."""
    out: dict[str, bytes] = {}
    for line in p.uidl()[1]:
        num, uid = line.decode().split()
        _, lines, _ = p.retr(int(num))
        data = b"\r\n".join(lines) + b"\r\n" if lines else b""
        assert uid not in out, f"UIDL {uid} listed twice"
        out[uid] = data
    return out


def on_disk(maildir: Path) -> dict[str, bytes]:
    """{unique name: bytes} of cur/ and new/; a name twice would be a duplicate."""
    out: dict[str, bytes] = {}
    for sub in ("cur", "new"):
        for f in (maildir / sub).iterdir():
            base = f.name.split(":", 1)[0].split(",", 1)[0]
            assert base not in out, f"{base} is in the Maildir twice"
            out[base] = f.read_bytes()
    return out


def assert_index_matches(maildir: Path) -> None:
    """The index on disk is valid and describes exactly cur/."""
    mindex._forget(str(maildir))
    index = mindex.load(str(maildir))
    assert index is not None, "no valid index after the session"
    names = sorted(e.name for e in index.entries())
    assert names == sorted(f.name for f in (maildir / "cur").iterdir())
    assert not list(maildir.glob(mindex.INDEX_FILE + ".tmp.*")), "an index temporary was left behind"


def login_at_once(user) -> poplib.POP3:
    """A login that must succeed on the first try: no lock may be left held."""
    p = user.login()
    return p


# -- UPDATE: the server killed while QUIT deletes


# (fault, how many of the marked messages were unlinked when it fired)
UPDATE_FAULTS = [
    ("update.before_unlink:1", 0),
    ("update.after_unlink:1", 1),
    ("update.before_unlink:3", 2),
    ("update.after_unlink:3", 3),
    ("update.after_unlink:4", 4),
    ("update.before_reply:1", 4),
]


@pytest.mark.parametrize("fault, unlinked", UPDATE_FAULTS, ids=[f[0] for f in UPDATE_FAULTS])
def test_killed_during_update(srv, fault, unlinked):
    point = fault.split(":")[0]
    mails = originals(7, "update")
    user = srv.add_user(mails)
    start(srv, fault)
    p = user.login()
    before = fetch(p)
    uids = list(before)
    assert sorted(before.values()) == sorted(mails)
    marked = [2, 3, 5, 7]  # message numbers
    for n in marked:
        p.dele(n)
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        p.quit()  # poplib raises unless the reply is +OK: the server died first
    p.close()
    reap_killed(srv, point)

    # deletions happen in message order: the first `unlinked` marked ones are gone
    gone = {uids[n - 1] for n in marked[:unlinked]}
    expected = {u: d for u, d in before.items() if u not in gone}
    assert on_disk(user.maildir) == expected
    assert list((user.maildir / "tmp").iterdir()) == []

    start(srv)
    p = login_at_once(user)
    assert fetch(p) == expected  # same UIDLs, same bytes, nothing twice
    # the client resumes: what it had marked and is still there goes now
    numbers = {uid: int(num) for num, uid in (line.decode().split() for line in p.uidl()[1])}
    for n in marked:
        if uids[n - 1] in numbers:
            p.dele(numbers[uids[n - 1]])
    assert p.quit().startswith(b"+OK")
    kept = {uids[n - 1] for n in range(1, 8) if n not in marked}
    p = login_at_once(user)
    assert set(fetch(p)) == kept
    p.quit()
    assert_index_matches(user.maildir)
    stop_clean(srv)


def test_worker_killed_during_update(tmp_path):
    """--workers 2: the worker holding the session dies mid-UPDATE; the
    supervisor replaces it and the mailbox is free at once, on either worker."""
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2", "--apop"])  # (the pid: APOP timestamp)
    mails = originals(5, "worker")
    user = srv.add_user(mails)
    start(srv, "update.after_unlink:2")
    try:
        p = user.login()
        pid = int(p.getwelcome().split(b"<", 1)[1].split(b".", 1)[0])
        before = fetch(p)
        uids = list(before)
        for n in (1, 2, 4):
            p.dele(n)
        with pytest.raises((poplib.error_proto, EOFError, OSError)):
            p.quit()
        p.close()
        wait_for_log(srv, lambda log: f"(pid {pid}) killed by SIGKILL" in log)
        assert marker("update.after_unlink") in srv.log()
        expected = {u: d for u, d in before.items() if u not in (uids[0], uids[1])}
        assert on_disk(user.maildir) == expected
        for _ in range(4):  # whichever worker answers, the lock is free
            p = login_at_once(user)
            assert fetch(p) == expected
            p.quit()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_killed_after_the_ok_was_sent_keeps_the_deletions(srv):
    """update.before_reply fires after cur/ was fsync'ed: the deletions are
    final even though the client saw no +OK; the restart shows them done."""
    mails = originals(3, "final")
    user = srv.add_user(mails)
    start(srv, "update.before_reply:1")
    p = user.login()
    before = fetch(p)
    p.dele(1)
    p.dele(3)
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        p.quit()
    p.close()
    reap_killed(srv, "update.before_reply")
    start(srv)
    p = login_at_once(user)
    assert list(fetch(p).values()) == [before[list(before)[1]]]
    p.quit()
    stop_clean(srv)


# -- delivery: fastpop deliver killed


def run_deliver(srv: ServerProcess, user: str, data: bytes, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT}
    if fault:
        env[FAULT] = fault
    return subprocess.run(
        [sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, "--passwd-file", str(srv.passwd),
         "--mail-location", f"{srv.mail}/%u", "--user", user],
        input=data, capture_output=True, timeout=30, env=env,
    )


@pytest.fixture(scope="module")
def mailserver(tmp_path_factory):
    """A server without faults, to read back what the killed deliveries left."""
    s = ServerProcess(tmp_path_factory.mktemp("deliver-crash"), "cython")
    s.start()
    yield s
    stop_clean(s)


# (point, the message is visible afterwards)
DELIVER_FAULTS = [
    ("deliver.after_create", False),
    ("deliver.before_rename", False),
    ("deliver.after_rename", True),
    ("deliver.after_fsync", True),
]


@pytest.mark.parametrize("point, visible", DELIVER_FAULTS, ids=[f[0] for f in DELIVER_FAULTS])
def test_deliver_killed(mailserver, point, visible):
    user = mailserver.add_user()
    first, second = sized("first"), sized("second", 150_000)
    assert run_deliver(mailserver, user.name, first).returncode == 0
    r = run_deliver(mailserver, user.name, second, fault=f"{point}:1")
    assert r.returncode == -signal.SIGKILL, r  # the MTA sees no success and retries
    assert marker(point) in r.stderr.decode()
    tmp = list((user.maildir / "tmp").iterdir())
    new = sorted(f.read_bytes() for f in (user.maildir / "new").iterdir())
    if visible:
        assert new == sorted([first, second]) and tmp == []  # whole, once
    else:
        assert new == [first]  # nothing half-written is visible ...
        assert len(tmp) == 1  # ... only a tmp/ file, which POP3 ignores
    p = login_at_once(user)
    got = sorted(fetch(p).values())
    p.quit()
    assert got == (sorted([first, second]) if visible else [first])
    if not visible:
        # the MTA's retry stores it exactly once
        assert run_deliver(mailserver, user.name, second).returncode == 0
        p = login_at_once(user)
        assert sorted(fetch(p).values()) == sorted([first, second])
        p.quit()
        # the dead delivery's tmp/ file goes once it is 36 hours old
        old = time.time() - 37 * 3600
        os.utime(tmp[0], (old, old))
        user.deliver(message("third"))  # a change, so the next login syncs
        p = login_at_once(user)
        assert len(fetch(p)) == 3
        p.quit()
        assert list((user.maildir / "tmp").iterdir()) == []
        assert f"removed leftover {tmp[0]}" in mailserver.log()
    assert_index_matches(user.maildir)


@pytest.mark.parametrize("fault",
                         ["deliver.before_rename:1:EIO", "deliver.after_rename:1:EIO", "deliver.after_create:1:ENOSPC"])
def test_deliver_write_or_fsync_fails(mailserver, fault):
    """An I/O error before the message is durable: exit 75, nothing left anywhere
    (an fsync of new/ that fails takes the renamed file back)."""
    user = mailserver.add_user()
    r = run_deliver(mailserver, user.name, message("x"), fault=fault)
    assert r.returncode == 75, r
    assert f"fault point {fault.split(':')[0]} reached, raising" in r.stderr.decode()
    assert list((user.maildir / "new").iterdir()) == []
    assert list((user.maildir / "tmp").iterdir()) == []


# -- delivery: the LMTP listener killed


def start_lmtp(srv: ServerProcess, fault: str | None = None) -> int:
    start(srv, fault)
    m = re.search(r"LMTP listening on 127\.0\.0\.1:(\d+)", srv.log()[srv._log_offset :])
    assert m, srv.log()
    return int(m.group(1))


@pytest.mark.parametrize("point, visible", DELIVER_FAULTS[1:], ids=[f[0] for f in DELIVER_FAULTS[1:]])
def test_lmtp_killed(tmp_path, point, visible):
    srv = ServerProcess(tmp_path, "cython", extra_args=["--lmtp-listen", "127.0.0.1:0"])
    try:
        user = srv.add_user()
        mails = [sized("lmtp one"), sized("lmtp two", 100_000), sized("lmtp three")]
        port = start_lmtp(srv, f"{point}:2")
        with smtplib.LMTP("127.0.0.1", port, timeout=30) as c:
            assert c.sendmail("a@example.com", [user.name], mails[0]) == {}
            with pytest.raises(smtplib.SMTPException):  # no 250 for the second: the sender retries
                c.sendmail("a@example.com", [user.name], mails[1])
        reap_killed(srv, point)
        port = start_lmtp(srv)
        p = login_at_once(user)
        got = sorted(fetch(p).values())
        p.quit()
        assert got == sorted(mails[:2] if visible else mails[:1])
        with smtplib.LMTP("127.0.0.1", port, timeout=30) as c:  # the listener is back
            assert c.sendmail("a@example.com", [user.name], mails[2]) == {}
        p = login_at_once(user)
        assert len(fetch(p)) == (3 if visible else 2)
        p.quit()
        assert_index_matches(user.maildir)
        stop_clean(srv)
    finally:
        if srv.proc is not None:
            srv.kill()


# -- the index (and the new/ -> cur/ moves) at login


INDEX_FAULTS = ["sync.after_move:2", "index.before_rename:2", "index.after_rename:2"]


@pytest.mark.parametrize("fault", INDEX_FAULTS)
def test_killed_during_index_write(srv, fault):
    """The first login writes the index (a first arrival at the index points);
    the second, after new mail, dies moving it or writing the new index."""
    point = fault.split(":")[0]
    mails = originals(4, "index")
    user = srv.add_user(mails[:1] if point == "sync.after_move" else mails[:2])
    start(srv, fault)
    p = user.login()
    assert len(fetch(p)) == len(user.contents())
    p.quit()
    for data in mails[len(user.contents()):]:
        user.deliver(data)
    p = srv.connect()
    p.user(user.name)
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        p.pass_(user.password)  # the server dies opening the mailbox
    p.close()
    reap_killed(srv, point)
    assert sorted(on_disk(user.maildir).values()) == sorted(mails)
    start(srv)
    p = login_at_once(user)
    assert sorted(fetch(p).values()) == sorted(mails)
    stat = p.stat()
    p.quit()
    assert stat == (4, sum(len(m) for m in mails))
    assert_index_matches(user.maildir)
    stop_clean(srv)


def test_bad_fault_spec_is_refused():
    """A misspelt point is an error, never a fault that silently does not fire."""
    env = dict(os.environ, **{FAULT: "update.after_unlnk:1"})
    r = subprocess.run([sys.executable, "-c", "import fastpop.faults"], env=env, capture_output=True)
    assert r.returncode != 0 and b"unknown fault point 'update.after_unlnk'" in r.stderr


def test_lmtp_worker_killed_during_delivery(tmp_path):
    """--workers 2: worker 0 (the LMTP listener's) dies mid-delivery; the
    supervisor restarts it, the stale Unix socket is replaced, and LMTP and
    POP3 go on with the message there once."""
    sock = tmp_path / "lmtp.sock"
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2", "--lmtp-listen", f"unix:{sock}"])
    user = srv.add_user()
    mails = [sized("w one"), sized("w two", 100_000), sized("w three")]
    start(srv, "deliver.after_rename:2")
    try:
        wait_for_log(srv, lambda log: "LMTP listening on" in log)  # worker 1 may have come up first
        with smtplib.LMTP(str(sock), timeout=30) as c:
            assert c.sendmail("a@example.com", [user.name], mails[0]) == {}
            with pytest.raises(smtplib.SMTPException):
                c.sendmail("a@example.com", [user.name], mails[1])
        wait_for_log(srv, lambda log: log.count("LMTP listening on") == 2)  # the replacement worker 0
        assert re.search(r"worker 0 \(pid \d+\) killed by SIGKILL", srv.log()), srv.log()
        assert marker("deliver.after_rename") in srv.log()
        with smtplib.LMTP(str(sock), timeout=30) as c:
            assert c.sendmail("a@example.com", [user.name], mails[2]) == {}
        p = login_at_once(user)
        assert sorted(fetch(p).values()) == sorted(mails)
        p.quit()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()
    assert not sock.exists()


# -- the mailbox lock


@pytest.mark.parametrize("kind", ["table", "symlink"])
def test_killed_right_after_taking_the_lock(srv, kind):
    """Killed right after taking the lock, the next login gets the mailbox at
    once. The table's OFD lock dies with its process; fastpop.lock is one
    symlink(2) naming its owner, so it names the dead server and is taken
    over (there is no moment at which a lock names nobody)."""
    from fastpop.store.locking import LOCK_FILE, LockTable

    srv.extra_args += ["--mail-lock", kind]
    mails = originals(2, "lock")
    user = srv.add_user(mails)
    start(srv, "lock.after_create:1")
    p = srv.connect()
    p.user(user.name)
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        p.pass_(user.password)
    p.close()
    dead = srv.proc.pid
    reap_killed(srv, "lock.after_create")
    link = user.maildir / LOCK_FILE
    if kind == "table":
        probe = LockTable()  # the server's table: the default path of this uid
        try:
            assert not probe.holder(str(user.maildir))
        finally:
            probe.close()
        assert not os.path.lexists(link)
    else:
        assert os.readlink(link).startswith(f"{dead}.")  # names the dead server
    start(srv)
    p = login_at_once(user)
    assert sorted(fetch(p).values()) == sorted(mails)
    p.quit()
    assert not os.path.lexists(link)
    stop_clean(srv)
