"""`fastpop bench` opening many connections against a real fastpop: from
several source addresses, split over client processes within their
descriptor limit, and a clear message naming the limit when it cannot."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys

import pytest
from support.server import ServerProcess, message

BENCH = [sys.executable, "-m", "fastpop", "bench"]


@pytest.fixture
def srv(tmp_path):
    server = ServerProcess(tmp_path / "srv", "cython")
    server.start()
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log()


def _users(srv, tmp_path, n: int):
    users = [srv.add_user([message("m")]) for _ in range(n)]
    path = tmp_path / "users"
    path.write_text("".join(f"{u.name} {u.password}\n" for u in users))
    return path


def _limited(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_sessions_come_from_every_source_address(srv, tmp_path):
    users = _users(srv, tmp_path, 9)
    out = tmp_path / "r.json"
    run = subprocess.run([*BENCH, f"127.0.0.1:{srv.port}", "--users", str(users), "-s", "idle", "-c", "9",
                          "-p", "2", "-d", "0.5", "-w", "0", "-q", "--source", "127.0.0.2-127.0.0.4",
                          "--json", str(out)], capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["totals"]["opened"] == 9 and result["errors"]["total"] == 0
    seen = re.findall(r"session user=\S+ rip=(\S+)", srv.log())
    assert sorted(set(seen) - {"127.0.0.1"}) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"], seen
    assert seen.count("127.0.0.1") <= 1  # the probe login only


def test_connections_beyond_one_process_limit_are_split_over_more_processes(srv, tmp_path):
    """With 100 descriptors a client process holds at most 36 connections: 120
    idle sessions take 4 processes, all held, none failed."""
    users = _users(srv, tmp_path, 120)
    out = tmp_path / "r.json"
    run = subprocess.run([*BENCH, f"127.0.0.1:{srv.port}", "--users", str(users), "-s", "idle", "-c", "120",
                          "-p", "1", "-d", "0.5", "-w", "0", "-q", "--json", str(out)],
                         capture_output=True, text=True, timeout=120, preexec_fn=_limited(100, 100))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 client processes instead of 1" in run.stdout
    result = json.loads(out.read_text())
    assert result["load"]["procs"] == 4
    assert result["totals"]["opened"] == 120 and result["errors"]["total"] == 0


def test_a_descriptor_limit_too_low_to_split_is_named(tmp_path):
    run = subprocess.run([*BENCH, "-s", "idle", "-c", "5000", "-p", "1", "--mailboxes", "10"],
                         capture_output=True, text=True, timeout=60, preexec_fn=_limited(80, 80))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "RLIMIT_NOFILE" in run.stderr and "fs.nr_open" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_more_connections_than_ephemeral_ports_are_refused_up_front(tmp_path):
    from fastpop.bench.capacity import ephemeral_ports

    run = subprocess.run([*BENCH, "-s", "idle", "-c", str(ephemeral_ports() + 1), "--mailboxes", "10"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "ip_local_port_range" in run.stderr and "--source 127.0.0.2-127.0.0.9" in run.stderr, run.stderr
    assert "seeding" not in run.stdout  # refused before any work


def test_idle_sessions_whose_noop_is_in_flight_at_the_end_still_quit(tmp_path):
    """A session sending its NOOP when the hold ends used to be held again with no
    timer to wake it: the run never ended (57 of 30,000 sessions in a long run)."""
    out = tmp_path / "r.json"
    run = subprocess.run([*BENCH, "-s", "idle", "-c", "200", "--mailboxes", "200", "--messages", "1", "-p", "2",
                          "-d", "1", "-w", "0", "--idle-noop", "0.002", "-q", "--json", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["totals"]["opened"] == 200 and result["errors"]["total"] == 0
    assert result["latency_us"]["QUIT"]["count"] == 200  # every session ended with its QUIT
