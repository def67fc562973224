"""Password-guessing penalties are one table per server, not per worker:
a guesser gets no more attempts for landing on several workers
(fastpop.auth.penalty.SharedFailures)."""

from __future__ import annotations

import os
import poplib
import signal
import time

import pytest
from support.server import ServerProcess

from fastpop.auth.penalty import PenaltyBox, SharedFailures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _in_worker(row: int, action) -> None:
    """Run ``action`` in a forked process writing row ``row``; it must succeed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if action(row) is not False:
                code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_failures_in_one_worker_delay_logins_in_another():
    clock = Clock()
    shared = SharedFailures(2)
    box = PenaltyBox(clock=clock, shared=shared)  # forked below: both workers share the mapping
    shared.use_row(0)

    def guess(row: int) -> None:
        shared.use_row(row)
        for i in range(4):
            box.failed("192.0.2.1", "alice", f"guess {i}".encode())

    _in_worker(1, guess)
    assert box.delay("192.0.2.1", None) == 15  # worker 1's four failures, seen in worker 0
    assert box.delay("198.51.100.7", "alice") == 15  # per user too
    assert box.delay("198.51.100.7", "bob") == 0
    box.failed("192.0.2.1", None, b"guess 9")  # worker 0's own failure adds up
    assert box.failures("192.0.2.1") == pytest.approx(5.0)
    clock.now += 300  # one half-life: every row decays alike
    assert box.failures("192.0.2.1") == pytest.approx(2.5)

    # The same wrong credentials again do not raise the count (per worker).
    box.failed("192.0.2.1", None, b"guess 9")
    assert box.failures("192.0.2.1") == pytest.approx(2.5)

    # A success in worker 1 clears alice's count for every worker.
    def login(row: int) -> bool:
        shared.use_row(row)
        box.succeeded("192.0.2.1", "alice")
        return box.delay("203.0.113.1", "alice") == 0

    _in_worker(1, login)
    assert box.delay("203.0.113.1", "alice") == 0
    assert box.delay("192.0.2.1", None) > 0  # the address's count is kept


class _OneBucket(SharedFailures):
    BUCKETS = 1
    WAYS = 2


def test_full_bucket_drops_the_smallest_count_and_never_mixes_keys():
    clock = Clock()
    box = PenaltyBox(clock=clock, shared=_OneBucket(1))
    for i in range(5):
        box.failed("192.0.2.1", None, f"{i}".encode())  # a busy guesser
    box.failed("192.0.2.2", None)  # a one-off
    box.failed("192.0.2.3", None)  # a third key: the one-off's slot goes
    assert box.failures("192.0.2.1") == pytest.approx(5.0)
    assert box.failures("192.0.2.3") == pytest.approx(1.0)
    assert box.failures("192.0.2.2") == 0  # evicted: a miss, never someone else's count
    assert box.failures("192.0.2.4") == 0


def test_shared_table_memory_is_fixed():
    shared = SharedFailures(4)
    assert len(shared._map) == 4 * SharedFailures.BUCKETS * SharedFailures.WAYS * 4 * 8  # 1 MiB per worker
    box = PenaltyBox(clock=Clock(), shared=shared, max_entries=1000)
    for i in range(20_000):
        box.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"user{i}")
    assert len(box._ips) <= 1000 and len(box._users) <= 1000
    assert box.failures("10.0.78.31") == pytest.approx(1.0)  # the most recent are kept


# ----------------------------------------------------------------- a real server with two workers


def _worker_pid(pop: poplib.POP3) -> int:
    """The pid in the greeting's APOP timestamp (the server runs with --apop)."""
    return int(pop.getwelcome().split(b"<", 1)[1].split(b".", 1)[0])


def _connect_to(srv: ServerProcess, want) -> poplib.POP3:
    """A connection to a worker for which ``want(pid)`` holds."""
    for _ in range(200):
        pop = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        if want(_worker_pid(pop)):
            return pop
        pop.quit()
    raise AssertionError("no connection reached the wanted worker")


def _timed_login(pop: poplib.POP3, user) -> float:
    started = time.monotonic()
    pop.apop(user.name, user.password)  # APOP: plaintext logins need TLS off the trusted networks
    elapsed = time.monotonic() - started
    pop.quit()
    return elapsed


def test_guessing_on_one_worker_is_penalised_on_the_other(tmp_path):
    initial = 0.25
    srv = ServerProcess(tmp_path, "cython", extra_args=[
        "--workers", "2", "--apop", "--trusted-networks", "none",
        "--auth-penalty-initial", str(initial), "--auth-penalty-max", "5",
    ])
    srv.start()
    try:
        user = srv.add_user()
        first = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        guessed_on = _worker_pid(first)
        first.quit()
        for i in range(3):  # three wrong passwords, all on one worker
            pop = _connect_to(srv, lambda pid: pid == guessed_on)
            with pytest.raises(poplib.error_proto):
                pop.apop(user.name, f"wrong {i}")
            pop.close()
        # The right password on the other worker waits the penalty of three
        # failures (initial * 4) before it is checked.
        other = _connect_to(srv, lambda pid: pid != guessed_on)
        assert _timed_login(other, user) >= initial * 4 * 0.9
        # SIGHUP: the workers re-read the configuration and keep the counts
        # (the success above cleared the user's, not the address's).
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        other = _connect_to(srv, lambda pid: pid != guessed_on)
        assert _timed_login(other, user) >= initial * 4 * 0.9
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()
