#!/usr/bin/env python3
"""Sessions per second and CPU per session through ``fastpop proxy`` against direct, in one run.

    python3 benchmarks/proxy_relay.py                     # ~40 seconds
    python3 benchmarks/proxy_relay.py --rounds 3 --scenario download --markdown proxy.md
    python3 benchmarks/proxy_relay.py --dovecot-proxy     # also through Dovecot's proxy (root)

Generates one set of Maildirs (200 users x 20 messages of 3,700 B), starts one
fastpop backend on 127.0.0.1 with a PROXY listener on 127.0.0.2, and one
``fastpop proxy`` (one worker each) whose ``[backends] servers`` is that
listener, then runs ``fastpop bench``'s load (``stat`` by default: connect,
USER/PASS, STAT, QUIT, every session a new connection; ``download``: UIDL
and RETR of all 20 messages) straight at the backend and through the proxy,
alternating the order between rounds.  It prints medians of sessions/s, of
the backend's and the proxy's CPU per session (each whole process, user +
system, from /proc), and of the session latency.

With ``--dovecot-proxy`` it also starts Debian's Dovecot as a POP3 proxy
only (fastpop/bench/dovecot-proxy.conf.in: passwd-file entries with
``proxy=y host=127.0.0.1 port=<the backend's plain port>``, the same {PLAIN}
passwords, the high-performance pop3-login settings of dovecot.conf.in) in
front of the same backend's plain listener, and adds a row "through
Dovecot's proxy": its proxy CPU is summed over Dovecot's whole process tree,
as compare_dovecot.py does.  Needs root; exits 2 with the reason when Dovecot
cannot run.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastpop.bench import dovecot, procstat, spawn
from fastpop.bench.load import LoadSpec
from fastpop.bench.runner import Target, execute

BACKEND_HOST = "127.0.0.2"
DOVECOT = "through Dovecot's proxy"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Proxy:
    """``python -m fastpop proxy`` in front of the backend's PROXY listener."""

    def __init__(self, seeded: spawn.Seeded, backend: str) -> None:
        self.root = seeded.root
        config = self.root / "proxy.toml"
        config.write_text(f'[backends]\nservers = ["{backend}"]\n')
        self.log_path = self.root / "proxy.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastpop", "proxy", "--config", str(config), "--listen", "127.0.0.1:0",
             "--passwd-file", str(seeded.passwd), "--workers", "1", "--log-level", "info",
             *(["--allow-mail-as-root"] if os.geteuid() == 0 else [])],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL, cwd=self.root)
        deadline = time.monotonic() + 20
        while True:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fastpop proxy did not start:\n" + self.log_path.read_text(errors="replace"))
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self._log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mailboxes", type=int, default=200)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("-s", "--scenario", choices=["login", "stat", "download"], default="stat")
    p.add_argument("-c", "--connections", type=int, default=16)
    p.add_argument("-p", "--procs", type=int, default=1, help="client processes (default 1)")
    p.add_argument("-d", "--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the paths this many times; medians are shown")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--dovecot-proxy", action="store_true",
                   help="also run through Dovecot as a POP3 proxy in front of the same backend (needs root)")
    args = p.parse_args(argv)
    if args.dovecot_proxy:
        reason = dovecot.unavailable()
        if reason:
            print(f"proxy_relay: --dovecot-proxy: {reason}", file=sys.stderr)
            return 2

    workdir = spawn.make_workdir("fastpop-proxy-bench-")
    seeded = spawn.seed(workdir, spawn.SeedSpec(args.mailboxes, args.messages))
    mailboxes = {"users": args.mailboxes, "messages": args.messages, "size": "3700 B", "large_users": 0,
                 "large_size": 0}
    backend_addr = f"{BACKEND_HOST}:{free_port(BACKEND_HOST)}"
    backend = spawn.SpawnedServer(seeded, extra_args=["--proxy-listen", backend_addr,
                                                      "--proxy-trusted-networks", "127.0.0.1/32"])
    proxy = dove = None
    notes: list[str] = []
    results: dict[str, list[dict]] = {}
    load_before = os.getloadavg()[0]
    try:
        backend.start()
        proxy = Proxy(seeded, backend_addr)
        ports = {"direct": backend.port, "through the proxy": proxy.port}
        # what each variant's "proxy CPU" is: fastpop proxy's one process, or Dovecot's whole tree
        proxy_pid = proxy.proc.pid
        proxy_cpu = {"direct": lambda: cpu_seconds(proxy_pid), "through the proxy": lambda: cpu_seconds(proxy_pid)}
        if args.dovecot_proxy:
            # the backend's plain listener: Dovecot sends no PROXY header, it logs in with the client's USER/PASS
            dove = dovecot.DovecotProxy(seeded, backend.port)
            dove.start()
            ports[DOVECOT] = dove.port
            dove_pid = dove.pid
            proxy_cpu[DOVECOT] = lambda: procstat.cpu_seconds(procstat.tree(dove_pid))
            notes.append(f"Dovecot {dove.version} as a POP3 proxy only, in front of the backend's plain listener "
                         f"(passwd-file with the same {{PLAIN}} passwords and proxy=y host=127.0.0.1 "
                         f"port={backend.port}; it checks the password, then logs in at the backend with the "
                         f"client's USER/PASS); service pop3-login: {dove.login_settings()}; auth_cache_size = 10M; "
                         f"its proxy CPU is summed over Dovecot's whole process tree (master, login, auth, ...).")

        def spec(variant: str, **kw) -> LoadSpec:
            base = dict(host="127.0.0.1", port=ports[variant], scenario=args.scenario, users=seeded.users,
                        connections=args.connections, procs=min(args.procs, args.connections),
                        duration=args.duration, warmup=0.0)
            base.update(kw)
            return LoadSpec(**base)

        def run(variant: str, **kw) -> dict:
            measures = {"backend": lambda: cpu_seconds(backend.pid), "proxy": proxy_cpu[variant]}
            before = {k: get() for k, get in measures.items()}
            res = execute(spec(variant, **kw), Target("127.0.0.1", ports[variant], backend.describe(),
                                                      spawned=True), mailboxes, quiet=True, header=False)
            res["cpu"] = {k: get() - before[k] for k, get in measures.items()}
            return res

        print("warming up: one session per mailbox, each way")
        for variant in ports:
            run(variant, sessions=len(seeded.users), duration=None)
        order = list(ports)
        for r in range(args.rounds):
            for variant in (order if r % 2 == 0 else order[::-1]):
                res = run(variant)
                print(f"{variant}: {res['rates']['sessions_per_s']:,.1f} sessions/s, errors {res['errors']['total']}")
                results.setdefault(variant, []).append(res)
    finally:
        if dove is not None:
            dove.stop()
        if proxy is not None:
            proxy.stop()
        backend.stop()
        spawn.remove_workdir(workdir)

    md = table(results, args, load_before, notes)
    print()
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    errors = sum(r["errors"]["total"] for runs in results.values() for r in runs)
    return 1 if errors else 0


def _per_session_ms(res: dict, who: str) -> float:
    """CPU ms per session: the process's CPU over the run (no warm-up: the
    warm-up pass ran before) over the sessions completed."""
    total = res["totals"]["sessions"]
    return 1000 * res["cpu"][who] / total if total else float("nan")


def table(results: dict[str, list[dict]], args, load_before: float, notes: list[str] | None = None) -> str:
    def med(variant: str, get) -> float:
        return statistics.median(get(r) for r in results[variant])

    what = {"login": "USER/PASS + QUIT", "stat": "USER/PASS + STAT + QUIT",
            "download": "USER/PASS + UIDL + RETR of 20 x 3,700 B + QUIT"}[args.scenario]
    lines = [
        f"connect + {what}, {args.connections} connections over {min(args.procs, args.connections)} client "
        f"process(es), {args.duration:g} s per run, median of {args.rounds} round(s); "
        f"load average before: {load_before:.1f}",
        "",
        "| path | sessions/s | backend CPU per session | proxy CPU per session | session p50 | session p99 |",
        "|---|---|---|---|---|---|",
    ]
    for v in results:
        rate = med(v, lambda r: r["rates"]["sessions_per_s"])
        backend_cpu = med(v, lambda r: _per_session_ms(r, "backend"))
        proxy_cpu = med(v, lambda r: _per_session_ms(r, "proxy"))
        p50 = med(v, lambda r: (r["latency_us"].get("session") or {}).get("p50", 0)) / 1000
        p99 = med(v, lambda r: (r["latency_us"].get("session") or {}).get("p99", 0)) / 1000
        lines.append(f"| {v} | {rate:,.0f} | {backend_cpu:.2f} ms | "
                     f"{'-' if v == 'direct' else f'{proxy_cpu:.2f} ms'} | {p50:.1f} ms | {p99:.1f} ms |")
    for note in notes or []:
        lines += ["", note]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
