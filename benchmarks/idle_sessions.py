"""Memory and descriptors per idle logged-in session in one fastpop worker.

Creates N users, each with a small Maildir, starts one fastpop process
(``--workers 1``) with the descriptor limit raised to the hard limit, logs
every user in from client processes spread over source addresses in
127.0.0.0/8, holds all sessions idle, and reports the server's RSS and PSS
growth per session against a warmed-up baseline, and its descriptors per
session.

    python3 benchmarks/idle_sessions.py --sessions 19000 --procs 4

Issue #6's target: 19,000 sessions in one worker (the descriptor limit here is
20,000 per process) at most 8 KiB RSS growth per session.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MESSAGE = b"From: bench@example.com\r\nSubject: idle\r\n\r\nheld open\r\n"


def make_store(root: str, sessions: int) -> str:
    passwd = os.path.join(root, "passwd")
    with open(passwd, "w") as f:
        for i in range(sessions):
            f.write(f"u{i:05d}:{{PLAIN}}pw{i}\n")
    for i in range(sessions):
        base = os.path.join(root, "mail", f"u{i:05d}")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(base, sub))
        with open(os.path.join(base, "cur", f"1700000000.M1P1.bench,S={len(MESSAGE)}:2,"), "wb") as f:
            f.write(MESSAGE)
    return passwd


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = int(re.search(r"Pss:\s+(\d+)", f.read()).group(1))
    except OSError:
        pss = rss
    return rss, pss


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_server(root: str, passwd: str, loop: str) -> tuple[subprocess.Popen, int]:
    log = open(os.path.join(root, "server.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--workers", "1",
         "--passwd-file", passwd, "--mail-location", os.path.join(root, "mail", "%u"), "--loop", loop,
         *(["--allow-mail-as-root"] if os.geteuid() == 0 else [])],  # its own seeded Maildirs
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(os.path.join(root, "server.log")) as f:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", f.read())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit("fastpop did not start:\n" + open(os.path.join(root, "server.log")).read())


async def _login(port: int, source: str, user: int, sem: asyncio.Semaphore):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        writer.write(f"USER u{user:05d}\r\nPASS pw{user}\r\n".encode())
        for _ in range(3):  # greeting, USER, PASS
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                raise RuntimeError(f"user u{user:05d}: {line!r}")
        return reader, writer


def client(port: int, source: str, users: range, ramp: int, held, release) -> None:
    import uvloop

    async def main() -> None:
        sem = asyncio.Semaphore(ramp)
        conns = await asyncio.gather(*(_login(port, source, u, sem) for u in users))
        held.put(len(conns))
        while not release.is_set():
            await asyncio.sleep(0.1)
        for _, writer in conns:
            writer.close()

    uvloop.run(main())


def run(args: argparse.Namespace) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by server and clients
    root = tempfile.mkdtemp(prefix="fastpop-idle-")
    proc = None
    clients = []
    release = multiprocessing.Event()
    try:
        t0 = time.monotonic()
        passwd = make_store(root, args.sessions + args.warmup)
        print(f"{args.sessions + args.warmup} mailboxes made in {time.monotonic() - t0:.1f} s", flush=True)
        proc, port = start_server(root, passwd, args.loop)

        # Warm-up: allocator pools, the loop, caches; then the baseline.
        warm = range(args.sessions, args.sessions + args.warmup)
        held = multiprocessing.Queue()
        warm_release = multiprocessing.Event()
        warmer = multiprocessing.Process(target=client, args=(port, "127.0.0.250", warm, args.ramp, held, warm_release))
        warmer.start()
        held.get(timeout=120)
        warm_release.set()
        warmer.join(60)
        time.sleep(1.0)
        base_rss, base_pss = memory(proc.pid)
        base_fds = descriptors(proc.pid)

        per = -(-args.sessions // args.procs)
        t0 = time.monotonic()
        for i in range(args.procs):
            users = range(i * per, min(args.sessions, (i + 1) * per))
            p = multiprocessing.Process(target=client, args=(port, f"127.0.{i // 200}.{2 + i % 200}", users,
                                                              args.ramp, held, release))
            p.start()
            clients.append(p)
        total = sum(held.get(timeout=600) for _ in clients)
        login_s = time.monotonic() - t0
        time.sleep(2.0)  # let the server settle (executor threads, timers)
        rss, pss = memory(proc.pid)
        fds = descriptors(proc.pid)
        result = {
            "sessions": total,
            "login_seconds": round(login_s, 2),
            "baseline_rss_kib": base_rss,
            "held_rss_kib": rss,
            "rss_kib_per_session": round((rss - base_rss) / total, 2),
            "baseline_pss_kib": base_pss,
            "held_pss_kib": pss,
            "pss_kib_per_session": round((pss - base_pss) / total, 2),
            "descriptors_per_session": round((fds - base_fds) / total, 3),
            "client_procs": args.procs,
            "loop": args.loop,
        }
        release.set()
        for p in clients:
            p.join(60)
        return result
    finally:
        release.set()
        for p in clients:
            if p.is_alive():
                p.kill()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=19000)
    ap.add_argument("--procs", type=int, default=4, help="client processes (each its own source address)")
    ap.add_argument("--ramp", type=int, default=200, help="logins in flight per client process")
    ap.add_argument("--warmup", type=int, default=500, help="sessions opened and closed before the baseline")
    ap.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--keep", action="store_true", help="keep the generated store")
    args = ap.parse_args(argv)
    result = run(args)
    for key, value in result.items():
        print(f"{key:26} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = result["sessions"] == args.sessions and result["rss_kib_per_session"] <= 8
    print("target (all held, <= 8 KiB RSS per session):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
