"""RETR of one large message: fastpop's sendfile path and transform path
against the raw limit, a minimal responder that sends the same file with a
bare os.sendfile to the same client.  Everything on 127.0.0.1.

    python benchmarks/retr_large.py [--size-mb 100] [--rounds 5] [--case no-dots --case dot-per-mib]
                                    [--baseline /tmp/old-fastpop]

Two messages, each CRLF-clean: ``no-dots``, where no line starts with "."
(the index knows it, so fastpop sends it in one sendfile with no scan), and
``dot-per-mib``, with a line starting with "." every MiB (fastpop scans it and
writes the stuffing dot between sendfile segments).  Prints, per message and
path, MB/s (median of the rounds and their range; rounds interleaved raw,
sendfile, transform, raw, ...), the ratio of medians to the raw limit and the
median and range of each round's own ratio, each fastpop server's CPU time
per RETR and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CASES = ("no-dots", "dot-per-mib")


def make_message(path: str, size: int, dots: bool) -> int:
    """A CRLF message of about ``size`` octets; with ``dots``, a line starting
    with "." every ~1 MiB (so stuffing really happens)."""
    line = b"x" * 76 + b"\r\n"
    body = line * (1024 * 1024 // len(line))
    block = body + (b".dot line\r\n" if dots else b"dot-less line\r\n")
    with open(path, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        written = 0
        while written < size:
            f.write(block)
            written += len(block)
    return os.path.getsize(path)


RAW_RESPONDER = """
import os, socket, sys
path = sys.argv[1]
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    if conn.recv(64) == b"QUIT\\r\\n":
        break
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        conn.sendall(b"+OK %d octets\\r\\n" % size)
        offset = 0
        while offset < size:
            offset += os.sendfile(conn.fileno(), f.fileno(), offset, size - offset)
    conn.sendall(b".\\r\\n")
    conn.close()
"""


SERVER_CPUS: set[int] = set()  # every server on these, the client on the others (--pin)


def pin_server() -> None:
    if SERVER_CPUS:
        os.sched_setaffinity(0, SERVER_CPUS)


def raw_responder(path: str) -> tuple[subprocess.Popen, int]:
    """A process of its own (as each fastpop is, so CPU is counted alike) that
    accepts connections and for each sends '+OK', the file with os.sendfile
    on a blocking socket, '.'; "QUIT" ends it."""
    proc = subprocess.Popen([sys.executable, "-c", RAW_RESPONDER, path], stdout=subprocess.PIPE,
                            preexec_fn=pin_server)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def read_response(sock: socket.socket) -> int:
    """Reads a multi-line response to the end; returns the octets received."""
    buf = bytearray(4 * 1024 * 1024)
    view = memoryview(buf)
    total = 0
    tail = b""
    while True:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("closed before the end of the response")
        total += n
        tail = (tail + bytes(view[max(0, n - 8) : n]))[-8:]
        if tail.endswith(b"\r\n.\r\n"):
            return total


def time_raw(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(b"RETR\r\n")
        n = read_response(s)
        return n / (time.perf_counter() - t0)


def time_fastpop(port: int, user: str) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"USER %s\r\nPASS bench\r\n" % user.encode())
        f.readline()
        login = f.readline()
        if not login.startswith(b"+OK"):
            raise RuntimeError(f"login failed: {login!r}")
        t0 = time.perf_counter()
        s.sendall(b"RETR 1\r\n")
        n = read_response(s)
        elapsed = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
        s.recv(100)  # the mailbox is unlocked once QUIT is answered
        return n / elapsed


def start_fastpop(root: str, extra: list[str], tree: str | None = None) -> tuple[subprocess.Popen, int]:
    """fastpop serving root/%u (from the source tree ``tree`` if given)."""
    log = open(os.path.join(root, f"server{len(extra)}{'-tree' if tree else ''}.log"), "w+")
    env = dict(os.environ, PYTHONPATH=tree) if tree else None  # (and run there: -m puts the cwd first)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--workers", "1", "--passwd-file",
         os.path.join(root, "passwd"), "--mail-location", os.path.join(root, "%u"), "--log-level", "info",
         *(["--allow-mail-as-root"] if os.geteuid() == 0 else []), *extra],  # its own seeded Maildirs
        stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin_server, cwd=tree or root,
    )
    for _ in range(200):
        log.seek(0)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read())
        if m:
            if tree:
                check_tree(proc.pid, tree)
            return proc, int(m.group(1))
        time.sleep(0.05)
    raise RuntimeError("fastpop did not start")


def check_tree(pid: int, tree: str) -> None:
    """That the server runs the fastpop of ``tree``: its compiled modules are mapped from there."""
    with open(f"/proc/{pid}/maps") as f:
        if not any(tree + "/fastpop/" in line for line in f):
            raise RuntimeError(f"the baseline server (pid {pid}) does not run the fastpop in {tree}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--case", action="append", choices=CASES, help="the message(s) to send (default: both)")
    ap.add_argument("--baseline", metavar="TREE",
                    help="also run the sendfile path of the fastpop in this source tree (extensions built), "
                         "e.g. `git archive` of an older commit, interleaved with the others")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="let the scheduler place servers and client (by default every server runs on the first "
                         "CPU and the client on the others: the same placement for all, steadier figures)")
    args = ap.parse_args()
    cases = args.case or list(CASES)
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        SERVER_CPUS.add(cpus[0])
        os.sched_setaffinity(0, set(cpus[1:]))
    root = tempfile.mkdtemp(prefix="fastpop-retr-")
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    raws: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        sizes = {}
        with open(os.path.join(root, "passwd"), "w") as f:
            for case in cases:
                f.write(f"{case}:{{PLAIN}}bench\n")
        for case in cases:
            maildir = os.path.join(root, case)
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(maildir, sub))
            tmp = os.path.join(maildir, "tmp", "msg")
            size = sizes[case] = make_message(tmp, args.size_mb * 1024 * 1024, case == "dot-per-mib")
            name = f"1700000000.M1P1.bench,S={size},W={size}:2,"
            final = os.path.join(maildir, "cur", name)
            os.rename(tmp, final)
            old = time.time() - 3600  # a settled cur/ mtime: the index trusts it at once
            os.utime(os.path.join(maildir, "cur"), (old, old))
            raws[case] = raw_responder(final)
        servers["fastpop sendfile"] = start_fastpop(root, [])
        servers["fastpop transform"] = start_fastpop(root, ["--no-sendfile"])
        if args.baseline:
            servers["baseline sendfile"] = start_fastpop(root, [], os.path.abspath(args.baseline))
        for case in cases:  # the first login builds the index (and measures the message)
            for _, port in servers.values():
                time_fastpop(port, case)
        paths = ["raw os.sendfile", *servers]
        results = {(case, label): [] for case in cases for label in paths}
        cpu = {(case, label): 0.0 for case in cases for label in paths}
        for _ in range(args.rounds):
            for case in cases:
                proc, port = raws[case]
                before = cpu_seconds(proc.pid)
                results[case, "raw os.sendfile"].append(time_raw(port))
                cpu[case, "raw os.sendfile"] += cpu_seconds(proc.pid) - before
                for label, (proc, port) in servers.items():
                    before = cpu_seconds(proc.pid)
                    results[case, label].append(time_fastpop(port, case))
                    cpu[case, label] += cpu_seconds(proc.pid) - before
        print(f"RETR of a {args.size_mb} MiB message, {args.rounds} rounds; MB/s median (range);"
              " vs raw: ratio of medians, and the median (range) of each round's ratio")
        print(f"{'message':<12} {'path':<18} {'MB/s':>6} {'range':>11} {'vs raw':>7} {'per round':>16}"
              f" {'CPU/RETR':>9} {'peak RSS':>9}")
        for case in cases:
            raw_values = results[case, "raw os.sendfile"]
            raw = statistics.median(raw_values)
            for label in paths:
                values = results[case, label]
                ratios = [v / r for v, r in zip(values, raw_values, strict=True)]
                proc = servers[label][0] if label in servers else raws[case][0]
                rss = f"{peak_rss_kib(proc.pid) / 1024:.0f} MiB"
                per = f"{cpu[case, label] / args.rounds * 1000:.0f} ms"
                mbps = statistics.median(values)
                rng = f"{min(values) / 1e6:.0f}-{max(values) / 1e6:.0f}"
                print(f"{case:<12} {label:<18} {mbps / 1e6:6.0f} {rng:>11} {mbps / raw:7.2f}"
                      f" {statistics.median(ratios):6.2f} ({spread(ratios)}) {per:>9} {rss:>9}")
    finally:
        for proc, _ in [*servers.values(), *raws.values()]:  # also when interrupted: no server outlives the run
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
