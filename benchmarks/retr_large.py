"""RETR of one large message: fastpop's sendfile path and transform path
against the raw limit, a minimal responder that sends the same file with a
bare os.sendfile to the same client.  Everything on 127.0.0.1.

    python benchmarks/retr_large.py [--size-mb 100] [--rounds 5]

Prints MB/s (median of the rounds, interleaved A B C A B C ...), the ratios
to the raw limit, each fastpop server's CPU time per RETR and peak RSS.
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
import threading
import time


def make_message(path: str, size: int) -> int:
    """A CRLF message with a dot-line every ~1 MiB (so stuffing really happens)."""
    line = b"x" * 76 + b"\r\n"
    block = b"Subject: big\r\n\r\n" + line * (1024 * 1024 // len(line)) + b".dot line\r\n"
    with open(path, "wb") as f:
        written = 0
        while written < size:
            f.write(block)
            written += len(block)
    return written


def raw_responder(path: str) -> tuple[int, threading.Thread]:
    """Accepts connections; for each, sends '+OK', the file with os.sendfile, '.'."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            if conn.recv(64) == b"QUIT\r\n":
                conn.close()
                return
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                conn.sendall(b"+OK %d octets\r\n" % size)
                offset = 0
                while offset < size:
                    offset += os.sendfile(conn.fileno(), f.fileno(), offset, size - offset)
            conn.sendall(b".\r\n")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return port, t


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


def time_fastpop(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"USER bench\r\nPASS bench\r\n")
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


def start_fastpop(root: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    log = open(os.path.join(root, f"server{len(extra)}.log"), "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--workers", "1", "--passwd-file",
         os.path.join(root, "passwd"), "--mail-location", os.path.join(root, "%u"), "--log-level", "info",
         *(["--allow-mail-as-root"] if os.geteuid() == 0 else []), *extra],  # its own seeded Maildirs
        stdout=log, stderr=subprocess.STDOUT,
    )
    for _ in range(200):
        log.seek(0)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    raise RuntimeError("fastpop did not start")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="fastpop-retr-")
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        maildir = os.path.join(root, "bench")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(maildir, sub))
        tmp = os.path.join(maildir, "tmp", "msg")
        size = make_message(tmp, args.size_mb * 1024 * 1024)
        name = f"1700000000.M1P1.bench,S={size},W={size}:2,"
        final = os.path.join(maildir, "cur", name)
        os.rename(tmp, final)
        with open(os.path.join(root, "passwd"), "w") as f:
            f.write("bench:{PLAIN}bench\n")
        raw_port, _ = raw_responder(final)
        servers["fastpop sendfile"] = start_fastpop(root, [])
        servers["fastpop transform"] = start_fastpop(root, ["--no-sendfile"])
        results: dict[str, list[float]] = {"raw os.sendfile": [], **{k: [] for k in servers}}
        cpu: dict[str, float] = {k: 0.0 for k in servers}
        for _ in range(args.rounds):
            results["raw os.sendfile"].append(time_raw(raw_port))
            for label, (proc, port) in servers.items():
                before = cpu_seconds(proc.pid)
                results[label].append(time_fastpop(port))
                cpu[label] += cpu_seconds(proc.pid) - before
        raw = statistics.median(results["raw os.sendfile"])
        print(f"RETR of a {size / 1e6:.0f} MB message, median of {args.rounds} rounds")
        print(f"{'path':<20} {'MB/s':>8} {'vs raw':>8} {'CPU/RETR':>10} {'peak RSS':>10}")
        for label, values in results.items():
            mbps = statistics.median(values)
            if label in servers:
                rss = f"{peak_rss_kib(servers[label][0].pid) / 1024:.0f} MiB"
                per = f"{cpu[label] / args.rounds * 1000:.0f} ms"
            else:
                rss = per = "-"
            print(f"{label:<20} {mbps / 1e6:8.0f} {mbps / raw:8.2f} {per:>10} {rss:>10}")
        with socket.create_connection(("127.0.0.1", raw_port)) as s:
            s.sendall(b"QUIT\r\n")
    finally:
        for proc, _ in servers.values():  # also when interrupted: no server outlives the run
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
