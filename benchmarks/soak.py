#!/usr/bin/env python3
"""Soak: mixed POP3 load, LMTP deliveries and deletions, then an audit.

    python benchmarks/soak.py --seconds 600
    python benchmarks/soak.py --seconds 30 --json soak.json     # what tests/test_soak.py runs

Seeds mailboxes (``fastpop bench seed``'s generator: every message carries
a checksum of its body), starts a fastpop with an LMTP listener, and for
``--seconds`` runs at the same time:

- ``fastpop bench`` against it: a mix of logins, STATs, downloads and
  download-deletes (RETR everything, DELE everything, QUIT), every RETR
  checked against the message's checksum;
- deliveries over LMTP (``--deliverers`` connections), to random
  mailboxes, of new checksummed messages;
- a sampler of the server's RSS (/proc/PID/status).

Then it stops the server and audits: messages seeded + delivered - deleted
(the ``del=`` counts of the server's session log lines) = messages on disk;
every file on disk is byte-identical to a message seeded or delivered to
that mailbox, none twice; zero protocol errors from bench, zero refused
deliveries, nothing in the log worse than INFO; and the server's RSS did
not grow after warm-up (the peak of the last third of the run is within
``--rss-slack`` of the peak of the middle third).  Prints a JSON summary;
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fastpop.bench.spawn import (
    MessageFactory,
    SeedSpec,
    SizeDistribution,
    free_port,
    seed,
)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def on_disk(mailroot: Path) -> dict[str, collections.Counter]:
    out = {}
    for user in sorted(p.name for p in mailroot.iterdir()):
        c = collections.Counter()
        for sub in ("new", "cur"):
            for f in (mailroot / user / sub).iterdir():
                c[digest(f.read_bytes())] += 1
        out[user] = c
    return out


class Deliverer(threading.Thread):
    """LMTP deliveries to random users, one message per transaction."""

    def __init__(self, port: int, users: list[str], interval: float, seed_: int) -> None:
        super().__init__(daemon=True)
        self.port, self.users, self.interval = port, users, interval
        self.factory = MessageFactory(seed_)
        self.rng = random.Random(seed_)
        self.stop = threading.Event()
        self.delivered: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.count = 0
        self.refused: list[str] = []

    def run(self) -> None:
        lmtp = None
        n = 0
        while not self.stop.is_set():
            try:
                if lmtp is None:
                    lmtp = smtplib.LMTP("127.0.0.1", self.port, timeout=30)
                    lmtp.ehlo("soak.invalid")
                user = self.rng.choice(self.users)
                n += 1
                data = self.factory.message(user, 100000 + n, self.rng.randint(500, 60000))
                refused = lmtp.sendmail("soak@fastpop.invalid", [user], data)
                if refused:
                    self.refused.append(repr(refused))
                else:
                    self.delivered[user][digest(data)] += 1
                    self.count += 1
            except (smtplib.SMTPException, OSError) as exc:
                self.refused.append(repr(exc))
                lmtp = None
                time.sleep(0.1)
            self.stop.wait(self.interval)
        if lmtp is not None:
            try:
                lmtp.quit()
            except (smtplib.SMTPException, OSError):
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300, help="length of the load (default 300)")
    ap.add_argument("--mailboxes", type=int, default=60)
    ap.add_argument("--messages", type=int, default=15, help="seeded per mailbox")
    ap.add_argument("--connections", type=int, default=16, help="concurrent bench sessions")
    ap.add_argument("--mix", default="login=1,stat=2,download=5,download-delete=1")
    ap.add_argument("--deliverers", type=int, default=2, help="concurrent LMTP connections delivering")
    ap.add_argument("--delivery-interval", type=float, default=0.005, help="seconds between one deliverer's messages")
    ap.add_argument("--parser", choices=["cython", "python"], default="cython")
    ap.add_argument("--rss-slack", type=float, default=8.0, help="MiB the RSS may grow after warm-up")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fastpop-soak-"))
    seeded = seed(work, SeedSpec(mailboxes=args.mailboxes, messages=args.messages,
                                 size=SizeDistribution.parse("lognormal:4k"), seed=7))
    users = [name for name, _ in seeded.users]
    initial = on_disk(seeded.mailroot)
    seeded_count = sum(sum(c.values()) for c in initial.values())

    pop_port, lmtp_port = free_port(), free_port()
    env = dict(os.environ)
    env.pop("FASTPOP_NO_EXTENSIONS", None)
    if args.parser == "python":
        env["FASTPOP_NO_EXTENSIONS"] = "1"
    log_path = work / "server.log"
    log_file = open(log_path, "wb")
    server = subprocess.Popen([
        sys.executable, "-m", "fastpop", "serve", "--listen", f"127.0.0.1:{pop_port}",
        "--lmtp-listen", f"127.0.0.1:{lmtp_port}", "--passwd-file", str(seeded.passwd),
        "--mail-location", seeded.mail_location, "--log-level", "info",
        "--workers", "1",  # one process: its RSS is the server's
        "--control-socket", str(work / "control.sock"),  # its own, not the host's default
        *(["--allow-mail-as-root"] if os.geteuid() == 0 else []),  # its own seeded Maildirs
    ], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    summary: dict = {"seconds": args.seconds, "parser": args.parser, "mailboxes": args.mailboxes}
    failures: list[str] = []
    samples: list[tuple[float, int]] = []
    deliverers: list[Deliverer] = []
    try:
        deadline = time.monotonic() + 20
        while f"listening on 127.0.0.1:{pop_port:d}" not in log_path.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("fastpop did not start:\n" + log_path.read_text(errors="replace"))
            time.sleep(0.05)

        deliverers = [Deliverer(lmtp_port, users, args.delivery_interval, 11 + i) for i in range(args.deliverers)]
        stop_sampling = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop_sampling.is_set():
                samples.append((time.monotonic() - t0, rss(server.pid)))
                stop_sampling.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for d in deliverers:
            d.start()
        bench_json = work / "bench.json"
        bench = subprocess.run([
            sys.executable, "-m", "fastpop", "bench", f"127.0.0.1:{pop_port}", "--users", str(seeded.users_file),
            "-s", "mixed", "--mix", args.mix, "-c", str(args.connections), "-d", str(args.seconds), "-w", "0",
            "-p", "1", "--server-pid", str(server.pid), "--json", str(bench_json), "-q",
        ], capture_output=True, text=True, env=env, timeout=args.seconds + 120)
        for d in deliverers:
            d.stop.set()
        for d in deliverers:
            d.join(60)
        stop_sampling.set()
        sampler.join()
        if not bench_json.exists():
            raise SystemExit(f"fastpop bench failed ({bench.returncode}):\n{bench.stdout}\n{bench.stderr}")
        result = json.loads(bench_json.read_text())
        errors = result["errors"]
        summary.update(bench_sessions=result["totals"]["sessions"], bench_messages=result["totals"]["messages"],
                       bench_errors=errors["total"], bench_error_kinds=errors["by_kind"],
                       bench_error_samples=errors["samples"])
        if errors["total"]:
            failures.append(f"bench errors: {errors['by_kind']} {errors['samples']}")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log_file.close()

    # ------------------------------------------------------------ the audit
    log = log_path.read_text(errors="replace")
    deleted = collections.Counter()
    for m in re.finditer(r"session user=(\S+) rip=\S+ .* del=(\d+)/\d+ .* end=(\S+)", log):
        deleted[m.group(1)] += int(m.group(2))
    present = on_disk(seeded.mailroot)
    delivered: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for d in deliverers:
        for user, c in d.delivered.items():
            delivered[user] += c
    n_delivered = sum(d.count for d in deliverers)
    refused = [r for d in deliverers for r in d.refused]
    n_deleted = sum(deleted.values())
    n_present = sum(sum(c.values()) for c in present.values())
    summary.update(seeded=seeded_count, delivered=n_delivered, deleted=n_deleted, present=n_present,
                   lost=seeded_count + n_delivered - n_deleted - n_present,
                   refused_deliveries=len(refused))
    if summary["lost"] != 0:
        failures.append(f"seeded {seeded_count} + delivered {n_delivered} - deleted {n_deleted} != present {n_present}")
    foreign = 0
    for user, have in present.items():
        allowed = initial.get(user, collections.Counter()) + delivered.get(user, collections.Counter())
        extra = have - allowed
        foreign += sum(extra.values())
        if sum(allowed.values()) - sum(have.values()) != deleted[user]:
            failures.append(f"{user}: {sum(allowed.values())} stored - {deleted[user]} deleted != {sum(have.values())}")
    summary["not_byte_identical"] = foreign
    if foreign:
        failures.append(f"{foreign} files on disk match no message seeded or delivered to their mailbox")
    if refused:
        failures.append(f"deliveries refused: {refused[:3]}")
    bad_lines = [line for line in log.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line)
                 and "(allow_mail_as_root)" not in line]  # run as root: it serves its own Maildirs so, knowingly
    summary["log_warnings"] = len(bad_lines)
    if bad_lines:
        failures.append(f"server log: {bad_lines[:3]}")
    if server.returncode != 0:
        failures.append(f"server exit status {server.returncode}")
    # memory after warm-up: the last third must not rise above the middle third
    if len(samples) >= 9:
        third = len(samples) // 3
        middle = max(r for _, r in samples[third: 2 * third])
        last = max(r for _, r in samples[2 * third:])
        summary.update(rss_start_mib=round(samples[0][1] / 2**20, 1), rss_middle_peak_mib=round(middle / 2**20, 1),
                       rss_last_peak_mib=round(last / 2**20,
                                               1), rss_growth_after_warmup_mib=round((last - middle) / 2**20, 2))
        if last - middle > args.rss_slack * 2**20:
            failures.append(f"RSS grew after warm-up: {middle / 2**20:.1f} -> {last / 2**20:.1f} MiB")
    summary["failures"] = failures
    summary["ok"] = not failures
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    if args.keep or failures:
        print(f"work directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
