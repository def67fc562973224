"""What metrics cost a session: the server's own code, in one process, with
metrics off (POP3Protocol) and on (MeteredProtocol), on the same mailbox.

A whole-system run (``fastpop bench --spawn -s stat``, with and without
``--server-arg=--metrics-listen=127.0.0.1:0``) measures the server's CPU per
session including the kernel's networking, but on a shared machine it varies
by +-10%, more than metrics cost.  This drives sessions (greeting, USER,
PASS, STAT, QUIT) straight into the protocol objects over a transport that
only collects bytes, so the difference is the instrumentation alone; rounds
alternate and the fastest of each is kept, which hides other processes.

    PYTHONPATH=. python3 benchmarks/metrics_overhead.py --sessions 20000 --rounds 7

On a busy machine even the best of many rounds moves by 10%; instructions do
not.  Count them with valgrind, one side at a time (the difference between two
session counts is the per-session cost, start-up cancels out):

    py=$(python3 -c 'import sys; print(sys.executable)')   # the interpreter, not a shim script
    for side in off on; do for n in 1000 2000; do
      PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=/dev/null $py \\
        benchmarks/metrics_overhead.py --only $side --sessions $n --rounds 1 2>&1 | grep refs
    done; done
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


class Transport:
    """Enough of an asyncio transport for a session: it collects and closes."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.protocol = None
        self.out = 0
        self.closed = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data) -> None:
        self.out += len(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


LOGIN_STAT = (b"USER bench\r\n", b"PASS secret\r\n", b"STAT\r\n", b"QUIT\r\n")


def run(factory, ctx, loop, sessions: int, lines=LOGIN_STAT) -> float:
    """CPU seconds for ``sessions`` sessions, each sending ``lines``."""
    loop.run_until_complete(asyncio.sleep(0))  # the loop frees the cancelled idle timers
    gc.collect()
    start = time.process_time()
    for _ in range(sessions):
        proto = factory(ctx)
        transport = Transport(loop)
        transport.protocol = proto
        proto.connection_made(transport)
        for line in lines:
            proto.data_received(line)
            while proto._busy and not transport.closed:  # the first login builds the index in a thread
                loop.run_until_complete(asyncio.sleep(0.001))
        if not transport.closed:
            raise RuntimeError("the session did not end: is the mailbox locked?")
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--messages", type=int, default=10)
    ap.add_argument("--only", choices=["off", "on"],
                    help="run one side only (to count instructions under valgrind, which load does not disturb)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fastpop-metrics-bench-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(root / "prom")
    (root / "prom").mkdir()
    (root / "passwd").write_text("bench:{PLAIN}secret\n")
    for sub in ("cur", "new", "tmp"):
        (root / "mail" / "bench" / sub).mkdir(parents=True)
    for i in range(args.messages):
        (root / "mail" / "bench" / "new" / f"{1700000000 + i}.M{i}.bench").write_bytes(b"Subject: x\r\n\r\nhi\r\n")

    from fastpop.config import Config
    from fastpop.serve.metrics import Exporter
    from fastpop.serve.server import ServerContext, new_event_loop
    from fastpop.session.metered import Counters, MeteredProtocol
    from fastpop.session.protocol import POP3Protocol

    loop = new_event_loop("uvloop")
    asyncio.set_event_loop(loop)
    config = Config(passwd_file=str(root / "passwd"), mail_location=str(root / "mail") + "/%u")
    off = ServerContext(config, loop)
    on = ServerContext(config, loop)
    on.metrics = Counters()
    exporter = Exporter(on.metrics)

    # warm up: the index, the caches (and, with --only, only the class measured:
    # a server runs one, and the interpreter specializes its code for it)
    if args.only != "on":
        run(POP3Protocol, off, loop, 500)
    if args.only != "off":
        run(MeteredProtocol, on, loop, 500)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.rounds):
        order = [("off", POP3Protocol, off), ("on", MeteredProtocol, on)]
        for name, factory, ctx in order if i % 2 else reversed(order):  # neither always goes first
            if args.only in (None, name):
                times[name].append(run(factory, ctx, loop, args.sessions))
        exporter.flush()  # as the timer would; its cost is per second, not per session
    t = time.process_time()
    exporter.flush()
    flush_cost = time.process_time() - t
    loop.close()
    shutil.rmtree(root, ignore_errors=True)

    per = {k: [v / args.sessions * 1e6 for v in vs] for k, vs in times.items() if vs}
    print(f"{args.sessions} sessions x {args.rounds} rounds (greeting, USER, PASS, STAT, QUIT), server code only")
    for k in per:
        print(f"  metrics {k:3}: best {min(per[k]):7.2f} us/session, median {statistics.median(per[k]):7.2f}")
    if len(per) == 2:
        best_off, best_on = min(per["off"]), min(per["on"])
        print(f"  overhead: {best_on - best_off:+.2f} us/session ({best_on / best_off:.3f}x of this code path)")
    print(f"  one flush with nothing new: {flush_cost * 1e6:.0f} us")


if __name__ == "__main__":
    main()
