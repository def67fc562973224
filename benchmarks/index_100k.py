"""The mailbox index at 100,000 messages: cold build, warm login+STAT, LIST
and UIDL, against a login that has to scan the Maildir (no index), and
against Dovecot serving the same Maildir when it is installed.

    python benchmarks/index_100k.py [--messages 100000] [--rounds 200] [--index copy|mapped|both]

Times are measured by a client on 127.0.0.1 (connect to the STAT reply, or
the whole LIST/UIDL response); server CPU is read from /proc around the
warm rounds.  Also prints the LIST/UIDL formatting rate of the compiled
formatter and its Python twin, in-process.

fastpop runs in two configurations (fastpop.store.index): ``copy``, the
Maildirs being the server's own uid's (root's), so each index is read into
the per-process cache; ``mapped`` (as root), the Maildirs given to nobody, so
each index (root's, 0600) is memory-mapped per session and validated once.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastpop.bench import procstat
from fastpop.bench.spawn import SeedSpec, SizeDistribution, SpawnedServer, deliver, seed
from fastpop.store import _index as _index_c
from fastpop.store import _index_py, index


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def multiline(self) -> int:
        """Reads a multi-line response; returns its line count."""
        chunks = [self.buf]
        tail = self.buf[-5:]
        while not (tail.endswith(b"\r\n.\r\n") or (len(chunks) == 1 and chunks[0].startswith(b".\r\n"))):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            chunks.append(chunk)
            tail = (tail + chunk)[-5:]
        data = b"".join(chunks)
        end = data.index(b"\r\n.\r\n") + 5 if not data.startswith(b".\r\n") else 3
        self.buf = data[end:]
        return data[:end].count(b"\r\n") - 1

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{line!r}: {reply!r}")
        return reply

    def close(self) -> None:
        self.sock.close()


def login_stat(port: int, user: str, password: str) -> float:
    t0 = time.perf_counter()
    c = Client(port)
    c.line()
    c.cmd(b"USER " + user.encode())
    c.cmd(b"PASS " + password.encode())
    c.cmd(b"STAT")
    elapsed = time.perf_counter() - t0
    c.cmd(b"QUIT")
    c.close()
    return elapsed


def listing(port: int, user: str, password: str, command: bytes) -> tuple[float, int]:
    c = Client(port)
    c.line()
    c.cmd(b"USER " + user.encode())
    c.cmd(b"PASS " + password.encode())
    t0 = time.perf_counter()
    c.cmd(command)
    lines = c.multiline()
    elapsed = time.perf_counter() - t0
    c.cmd(b"QUIT")
    c.close()
    return elapsed, lines


def measure_server(port: int, pid: int, users: dict[str, tuple[str, str]], rounds: int, drop_index: Path | None = None):
    big_user, big_pw = users["big"]
    small_user, small_pw = users["small"]
    out = {}
    pids = procstat.tree(pid)
    for label, (user, pw) in (("big", (big_user, big_pw)), ("small", (small_user, small_pw))):
        times, cpu = [], 0.0
        for _ in range(rounds):
            if drop_index is not None:
                (drop_index / user / index.INDEX_FILE).unlink(missing_ok=True)
            before = procstat.cpu_seconds(pids)
            times.append(login_stat(port, user, pw))
            cpu += procstat.cpu_seconds(pids) - before
        out[label] = (statistics.median(times), cpu / rounds)
    out["LIST"] = listing(port, big_user, big_pw, b"LIST")
    out["UIDL"] = listing(port, big_user, big_pw, b"UIDL")
    return out


def formatting_rates(maildir: Path) -> dict[str, float]:
    loaded = index.load(str(maildir))
    assert loaded is not None
    deleted = bytearray(loaded.count)
    rates = {}
    for name, mod in (("compiled", _index_c), ("python", _index_py)):
        for what, fn in (("LIST", lambda m=mod: m.format_list(loaded.buf, loaded.count, deleted)),
                         ("UIDL", lambda m=mod: m.format_uidl(loaded.buf, loaded.count, loaded.names_off, deleted))):
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < 0.5:
                fn()
                n += 1
            rates[f"{what} {name}"] = n * loaded.count / (time.perf_counter() - t0)
    return rates


def chown_tree(top: Path, uid: int, gid: int) -> None:
    for path, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(path, name), uid, gid, follow_symlinks=False)
    os.chown(top, uid, gid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=200, help="warm logins per mailbox (CPU ticks are 10 ms)")
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--index", choices=["copy", "mapped", "both"], default="both",
                    help="how fastpop holds the index: read into its cache, or mapped (needs root)")
    args = ap.parse_args()
    configs = ["copy", "mapped"] if args.index == "both" else [args.index]
    if "mapped" in configs and os.geteuid() != 0:
        print("mapped indexes need Maildirs of another uid, served as root: skipped", file=sys.stderr)
        configs.remove("mapped")
    root = Path(tempfile.mkdtemp(prefix="fastpop-index-"))
    root.chmod(0o755)
    try:
        t0 = time.perf_counter()
        seeded = seed(root, SeedSpec(mailboxes=1, messages=args.messages, size=SizeDistribution("fixed", 1500)))
        small = "small"
        for sub in ("cur", "new", "tmp"):
            (seeded.mailroot / small / sub).mkdir(parents=True)
        for n in range(10):
            deliver(str(seeded.mailroot / small), b"Subject: %d\r\n\r\nhello\r\n" % n, "cur")
        with open(seeded.passwd, "a") as f:
            f.write(f"{small}:{{PLAIN}}smallpw::::::\n")
        big_user, big_pw = seeded.users[0]
        users = {"big": (big_user, big_pw), "small": (small, "smallpw")}
        old = time.time() - 3600  # settled directory mtimes: the index trusts them
        for user in (big_user, small):
            os.utime(seeded.mailroot / user / "cur", (old, old))
        print(f"seeded {args.messages} messages in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        results = {}
        colds = {}
        for config in configs:
            if config == "mapped":  # the Maildirs become nobody's; the indexes, root's 0600, are then mapped
                nobody = pwd.getpwnam("nobody")
                chown_tree(seeded.mailroot, nobody.pw_uid, nobody.pw_gid)
            for user in (big_user, small):
                (seeded.mailroot / user / index.INDEX_FILE).unlink(missing_ok=True)
                os.utime(seeded.mailroot / user / "cur", (old, old))
            server = SpawnedServer(seeded, name=f"fastpop-{config}")
            server.start()
            try:
                t0 = time.perf_counter()
                login_stat(server.port, big_user, big_pw)
                colds[config] = time.perf_counter() - t0
                results[f"fastpop ({config})"] = measure_server(server.port, server.pid, users, args.rounds)
                if config == configs[-1]:
                    results["fastpop, no index"] = measure_server(
                        server.port, server.pid, users, 3, drop_index=seeded.mailroot
                    )
            finally:
                server.stop()
        cold = colds[configs[0]]
        rates = formatting_rates(seeded.mailroot / big_user)

        dovecot_cold = None
        if not args.no_dovecot:
            from fastpop.bench import dovecot

            reason = dovecot.unavailable()
            if reason:
                print(f"Dovecot skipped: {reason}", file=sys.stderr)
            else:
                uid, gid = dovecot.ensure_mail_user()
                dovecot.chown_tree(seeded.mailroot, uid, gid)
                for user in (big_user, small):
                    os.utime(seeded.mailroot / user / "cur", (old, old))
                with dovecot.DovecotServer(seeded) as dv:
                    t0 = time.perf_counter()
                    login_stat(dv.port, big_user, big_pw)
                    dovecot_cold = time.perf_counter() - t0
                    results["Dovecot"] = measure_server(dv.port, dv.pid, users, args.rounds)

        n = args.messages
        print(f"\nMailbox index, {n} messages of 1.5 KB (client-measured on 127.0.0.1; server CPU from /proc)")
        print(f"cold first login+STAT: fastpop {cold * 1000:.0f} ms ({n / cold:,.0f} messages/s)"
              + "".join(f", {c} {t * 1000:.0f} ms" for c, t in list(colds.items())[1:])
              + (f", Dovecot {dovecot_cold * 1000:.0f} ms" if dovecot_cold is not None else ""))
        header = (f"{'':<20}{'login+STAT ' + str(n):>22}{'server CPU':>12}"
                  f"{'login+STAT 10':>16}{'server CPU':>12}{'LIST':>10}{'UIDL':>10}")
        print(header)
        for label, r in results.items():
            big_t, big_cpu = r["big"]
            small_t, small_cpu = r["small"]
            print(f"{label:<20}{big_t * 1000:>20.2f}ms{big_cpu * 1000:>10.2f}ms{small_t * 1000:>14.2f}ms"
                  f"{small_cpu * 1000:>10.2f}ms{r['LIST'][0] * 1000:>8.0f}ms{r['UIDL'][0] * 1000:>8.0f}ms")
        print("\nLIST/UIDL formatting in-process (lines/s):")
        for label, rate in rates.items():
            print(f"  {label:<16}{rate:>16,.0f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
