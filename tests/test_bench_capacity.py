"""fastpop.bench.capacity: splitting connections over client processes and
naming the limit that stops a run (in-process)."""

from __future__ import annotations

import errno

import pytest

from fastpop.bench import capacity

pytestmark = pytest.mark.unit


def test_sources_are_ranges_and_lists():
    assert capacity.parse_sources("127.0.0.2-127.0.0.5") == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert capacity.parse_sources("127.0.0.9, 127.0.0.2-127.0.0.3") == ["127.0.0.9", "127.0.0.2", "127.0.0.3"]
    assert capacity.parse_sources("127.0.0.255-127.0.1.0") == ["127.0.0.255", "127.0.1.0"]
    assert capacity.parse_sources("::1") == ["::1"]
    for bad in ("127.0.0.5-127.0.0.2", "nonsense", "127.0.0.1-::1", "", "10.0.0.0-10.1.0.0"):
        with pytest.raises(capacity.CapacityError, match="--source"):
            capacity.parse_sources(bad)


def test_connections_are_split_so_each_process_stays_within_its_limit():
    assert capacity.procs_for(1000, 2, 20000) == 2  # fits: as asked
    assert capacity.procs_for(100_000, 2, 20000) == 6  # 19,936 each at most
    assert capacity.procs_for(120, 1, 100) == 4  # 36 each
    with pytest.raises(capacity.CapacityError, match=r"RLIMIT_NOFILE.*fs\.nr_open"):
        capacity.procs_for(100_000, 2, 256)  # 522 processes: the limit must be raised instead
    with pytest.raises(capacity.CapacityError, match="RLIMIT_NOFILE"):
        capacity.procs_for(10, 1, 32)


def test_more_connections_than_ephemeral_ports_name_the_range_and_the_way_out():
    ports = capacity.ephemeral_ports()
    with pytest.raises(capacity.CapacityError, match=r"ip_local_port_range.*--source 127\.0\.0\.2-127\.0\.0\.9"):
        capacity.check(ports + 1, [], spawned=False)
    capacity.check(ports + 1, ["127.0.0.2", "127.0.0.3"], spawned=False)  # two addresses: twice the ports
    with pytest.raises(capacity.CapacityError, match="ip_local_port_range"):
        capacity.check(2 * ports + 1, ["127.0.0.2", "127.0.0.3"], spawned=False)


def test_host_descriptor_limit_is_named():
    left = capacity.files_left()
    assert left is not None and left > 0
    addresses = [f"127.0.{i}.{j}" for i in range(4) for j in range(1, 255)]
    with pytest.raises(capacity.CapacityError, match="fs.file-max"):
        capacity.check(left + 1, addresses, spawned=False)


def test_connect_errors_are_explained():
    assert "ip_local_port_range" in capacity.explain(errno.EADDRNOTAVAIL)
    assert "RLIMIT_NOFILE" in capacity.explain(errno.EMFILE)
    assert "fs.file-max" in capacity.explain(errno.ENFILE)
    assert "somaxconn" in capacity.explain(errno.ECONNREFUSED)
    assert capacity.explain(errno.EPIPE) == ""


def test_a_spawned_server_too_small_for_the_connections_is_named():
    assert capacity.spawned_workers([]) == 1
    assert capacity.spawned_workers(["--workers", "4"]) == 4
    assert capacity.spawned_workers(["--log-level=debug", "--workers=6"]) == 6
    capacity.check_spawned(19_000, [], 20000)
    with pytest.raises(capacity.CapacityError, match="--server-arg=--workers=2"):
        capacity.check_spawned(30_000, [], 20000)
    capacity.check_spawned(30_000, ["--workers=2"], 20000)
