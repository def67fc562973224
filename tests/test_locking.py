"""The mailbox lock: exclusive, descriptor-free, and taken over only from the dead."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from fastpop.store import locking
from fastpop.store.locking import LOCK_FILE, LockTable, MailboxLock, MailboxLocked


@pytest.fixture
def maildir(tmp_path):
    path = tmp_path / "Maildir"
    path.mkdir()
    return path


def _write_lock(maildir, owner: str | bytes, age: float = 0.0) -> None:
    """A lock as another process would leave it: a symlink naming its owner
    (bytes: a plain file, as something else might leave)."""
    path = maildir / LOCK_FILE
    if os.path.lexists(path):
        path.unlink()
    if isinstance(owner, bytes):
        path.write_bytes(owner)
    else:
        os.symlink(owner, path)
    if age:
        t = time.time() - age
        os.utime(path, (t, t), follow_symlinks=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _owner(pid: int, start: str | None = None, boot: str | None = None, host: str | None = None) -> str:
    start = start if start is not None else locking._start_time(pid)
    return f"{pid}.{start}.{boot or locking._BOOT}@{host or locking._HOST}"


def test_second_lock_is_refused_and_release_frees(maildir):
    lock = MailboxLock(str(maildir))
    assert os.readlink(maildir / LOCK_FILE) == _owner(os.getpid())
    with pytest.raises(MailboxLocked):
        MailboxLock(str(maildir))  # same process: still one session per mailbox
    lock.release()
    assert not os.path.lexists(maildir / LOCK_FILE)
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
    assert not any(os.path.lexists(tmp_path / f"m{i}" / LOCK_FILE) for i in range(200))


def test_missing_maildir_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        MailboxLock(str(tmp_path / "absent"))


@pytest.mark.parametrize(
    "content, age",
    [
        pytest.param(lambda: _owner(_dead_pid(), "1"), 0, id="dead-process"),
        pytest.param(lambda: _owner(os.getpid(), "12345"), 0, id="pid-reused-other-start-time"),
        pytest.param(lambda: _owner(os.getpid(), boot="0therb00"), 0, id="other-boot"),
        pytest.param(lambda: _owner(1, "1", host="otherhost"), locking.DEFAULT_STALE_AFTER + 60, id="other-host-old"),
        pytest.param(lambda: b"", 0, id="plain-empty-file"),
        pytest.param(lambda: b"12 0 old-style lock file", 0, id="plain-file"),
        pytest.param(lambda: "nonsense", 0, id="nonsense-link"),
    ],
)
def test_stale_locks_are_taken_over(maildir, content, age):
    _write_lock(maildir, content(), age)
    lock = MailboxLock(str(maildir))
    assert os.readlink(maildir / LOCK_FILE) == _owner(os.getpid())
    lock.release()


@pytest.mark.parametrize(
    "content, age",
    [
        pytest.param(lambda: _owner(os.getppid()), 0, id="live-process"),
        pytest.param(lambda: _owner(1, "1", host="otherhost"), 60, id="other-host-young"),
    ],
)
def test_live_locks_are_respected(maildir, content, age):
    owner = content()
    _write_lock(maildir, owner, age)
    with pytest.raises(MailboxLocked):
        MailboxLock(str(maildir))
    assert os.readlink(maildir / LOCK_FILE) == owner


def test_owner_fits_in_an_inode():
    """ext4 keeps a symlink target under 60 bytes in the inode: no data block,
    so a login works on a full disk."""
    assert len(locking._short_host("mail-frontend-0042.pop.customers.example-hosting.com")) <= 24
    assert locking._short_host("a" * 40) != locking._short_host("a" * 39 + "b")
    worst = f"{2**22}.{10**11}.{locking._BOOT}@{'h' * 24}"
    assert len(worst) < 60


def test_zombie_owner_is_dead(maildir):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while locking._start_time(proc.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exits, but stays a zombie until we wait() for it
    assert os.path.exists(f"/proc/{proc.pid}")
    _write_lock(maildir, _owner(proc.pid, "1"))
    try:
        MailboxLock(str(maildir)).release()
    finally:
        proc.wait()


def test_lock_held_by_another_process_then_killed(maildir):
    code = (
        "import sys, time; from fastpop.store.locking import MailboxLock; "
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
    other = _owner(1, "1", host="otherhost")
    _write_lock(maildir, other)  # as if another host took it over
    lock.release()
    assert os.readlink(maildir / LOCK_FILE) == other


def _contend(take, barrier, results) -> None:
    barrier.wait()
    try:
        held = take()  # noqa: F841 (held until this process exits)
        results.put("won")
    except MailboxLocked:
        results.put("lost")
    barrier.wait()  # every contender has tried before any winner exits


def _race(take) -> list[str]:
    """Eight forked processes call ``take`` at once; their sorted outcomes."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(take, barrier, results)) for _ in range(8)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(30)
    return outcomes


def test_only_one_of_many_contenders_takes_over_a_stale_lock(maildir):
    for _ in range(5):
        _write_lock(maildir, _owner(_dead_pid(), "1"))
        assert _race(lambda: MailboxLock(str(maildir))) == ["lost"] * 7 + ["won"]


# --------------------------------------------------------------------------- the lock table (the default)


@pytest.fixture
def table(tmp_path):
    t = LockTable(str(tmp_path / "run" / "mailbox.locks"))
    yield t
    t.close()


def test_table_second_lock_is_refused_and_release_frees(table, maildir):
    lock = table.acquire(str(maildir))
    with pytest.raises(MailboxLocked):
        table.acquire(str(maildir))  # same process: still one session per mailbox
    assert table.holder(str(maildir))
    lock.release()
    assert not table.holder(str(maildir))
    lock.release()  # twice is harmless
    table.acquire(str(maildir)).release()
    assert os.listdir(maildir) == []  # nothing written into the Maildir


def test_table_holds_many_locks_in_one_descriptor(table, tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    locks = []
    for i in range(200):
        d = tmp_path / f"m{i}"
        d.mkdir()
        locks.append(table.acquire(str(d)))
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(table.holder(str(tmp_path / f"m{i}")) for i in range(200))
    for lock in locks:
        lock.release()
    assert not any(table.holder(str(tmp_path / f"m{i}")) for i in range(200))


def test_table_missing_maildir_raises_file_not_found(table, tmp_path):
    with pytest.raises(FileNotFoundError):
        table.acquire(str(tmp_path / "absent"))


def _hold_in_child(table_path: str, maildir: str) -> subprocess.Popen:
    code = (
        "import time; from fastpop.store.locking import LockTable; "
        f"LockTable({table_path!r}).acquire({maildir!r}); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"locked\n"
    return proc


def test_table_lock_of_another_process_is_refused_until_it_dies(table, maildir):
    proc = _hold_in_child(table.path, str(maildir))
    try:
        assert table.holder(str(maildir))
        with pytest.raises(MailboxLocked):
            table.acquire(str(maildir))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    table.acquire(str(maildir)).release()  # the kernel dropped the dead process's lock


def _locked_in(path, offset: int) -> bool:
    """Whether some process holds byte ``offset`` of the file at ``path`` (asked
    through a descriptor of our own, as another process would)."""
    import fcntl
    import struct

    flock = struct.Struct("hhqqi4x")
    fd = os.open(path, os.O_RDWR)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, flock.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    finally:
        os.close(fd)
    return flock.unpack(got)[0] != fcntl.F_UNLCK


def _offset(maildir) -> int:
    st = os.stat(maildir)
    return locking.slot(st.st_dev, st.st_ino)


def test_table_locks_live_in_shard_files_not_one_file(table, maildir):
    """The kernel walks a file's whole lock list on every lock and unlock; the
    locks are spread over 256 files, so no list holds every session's lock."""
    lock = table.acquire(str(maildir))
    offset = _offset(maildir)
    shard = os.path.join(table.path + ".shards", f"{locking.shard_of(offset):02x}")
    assert _locked_in(shard, offset)
    assert not _locked_in(table.path, offset)  # the old single file is only asked
    lock.release()
    assert not _locked_in(shard, offset)
    assert sorted(os.listdir(table.path + ".shards")) == [f"{i:02x}" for i in range(256)]


def _two_in_one_shard(tmp_path) -> tuple[str, str]:
    """Two Maildirs whose locks fall in the same shard file (by pigeonhole,
    within 257 directories)."""
    seen: dict[int, str] = {}
    for i in range(257):
        d = tmp_path / f"pair{i}"
        d.mkdir()
        shard = locking.shard_of(_offset(d))
        if shard in seen:
            return seen[shard], str(d)
        seen[shard] = str(d)
    raise AssertionError("unreachable: 257 directories in 256 shards")


def test_mailboxes_sharing_a_shard_do_not_block_each_other(table, tmp_path):
    first, second = _two_in_one_shard(tmp_path)
    proc = _hold_in_child(table.path, first)  # another process, as another worker
    try:
        with pytest.raises(MailboxLocked):
            table.acquire(first)
        lock = table.acquire(second)  # the same file, another byte: free
        assert table.holder(second) and table.holder(first)
        lock.release()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    table.acquire(first).release()


def _hold_many_in_child(table_path: str, maildirs: list[str]) -> subprocess.Popen:
    code = (
        "import sys, time; from fastpop.store.locking import LockTable; t = LockTable(sys.argv[1]); "
        "[t.acquire(d) for d in sys.argv[2:]]; print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, table_path, *maildirs], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"locked\n"
    return proc


def test_sigkilled_process_releases_its_locks_in_every_shard(table, tmp_path):
    maildirs = []
    for i in range(600):  # over most of the 256 shards
        (tmp_path / f"k{i}").mkdir()
        maildirs.append(str(tmp_path / f"k{i}"))
    assert len({locking.shard_of(_offset(d)) for d in maildirs}) > 200
    proc = _hold_many_in_child(table.path, maildirs)
    assert all(table.holder(d) for d in maildirs)
    for d in maildirs[:50]:
        with pytest.raises(MailboxLocked):
            table.acquire(d)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    locks = [table.acquire(d) for d in maildirs]  # the kernel dropped all of the dead process's locks
    for lock in locks:
        lock.release()


def test_a_mailbox_an_older_fastpop_holds_in_the_single_file_is_refused(table, maildir):
    """During an upgrade an older fastpop of the host may still hold sessions in
    the single-file table: its locks are seen, and refuse the mailbox."""
    code = (
        "import fcntl, os, struct, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, int(sys.argv[2]), 1, 0))\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    old = subprocess.Popen([sys.executable, "-c", code, table.path, str(_offset(maildir))], stdout=subprocess.PIPE)
    try:
        assert old.stdout.readline() == b"locked\n"
        assert table.holder(str(maildir))
        with pytest.raises(MailboxLocked):
            table.acquire(str(maildir))
        shard = os.path.join(table.path + ".shards", f"{locking.shard_of(_offset(maildir)):02x}")
        assert not _locked_in(shard, _offset(maildir))  # the refused attempt left nothing behind
    finally:
        old.send_signal(signal.SIGKILL)
        old.wait()
    table.acquire(str(maildir)).release()


def test_a_frugal_process_and_an_up_front_one_exclude_each_other(table, tmp_path):
    """A process under a small limit (shards opened as needed) and one with every
    shard open meet in the same files."""
    held, other = tmp_path / "held", tmp_path / "other"
    held.mkdir()
    other.mkdir()
    lock = table.acquire(str(held))
    code = (
        "import resource, sys, time\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "from fastpop.store.locking import LockTable, MailboxLocked\n"
        "t = LockTable(sys.argv[1])\n"
        "try:\n    t.acquire(sys.argv[2]); print('won', flush=True)\n"
        "except MailboxLocked:\n    print('lost', flush=True)\n"
        "t.acquire(sys.argv[3]); print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, table.path, str(held), str(other)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"lost\n"
        assert proc.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxLocked):
            table.acquire(str(other))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lock.release()
    table.acquire(str(other)).release()


def test_under_a_small_descriptor_limit_shards_open_as_needed(tmp_path, maildir):
    """A server under a tiny descriptor limit (24 in tests/test_limits.py) cannot
    keep 256 shard files open: it keeps one open only while it holds a lock there,
    and opens the old single file only to ask it."""
    code = (
        "import os, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "from fastpop.store.locking import LockTable\n"
        "before = len(os.listdir('/proc/self/fd'))\n"
        "t = LockTable(sys.argv[1]); lock = t.acquire(sys.argv[2])\n"
        "print(len(os.listdir('/proc/self/fd')) - before, t.holder(sys.argv[2]))\n"
        "lock.release(); print(len(os.listdir('/proc/self/fd')) - before, t.holder(sys.argv[2]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / "mailbox.locks"), str(maildir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True", "0", "False"]  # one shard while it holds a lock there


def test_connections_per_worker_leaves_room_for_the_shards():
    from fastpop.limits import connections_per_worker

    assert connections_per_worker(20000) == 20000 - 400 - 257
    assert connections_per_worker(128) == 32  # shards opened as needed: one per session at most
    assert connections_per_worker(24) == 16


def test_table_reopens_after_fork(table, maildir):
    """A forked child must not share its parent's open file description (its
    locks would not conflict with the parent's): acquire reopens the table."""
    lock = table.acquire(str(maildir))
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_contend_table, args=(table, str(maildir), results))
    child.start()
    assert results.get(timeout=30) == "lost"
    child.join(30)
    lock.release()
    assert not table.holder(str(maildir))  # the child's exit did not take the parent's lock


def _contend_table(table, maildir: str, results) -> None:
    try:
        table.acquire(maildir)
        results.put("won")
    except MailboxLocked:
        results.put("lost")


def test_only_one_of_many_processes_gets_a_table_lock(table, maildir):
    for _ in range(5):  # each contender opens the table itself, as a server process does
        assert _race(lambda: LockTable(table.path).acquire(str(maildir))) == ["lost"] * 7 + ["won"]


def test_slot_is_stable_and_spread():
    # the offset must be the same in every process and Python version on the host
    # (an old server draining beside an upgraded one): no hash(), no randomness,
    # and this pinned value catches a change of the mix
    assert locking.slot(2049, 131074) == 4295330327536734694
    code = "from fastpop.store.locking import slot; print(slot(2049, 131074))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert int(out) == 4295330327536734694
    slots = {locking.slot(dev, ino) for dev in (2049, 2050, 64769) for ino in range(1, 20001)}
    assert len(slots) == 60000  # no collisions among neighbours
    assert all(0 <= s < 1 << 62 for s in slots)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user owns")
def test_table_owned_by_someone_else_is_refused(tmp_path):
    path = tmp_path / "mailbox.locks"
    path.touch()
    os.chown(path, 65534, 65534)
    with pytest.raises(PermissionError, match="owned by uid"):
        LockTable(str(path))


def test_table_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").touch()
    os.symlink(tmp_path / "elsewhere", tmp_path / "mailbox.locks")
    with pytest.raises(OSError):
        LockTable(str(tmp_path / "mailbox.locks"))


def test_unknown_lock_method_is_refused():
    with pytest.raises(ValueError, match="table' or 'symlink"):
        locking.mailbox_locks("flock")
    assert isinstance(locking.mailbox_locks("symlink"), locking.SymlinkLocks)


def test_a_lock_table_in_a_directory_others_may_write_is_refused(tmp_path):
    """Whoever may write the table's directory may swap the table for another file, and
    then two processes hold one mailbox (a /tmp/fastpop-UID made first by another user)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="nobody else may write"):
        LockTable(str(shared / "mailbox.locks"))
    assert not (shared / "mailbox.locks").exists()
    shared.chmod(0o700)
    LockTable(str(shared / "mailbox.locks")).close()
