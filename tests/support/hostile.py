"""Hostile POP3 clients, thousands from one process (uvloop, non-blocking).

    python tests/support/hostile.py silent    --port P --count 5000 --hold 10
    python tests/support/hostile.py slowloris --port P --count 5000 --interval 2 --hold 10
    python tests/support/hostile.py noread    --port P --users FILE --hold 10
    python tests/support/hostile.py greedy    --port P --users FILE --hold 10
    python tests/support/hostile.py garbage   --port P --count 50 --hold 10
    python tests/support/hostile.py badlogin  --port P --count 50 --hold 10

Connections come from many source addresses (``--addresses``, bound before
connect, at most ``--per-address`` each) so a per-address connection limit
does not refuse them, and are opened at ``--rate`` per second so the
accept backlog never overflows.  ``silent`` connects and sends nothing;
``slowloris`` sends one byte of a never-ending line every ``--interval``
seconds; ``noread`` logs in (USER/PASS from ``--users``, ``name password``
per line) and pipelines RETRs it never reads; ``greedy`` does the same
but reads everything as fast as it can (a download flood); ``garbage`` floods lines of
junk (control characters, over-long lines, unknown commands) and
reconnects when thrown out; ``badlogin`` floods failed logins (APOP with
wrong digests, USER/PASS with wrong passwords) and reconnects.  The
one-shot kinds (silent, slowloris, noread) report how long the server let
each connection live.  Prints ``ready N`` once the connections are open,
then one JSON line of results after ``--hold`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import itertools
import json
import os
import random
import resource
import sys
import time


def addresses(network: str, per_address: int):
    """Source addresses, each repeated per_address times before the next."""
    for host in ipaddress.ip_network(network).hosts():
        for _ in range(per_address):
            yield str(host)


class Stats:
    def __init__(self) -> None:
        self.connected = 0
        self.greeted = 0
        self.connect_errors: dict[str, int] = {}
        self.closed_by_server = 0
        self.lifetimes: list[float] = []  # one-shot kinds: connect to server's close
        self.sessions = 0  # flooding kinds: connections made
        self.lines_sent = 0
        self.replies = 0
        self.bytes_sent = 0

    def error(self, exc: BaseException) -> None:
        key = type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) and exc.errno else "")
        self.connect_errors[key] = self.connect_errors.get(key, 0) + 1


class Hold(asyncio.Protocol):
    """One attacking connection; ``kind`` says what it does once greeted."""

    def __init__(self, kind: str, stats: Stats, args, user=None) -> None:
        self.kind, self.stats, self.args, self.user = kind, stats, args, user
        self.transport = None
        self.t0 = time.monotonic()
        self.buf = b""
        self.greeted = False
        self.closed = asyncio.get_running_loop().create_future()
        self.task = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stats.connected += 1
        if self.kind in ("noread", "greedy"):
            u, p = self.user
            transport.write(b"USER %s\r\nPASS %s\r\n" % (u.encode(), p.encode()) + b"RETR 1\r\n" * 50)

    def data_received(self, data: bytes) -> None:
        if self.greeted:
            self.stats.replies += data.count(b"\n")
            return
        self.buf += data
        if b"\r\n" in self.buf:
            self.greeted = True
            self.stats.greeted += 1
            if self.kind == "noread":
                self.transport.pause_reading()  # never read again: the server's writes back up
            self.stats.replies += self.buf.count(b"\n") - 1
            greeting = self.buf.split(b"\r\n", 1)[0]
            self.buf = b""
            if self.kind == "slowloris":
                self.task = asyncio.ensure_future(self.drip())
            elif self.kind == "garbage":
                self.task = asyncio.ensure_future(self.garbage())
            elif self.kind == "badlogin":
                self.task = asyncio.ensure_future(self.badlogin(greeting))

    def connection_lost(self, exc) -> None:
        self.stats.closed_by_server += 1
        self.stats.lifetimes.append(time.monotonic() - self.t0)
        if self.task is not None:
            self.task.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)
        self.stats.bytes_sent += len(data)
        self.stats.lines_sent += data.count(b"\n")

    async def drip(self) -> None:
        line = itertools.cycle(b"USER slow-loris-")
        await asyncio.sleep(random.uniform(0, self.args.interval))
        while not self.transport.is_closing():
            self.send(bytes([next(line)]))
            await asyncio.sleep(self.args.interval)

    async def garbage(self) -> None:
        rng = random.Random(id(self))
        junk = [b"\x00\x01\x02", b"\xff" * 40, b"XYZZY plugh", b"RETR", b"LIST a b c", b"\x1b[2J",
                b"A" * 300, b"USER", b"PASS", b"STAT"]
        while not self.transport.is_closing():
            if rng.random() < 0.05:
                self.send(os.urandom(8192).replace(b"\n", b"_"))  # a line with no end
            self.send(b"\r\n".join(rng.choice(junk) for _ in range(5)) + b"\r\n")
            await asyncio.sleep(0.005)

    async def badlogin(self, greeting: bytes) -> None:
        stamp = greeting[greeting.find(b"<"):] if b"<" in greeting else b"<x>"
        rng = random.Random(id(self))
        while not self.transport.is_closing():
            name = rng.choice(self.args.victims).encode()
            if self.args.apop:
                digest = hashlib.md5(stamp + os.urandom(6).hex().encode()).hexdigest().encode()
                self.send(b"APOP %s %s\r\n" % (name, digest))
            else:
                self.send(b"USER %s\r\nPASS %s\r\n" % (name, os.urandom(6).hex().encode()))
            await asyncio.sleep(0.05)


async def one_shot(kind: str, args, stats: Stats) -> None:
    loop = asyncio.get_running_loop()
    users = []
    if kind in ("noread", "greedy"):
        with open(args.users) as f:
            users = [tuple(line.split()) for line in f if line.strip()]
        count = len(users)
    else:
        count = args.count
    source = addresses(args.addresses, args.per_address)
    conns: list[Hold] = []
    batch = max(1, args.rate // 50)  # opened together every 20 ms

    async def open_one(i: int, addr: str) -> None:
        try:
            _, proto = await loop.create_connection(
                lambda: Hold(kind, stats, args, users[i] if users else None),
                "127.0.0.1", args.port, local_addr=(addr, 0))
            conns.append(proto)
        except OSError as exc:
            stats.error(exc)

    pending = []
    for start in range(0, count, batch):
        pending += [asyncio.ensure_future(open_one(i, next(source))) for i in range(start, min(count, start + batch))]
        await asyncio.sleep(0.02)
    await asyncio.gather(*pending)
    # greeted: wait briefly for the greetings still in flight
    deadline = time.monotonic() + 5
    while stats.greeted + stats.closed_by_server < len(conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    print(f"ready {len(conns)}", flush=True)
    if conns:
        await asyncio.wait([c.closed for c in conns], timeout=args.hold)
    stats.still_open = sum(1 for c in conns if not c.closed.done())
    for c in conns:
        if c.transport is not None and not c.closed.done():
            c.transport.abort()


async def flood(kind: str, args, stats: Stats) -> None:
    loop = asyncio.get_running_loop()
    source = addresses(args.addresses, args.per_address)
    source = itertools.cycle(list(source)[: max(args.count * 4, 1)])
    stop = time.monotonic() + args.hold

    async def worker() -> None:
        while time.monotonic() < stop:
            try:
                _, proto = await loop.create_connection(lambda: Hold(kind, stats, args), "127.0.0.1", args.port,
                                                        local_addr=(next(source), 0))
            except OSError as exc:
                stats.error(exc)
                await asyncio.sleep(0.05)
                continue
            stats.sessions += 1
            try:
                await asyncio.wait_for(asyncio.shield(proto.closed), max(0.01, stop - time.monotonic()))
            except asyncio.TimeoutError:
                proto.transport.abort()
                await proto.closed
                stats.closed_by_server -= 1  # we closed this one

    print(f"ready {args.count}", flush=True)
    await asyncio.gather(*(worker() for _ in range(args.count)))
    stats.still_open = 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["silent", "slowloris", "noread", "greedy", "garbage", "badlogin"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=100, help="connections (flooding kinds: concurrent ones)")
    ap.add_argument("--addresses", default="127.1.0.0/16", help="source addresses to spread over")
    ap.add_argument("--per-address", type=int, default=40)
    ap.add_argument("--rate", type=int, default=1000, help="connections opened per second")
    ap.add_argument("--hold", type=float, default=10.0, help="seconds to keep going / to wait for the server")
    ap.add_argument("--interval", type=float, default=2.0, help="slowloris: seconds between bytes")
    ap.add_argument("--users", help="noread: 'name password' per line")
    ap.add_argument("--victims", default="victim,root,admin", help="badlogin: user names to try")
    ap.add_argument("--apop", action="store_true", help="badlogin: APOP (untrusted addresses) instead of USER/PASS")
    args = ap.parse_args(argv)
    args.victims = args.victims.split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    stats = Stats()
    t0 = time.monotonic()
    run = one_shot if args.kind in ("silent", "slowloris", "noread", "greedy") else flood
    asyncio.run(run(args.kind, args, stats))
    life = sorted(stats.lifetimes)
    print(json.dumps({
        "kind": args.kind, "connected": stats.connected, "greeted": stats.greeted,
        "connect_errors": stats.connect_errors, "closed_by_server": stats.closed_by_server,
        "still_open": stats.still_open, "sessions": stats.sessions, "lines_sent": stats.lines_sent,
        "bytes_sent": stats.bytes_sent, "replies": stats.replies,
        "lifetime_min": life[0] if life else None, "lifetime_max": life[-1] if life else None,
        "seconds": time.monotonic() - t0,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
