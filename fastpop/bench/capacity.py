"""How many connections ``fastpop bench`` can open, and the limits in the way.

A client process holds one descriptor per connection, so the connections are
split over enough processes that each stays within its descriptor limit
(RLIMIT_NOFILE, raised to the hard limit first).  A source address reaches one
server address and port from at most the ports of
``net.ipv4.ip_local_port_range``, so ``--source 127.0.0.2-127.0.0.9`` spreads
the connections over several loopback addresses (each connection binds its
source with IP_BIND_ADDRESS_NO_PORT, so the port is chosen at connect time per
destination).  Past what the host allows: a ``CapacityError`` that names the
limit and how to raise it.
"""

from __future__ import annotations

import errno
import ipaddress
import resource
import socket

DESCRIPTOR_RESERVE = 64  # per client process: the pipe to the parent, the event loop, TLS files...
MAX_PROCS = 256  # more client processes than this is a descriptor limit to raise instead
# Linux's IP_BIND_ADDRESS_NO_PORT (4.2+; in the socket module from Python 3.12)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class CapacityError(ValueError):
    """The run cannot open its connections: the message names the limit."""


def parse_sources(text: str) -> list[str]:
    """``127.0.0.2-127.0.0.9`` or ``127.0.0.2,127.0.0.3`` (or both mixed): the
    IPv4 or IPv6 source addresses, in order."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            a = ipaddress.ip_address(first.strip())
            b = ipaddress.ip_address(last.strip()) if last else a
        except ValueError as exc:
            raise CapacityError(f"--source: {exc}") from None
        if a.version != b.version or int(b) < int(a):
            raise CapacityError(f"--source: {part!r} is not a range of addresses from low to high")
        if int(b) - int(a) >= 4096:
            raise CapacityError(f"--source: {part!r} is more than 4,096 addresses")
        out.extend(str(ipaddress.ip_address(int(a) + i) if a.version == 4 else ipaddress.IPv6Address(int(a) + i))
                   for i in range(int(b) - int(a) + 1))
    if not out:
        raise CapacityError("--source: no address given")
    return out


def raise_descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (inherited by the forked
    client processes); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _read_ints(path: str) -> list[int] | None:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None


def ephemeral_ports() -> int:
    """How many ports net.ipv4.ip_local_port_range gives (28,232 by default)."""
    got = _read_ints("/proc/sys/net/ipv4/ip_local_port_range")
    return got[1] - got[0] + 1 if got and len(got) == 2 else 28232


def files_left() -> int | None:
    """Descriptors the host still allows (fs.file-max less those open), or None."""
    nr = _read_ints("/proc/sys/fs/file-nr")  # allocated, 0, max
    if not nr or len(nr) != 3:
        return None
    return nr[2] - nr[0]


def procs_for(connections: int, procs: int, limit: int) -> int:
    """Client processes for ``connections`` when each may hold ``limit``
    descriptors: ``procs``, or more if the connections do not fit."""
    per_proc = limit - DESCRIPTOR_RESERVE
    if per_proc < 1:
        raise CapacityError(f"the descriptor limit (RLIMIT_NOFILE) is {limit}: too low for a client process; "
                            f"raise it (ulimit -n, LimitNOFILE=)")
    needed = -(-connections // per_proc)
    if needed > MAX_PROCS:
        raise CapacityError(
            f"{connections:,} connections need {needed} client processes at {limit:,} descriptors each "
            f"(RLIMIT_NOFILE, the hard limit): raise it (ulimit -Hn / LimitNOFILE=; it may not pass "
            f"fs.nr_open, /proc/sys/fs/nr_open) so that at most {MAX_PROCS} processes suffice")
    return max(procs, needed)


def check(connections: int, sources: list[str], spawned: bool) -> None:
    """CapacityError if the host cannot give ``connections`` connections to one
    server address and port from ``sources`` (empty: the kernel's choice, one
    address); ``spawned``: the server is on this host too (a descriptor each)."""
    ports = ephemeral_ports()
    addresses = max(1, len(sources))
    if connections > ports * addresses:
        hint = ("add source addresses, e.g. --source 127.0.0.2-127.0.0.9 (any of 127.0.0.0/8 on loopback)"
                if not sources else "add more --source addresses")
        raise CapacityError(
            f"{connections:,} connections to one server address and port need more than the {ports:,} ephemeral "
            f"ports of net.ipv4.ip_local_port_range per source address ({addresses} given): {hint}, or widen "
            f"the range (sysctl -w net.ipv4.ip_local_port_range='1024 65535')")
    left = files_left()
    needed = connections * (2 if spawned else 1)
    if left is not None and needed > left:
        raise CapacityError(
            f"{connections:,} connections need {needed:,} descriptors on this host and fs.file-max leaves {left:,}: "
            f"raise it (sysctl -w fs.file-max=...)")


def spawned_workers(server_args: list[str]) -> int:
    """The ``--workers`` among the spawned fastpop's extra arguments (1 without)."""
    workers = 1
    for i, arg in enumerate(server_args):
        value = arg.split("=", 1)[1] if arg.startswith("--workers=") else (
            server_args[i + 1] if arg == "--workers" and i + 1 < len(server_args) else None)
        if value is not None and value.isdigit():
            workers = int(value)
    return workers


def check_spawned(connections: int, server_args: list[str], limit: int) -> None:
    """CapacityError if the fastpop that bench starts (inheriting ``limit``
    descriptors) cannot hold ``connections`` with its workers."""
    from fastpop.limits import connections_per_worker

    workers = spawned_workers(server_args)
    per_worker = connections_per_worker(limit)
    if connections > workers * per_worker:
        needed = -(-connections // per_worker)
        raise CapacityError(
            f"the spawned fastpop holds at most {per_worker:,} connections per worker at {limit:,} descriptors "
            f"(RLIMIT_NOFILE), {workers * per_worker:,} with {workers} worker(s): add "
            f"--server-arg=--workers={needed}, or raise the limit")


def explain(err: int) -> str:
    """What a connect failure with errno ``err`` says about the limits, or ''."""
    if err == errno.EADDRNOTAVAIL:
        return ("the ephemeral ports of the source address are used up (net.ipv4.ip_local_port_range): "
                "use --source with more addresses, or widen the range")
    if err == errno.EMFILE:
        return "the client process ran out of descriptors (RLIMIT_NOFILE): raise ulimit -n or add --procs"
    if err == errno.ENFILE:
        return "the host ran out of descriptors (fs.file-max): raise it"
    if err == errno.ECONNREFUSED:
        return ("refused: the server's listen queue may be full (net.core.somaxconn and the server's backlog) "
                "or it is not listening")
    return ""


def bound_socket(family: int, source: str) -> socket.socket:
    """A non-blocking TCP socket bound to ``source`` with its port left to connect
    (IP_BIND_ADDRESS_NO_PORT), so one source address has its ephemeral ports per
    destination rather than for all of them."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
