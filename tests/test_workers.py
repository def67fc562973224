"""`fastpop serve --workers N`: a supervisor and N processes sharing the listeners."""

from __future__ import annotations

import os
import poplib
import signal
import time

import pytest
from support.server import ServerProcess, message


def _worker_pid(pop) -> int:
    """The pid in the APOP timestamp <pid.counter.random@host> of the greeting
    (the servers here run with --apop for it: no timestamp without)."""
    return int(pop.getwelcome().split(b"<", 1)[1].split(b".", 1)[0])


@pytest.fixture
def workers(tmp_path):
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2", "--apop"])
    srv.start()
    yield srv
    if srv.proc is not None:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_connections_land_on_more_than_one_worker(workers):
    user = workers.add_user([message("hi")])
    pids = set()
    for _ in range(60):
        p = user.login()
        pids.add(_worker_pid(p))
        assert p.stat()[0] == 1
        p.quit()
        if len(pids) > 1:
            break
    assert len(pids) == 2
    assert workers.proc.pid not in pids  # the supervisor accepts nothing itself


def _refusing_workers(srv, user) -> set[int]:
    """Logins of ``user`` until two workers have refused one; every one must be refused."""
    refused_by = set()
    for _ in range(60):
        p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        refused_by.add(_worker_pid(p))
        p.user(user.name)
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(user.password)
        assert e.value.args[0].startswith(b"-ERR [LOGIN-DELAY]"), e.value.args[0]
        p.quit()
        if len(refused_by) > 1:
            break
    return refused_by


def test_login_delay_holds_across_workers(tmp_path):
    """A user's next login may reach the other worker: LOGIN-DELAY must hold there too,
    and after a SIGHUP."""
    srv = ServerProcess(tmp_path, "cython", extra_args=["--workers", "2", "--login-delay", "60", "--apop"])
    srv.start()
    try:
        user = srv.add_user([message("hi")])
        other = srv.add_user([message("hi")])
        p = user.login()
        first = _worker_pid(p)
        p.quit()
        refused_by = _refusing_workers(srv, user)
        assert len(refused_by) == 2 and first in refused_by  # both workers refused it
        other.login().quit()  # another user is not held back by it
        os.kill(srv.proc.pid, signal.SIGHUP)  # reloads the configuration in every worker
        deadline = time.monotonic() + 10
        while srv.log().count("SIGHUP: configuration, passwd-file") < 2:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        assert len(_refusing_workers(srv, user)) == 2
        assert "Traceback" not in srv.log()
    finally:
        assert srv.stop() == 0


def test_killed_worker_is_replaced_and_its_mailbox_lock_released(workers):
    user = workers.add_user([message("a"), message("b")])
    holder = user.login()
    victim = _worker_pid(holder)
    holder.dele(1)
    os.kill(victim, signal.SIGKILL)  # dies holding the mailbox lock and a pending DELE
    deadline = time.monotonic() + 20
    while f"(pid {victim}) killed by SIGKILL" not in workers.log():
        assert time.monotonic() < deadline, workers.log()
        time.sleep(0.05)
    p = user.login()  # the kernel released the dead worker's lock
    assert p.stat()[0] == 2  # and its DELE was never applied
    p.quit()
    # a replacement worker comes up and serves too
    deadline = time.monotonic() + 20
    while True:
        starts = [line for line in workers.log().splitlines() if "worker" in line and "started" in line]
        if len(starts) >= 3:
            break
        assert time.monotonic() < deadline, workers.log()
        time.sleep(0.05)
    pids = set()
    for _ in range(60):
        p = user.login()
        pids.add(_worker_pid(p))
        p.quit()
        if len(pids) > 1:
            break
    assert len(pids) == 2 and victim not in pids


def test_sigterm_stops_every_worker_without_applying_deletions(workers):
    user = workers.add_user([message("keep me")])
    p = user.login()
    p.dele(1)
    rc = workers.stop()
    assert rc == 0
    assert user.contents() == [message("keep me")]
    assert "all workers stopped" in workers.log()


def test_a_mailbox_held_in_one_worker_is_refused_by_the_other(workers):
    """Two sessions of one mailbox in different workers exclude each other
    through the sharded lock table (and a logout frees it for the other)."""
    from support.server import mailbox_held

    from fastpop.store import locking

    user = workers.add_user([message("a")])
    holder = user.login()
    first = _worker_pid(holder)
    assert mailbox_held(user.maildir)
    st = os.stat(user.maildir)
    offset = locking.slot(st.st_dev, st.st_ino)
    table = locking.LockTable()
    try:
        assert table._held_in(table._shard(locking.shard_of(offset)), offset)  # in its shard file
    finally:
        table.close()
    for _ in range(60):
        p = poplib.POP3("127.0.0.1", workers.port, timeout=10)
        if _worker_pid(p) != first:
            break
        p.quit()
    else:
        pytest.fail("no connection reached the other worker")
    p.user(user.name)
    with pytest.raises(poplib.error_proto) as e:
        p.pass_(user.password)
    assert e.value.args[0].startswith(b"-ERR [IN-USE]"), e.value.args[0]
    p.quit()
    holder.quit()
    p = user.login_when_free(timeout=10)
    assert p.stat()[0] == 1
    p.quit()
