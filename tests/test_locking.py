"""The mailbox lock: exclusive, descriptor-free, and taken over only from the dead."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastpop import locking
from fastpop.locking import LOCK_FILE, MailboxLock, MailboxLocked


@pytest.fixture
def maildir(tmp_path):
    path = tmp_path / "Maildir"
    path.mkdir()
    return path


def _write_lock(maildir, content: bytes, age: float = 0.0) -> None:
    path = maildir / LOCK_FILE
    path.write_bytes(content)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _owner(pid: int, start: str | None = None) -> bytes:
    start = start if start is not None else locking._start_time(pid)
    return f"{pid} {start} {locking._BOOT} {socket.gethostname()}\n".encode()


def test_second_lock_is_refused_and_release_frees(maildir):
    lock = MailboxLock(str(maildir))
    assert (maildir / LOCK_FILE).read_bytes() == _owner(os.getpid())
    with pytest.raises(MailboxLocked):
        MailboxLock(str(maildir))  # same process: still one session per mailbox
    lock.release()
    assert not (maildir / LOCK_FILE).exists()
    lock.release()  # twice is harmless
    MailboxLock(str(maildir)).release()


def test_holding_locks_uses_no_descriptors(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    locks = []
    for i in range(200):
        d = tmp_path / f"m{i}"
        d.mkdir()
        locks.append(MailboxLock(str(d)))
    assert len(os.listdir("/proc/self/fd")) == before
    for lock in locks:
        lock.release()
    assert not any((tmp_path / f"m{i}" / LOCK_FILE).exists() for i in range(200))


def test_missing_maildir_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        MailboxLock(str(tmp_path / "absent"))


@pytest.mark.parametrize(
    "content, age",
    [
        pytest.param(lambda: _owner(_dead_pid(), "1"), 0, id="dead-process"),
        pytest.param(lambda: _owner(os.getpid(), "12345"), 0, id="pid-reused-other-start-time"),
        pytest.param(lambda: f"{os.getpid()} 1 another-boot {socket.gethostname()}\n".encode(), 0, id="other-boot"),
        pytest.param(lambda: b"1 1 b otherhost\n", locking.DEFAULT_STALE_AFTER + 60, id="other-host-old"),
        pytest.param(lambda: b"", locking.EMPTY_GRACE + 5, id="empty-old"),
        pytest.param(lambda: b"garbage", locking.EMPTY_GRACE + 5, id="torn-old"),
    ],
)
def test_stale_locks_are_taken_over(maildir, content, age):
    _write_lock(maildir, content(), age)
    lock = MailboxLock(str(maildir))
    assert (maildir / LOCK_FILE).read_bytes() == _owner(os.getpid())
    lock.release()


@pytest.mark.parametrize(
    "content, age",
    [
        pytest.param(lambda: _owner(os.getppid()), 0, id="live-process"),
        pytest.param(lambda: b"1 1 b otherhost\n", 60, id="other-host-young"),
        pytest.param(lambda: b"", 1, id="being-written"),
    ],
)
def test_live_locks_are_respected(maildir, content, age):
    data = content()
    _write_lock(maildir, data, age)
    with pytest.raises(MailboxLocked):
        MailboxLock(str(maildir))
    assert (maildir / LOCK_FILE).read_bytes() == data


def test_zombie_owner_is_dead(maildir):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while locking._start_time(proc.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exits, but stays a zombie until we wait() for it
    assert os.path.exists(f"/proc/{proc.pid}")
    _write_lock(maildir, f"{proc.pid} 1 {locking._BOOT} {socket.gethostname()}\n".encode())
    try:
        MailboxLock(str(maildir)).release()
    finally:
        proc.wait()


def test_lock_held_by_another_process_then_killed(maildir):
    code = (
        "import sys, time; from fastpop.locking import MailboxLock; "
        f"MailboxLock({str(maildir)!r}); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxLocked):
            MailboxLock(str(maildir))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    MailboxLock(str(maildir)).release()  # the dead owner's lock is stale


def test_release_leaves_a_lock_that_was_taken_over(maildir):
    lock = MailboxLock(str(maildir))
    (maildir / LOCK_FILE).unlink()
    other = b"1 1 b otherhost\n"
    _write_lock(maildir, other)  # as if another host took it over
    lock.release()
    assert (maildir / LOCK_FILE).read_bytes() == other


def _contend(maildir: str, barrier, results) -> None:
    barrier.wait()
    try:
        MailboxLock(maildir)  # held until this process exits
        results.put("won")
    except MailboxLocked:
        results.put("lost")
    barrier.wait()  # every contender has tried before any winner exits


def test_only_one_of_many_contenders_takes_over_a_stale_lock(maildir):
    ctx = multiprocessing.get_context("fork")
    for _ in range(5):
        _write_lock(maildir, _owner(_dead_pid(), "1"))
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(maildir), barrier, results)) for _ in range(8)]
        for p in procs:
            p.start()
        outcomes = sorted(results.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(30)
        assert outcomes == ["lost"] * 7 + ["won"]
