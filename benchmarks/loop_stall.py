"""How long another user's session waits while one user makes the worker
handle a large file: a valid fastpop.index planted in their Maildir
(``--attack index``), or a RETR sent by sendfile to a reader that keeps up
(``--attack retr``).  One fastpop worker on 127.0.0.1; a second user's
connection sends NOOP every 2 ms throughout, and each round reports the
attacker's time and the victim's slowest NOOP.

    python3 benchmarks/loop_stall.py --attack index --records 2000000
    python3 benchmarks/loop_stall.py --attack retr --size-mb 1024 --baseline /tmp/old-fastpop

``--baseline TREE`` runs the same rounds against another checkout (its
extensions built), after this tree's.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

from fastpop.bench import spawn
from fastpop.store.index import Entry, encode

HOUR_NS = 3600 * 10**9


class Client:
    """A POP3 connection over a plain socket, logged in."""

    def __init__(self, port: int, user: tuple[str, str], timeout: float = 120.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.line()
        for command in (f"USER {user[0]}", f"PASS {user[1]}"):
            reply = self.cmd(command)
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"{command.split()[0]}: {reply!r}")

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def drain_body(self) -> int:
        """Read a multi-line body to its terminator, in big reads; its length."""
        got, tail = len(self.buf), self.buf[-5:]
        if b"\r\n.\r\n" in self.buf:
            return got
        buf = bytearray(4 << 20)
        while True:
            n = self.sock.recv_into(buf)
            if not n:
                raise ConnectionError("closed in a body")
            got += n
            tail = (tail + bytes(buf[max(0, n - 5) : n]))[-5:]
            if tail == b"\r\n.\r\n":
                self.buf = b""
                return got

    def close(self) -> None:
        self.sock.close()


class Prober(threading.Thread):
    """The victim: NOOP, wait 2 ms, again; the slowest reply."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client, self.worst, self.stop = client, 0.0, False

    def run(self) -> None:
        while not self.stop:
            started = time.monotonic()
            if not self.client.cmd("NOOP").startswith(b"+OK"):
                raise RuntimeError("NOOP refused")
            self.worst = max(self.worst, time.monotonic() - started)
            time.sleep(0.002)


def plant_index(maildir: Path, records: int) -> int:
    """A valid fastpop.index of ``records`` made-up messages, naming cur/'s (settled) mtime."""
    cur = maildir / "cur"
    then = time.time_ns() - HOUR_NS
    os.utime(cur, ns=(then, then))
    entries = [Entry(f"{1600000000 + i}.M{i}P1.host:2,", 100, 100, 1, f"u{i}") for i in range(records)]
    data = encode(entries, cur.stat().st_mtime_ns, 0)
    tmp = maildir / "planted.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, maildir / "fastpop.index")  # a new inode each round: not the copy in memory
    return len(data)


def run_tree(label: str, tree: str | None, seeded: spawn.Seeded, args: argparse.Namespace) -> None:
    """The rounds against the fastpop of ``tree`` (None: the one this script imports)."""
    server = spawn.SpawnedServer(seeded, package_root=tree, name=label.replace(" ", "-"))
    server.start()
    attacker = seeded.users[0]
    victim = seeded.users[-1]
    try:
        first = Client(server.port, attacker)  # indexed (and measured) before the rounds
        first.cmd("QUIT")
        first.close()
        victim_client = Client(server.port, victim)
        for rnd in range(1, args.rounds + 1):
            what = ""
            if args.attack == "index":
                size = plant_index(seeded.mailroot / attacker[0], args.records)
                what = f"index of {size / 2**20:.0f} MiB"
            prober = Prober(victim_client)
            prober.start()
            time.sleep(0.05)
            started = time.monotonic()
            c = Client(server.port, attacker)
            if args.attack == "retr":
                status = c.cmd("RETR 1")
                if not status.startswith(b"+OK"):
                    raise RuntimeError(f"RETR: {status!r}")
                what = f"RETR of {c.drain_body() / 2**20:.0f} MiB"
            else:
                c.cmd("STAT")
            elapsed = time.monotonic() - started
            c.cmd("QUIT")
            c.close()
            time.sleep(0.05)
            prober.stop = True
            prober.join()
            print(f"{label:>10}  round {rnd}: {what} in {elapsed * 1000:6.0f} ms; "
                  f"the other user's slowest NOOP {prober.worst * 1000:6.1f} ms", flush=True)
        victim_client.close()
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", choices=["index", "retr"], required=True)
    ap.add_argument("--records", type=int, default=2_000_000, help="index: made-up messages (default 2,000,000)")
    ap.add_argument("--size-mb", type=int, default=1024, help="retr: the message's size (default 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="TREE", help="another checkout to run the same rounds against")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastpop-loop-stall-") as root:
        seeded = spawn.seed(root, spawn.SeedSpec(mailboxes=2, messages=1,
                                                 size=spawn.SizeDistribution.parse("3700")))
        if args.attack == "retr":
            # the attacker's only message: CRLF lines, none starting with "." (measured at the
            # first login, it then goes out by sendfile alone, nothing scanned)
            cur = seeded.mailroot / seeded.users[0][0] / "cur"
            for old in cur.iterdir():
                old.unlink()
            line = b"x" * 70 + b"\r\n"
            block = line * (1024 * 1024 // len(line))
            with open(cur / "1700000000.M1P1.loopstall:2,", "wb") as f:
                f.write(b"Subject: large\r\n\r\n")
                for _ in range(args.size_mb):
                    f.write(block)
        run_tree("this tree", None, seeded, args)
        if args.baseline:
            run_tree("baseline", os.path.abspath(args.baseline), seeded, args)


if __name__ == "__main__":
    main()
