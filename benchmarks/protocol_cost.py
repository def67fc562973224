"""The protocol's own cost per session, in one process: sessions driven
straight into POP3Protocol over a transport that only collects bytes (no
kernel, no event loop I/O), for cProfile or callgrind.

    PYTHONPATH=. python3 benchmarks/protocol_cost.py --scenario download --sessions 2000
    PYTHONPATH=. python3 benchmarks/protocol_cost.py --scenario download --profile
    PYTHONPATH=. python3 benchmarks/protocol_cost.py --scenario stat --instructions

``--instructions`` counts CPU instructions per session with valgrind's callgrind
(the count of two runs, 100 and 2,100 measured sessions, differenced, so start-up
and warm-up cancel out; the cyclic garbage collector off meanwhile, as one of its
full collections falling in one run and not the other would swamp the
difference): the same for the same tree whatever else the machine is doing, so
a change of a few percent shows where timing cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from metrics_overhead import run as run_sessions


def session_lines(scenario: str, messages: int) -> list[bytes]:
    lines = [b"USER bench\r\n", b"PASS secret\r\n"]
    if scenario == "stat":
        lines.append(b"STAT\r\n")
    else:
        lines.append(b"UIDL\r\n")
        lines += [b"RETR %d\r\n" % (i + 1) for i in range(messages)]
    return lines + [b"QUIT\r\n"]


def run(ctx, loop, sessions: int, lines: list[bytes]) -> float:
    from fastpop.session.protocol import POP3Protocol

    return run_sessions(POP3Protocol, ctx, loop, sessions, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["stat", "download"], default="stat")
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--size", type=int, default=3700)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the measured sessions")
    ap.add_argument("--instructions", action="store_true",
                    help="instructions per session under valgrind --tool=callgrind (deterministic)")
    ap.add_argument("--exactly", type=int, metavar="N", help=argparse.SUPPRESS)  # (one run of N, for --instructions)
    args = ap.parse_args()
    if args.instructions:
        return count_instructions(args)

    root = Path(tempfile.mkdtemp(prefix="fastpop-protocol-cost-"))
    (root / "passwd").write_text("bench:{PLAIN}secret\n")
    for sub in ("cur", "new", "tmp"):
        (root / "mail" / "bench" / sub).mkdir(parents=True)
    body = b"Subject: x\r\n\r\n" + b"x" * 70 + b"\r\n"
    body = body * max(1, args.size // len(body))
    for i in range(args.messages):
        (root / "mail" / "bench" / "new" / f"{1700000000 + i}.M{i}P{i}.bench").write_bytes(body)

    from fastpop.config import Config
    from fastpop.serve.server import ServerContext, new_event_loop
    from fastpop.store.maildir import MTIME_SETTLE_NS

    loop = new_event_loop("uvloop")
    asyncio.set_event_loop(loop)
    config = Config(passwd_file=str(root / "passwd"), mail_location=str(root / "mail") + "/%u",
                    mail_lock_table=str(root / "locks"))
    ctx = ServerContext(config, loop)
    lines = session_lines(args.scenario, args.messages)
    run(ctx, loop, 200, lines)  # warm: the index, the caches, the interpreter's specializations
    # as in a server's steady state: a login trusts cur/ and new/ only once their mtimes are
    # settled (fastpop.store.maildir.MTIME_SETTLE_NS), so wait for that and warm again
    time.sleep(MTIME_SETTLE_NS / 1e9 + 0.2)
    run(ctx, loop, 200, lines)
    if args.exactly is not None:
        import gc

        gc.disable()  # (a full collection in one run and not the other would swamp the difference)
        run(ctx, loop, args.exactly, lines)
    elif args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run(ctx, loop, args.sessions, lines)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    else:
        best = min(run(ctx, loop, args.sessions, lines) for _ in range(3))
        print(f"{args.scenario}: {best / args.sessions * 1e6:.1f} us per session (best of 3, server code only)")
    loop.close()
    shutil.rmtree(root, ignore_errors=True)


def count_instructions(args) -> None:
    def collected(sessions: int) -> int:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
             "--scenario", args.scenario, "--messages", str(args.messages), "--size", str(args.size),
             "--exactly", str(sessions)], capture_output=True, text=True, check=True).stderr
        return int(re.search(r"Collected : (\d+)", out).group(1))

    few, many = collected(100), collected(2100)
    print(f"{args.scenario}: {(many - few) / 2000:,.0f} instructions per session (callgrind, server code only)")


if __name__ == "__main__":
    main()
