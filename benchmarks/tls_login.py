#!/usr/bin/env python3
"""TLS handshake + login sessions per second, against the same without TLS, in one run.

    python3 benchmarks/tls_login.py                       # ~1 minute
    python3 benchmarks/tls_login.py --rounds 3 --markdown tls.md --json-dir runs/

Generates one set of Maildirs (200 users x 20 messages of 3,700 B), starts
one fastpop on 127.0.0.1 with a plain listener (STLS offered) and an
implicit-TLS listener, with a self-signed P-256 certificate (openssl), and
runs ``fastpop bench``'s load (the ``stat`` scenario: connect, TLS, USER/PASS,
STAT, QUIT; every session a new TCP connection and a full handshake) against
it three ways, back to back with the same client settings:

- plain: no TLS,
- implicit TLS (RFC 8314, the pop3s port),
- STLS (RFC 2595: greeting, STLS, handshake, then the login),

alternating the order between rounds, and prints medians of sessions/s and
of the server's CPU per session (its whole process, user + system), with the
ratios to plain.  The clients verify the certificate.  No session resumption:
each is a new client, as most mail clients are.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

from fastpop.bench import spawn
from fastpop.bench.load import LoadSpec
from fastpop.bench.runner import Target, execute

VARIANTS = {"plain": "none", "implicit TLS": "implicit", "STLS": "starttls"}


def make_certificate(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl"):
        from fastpop.bench.dovecot import make_certificate as openssl_cert

        return openssl_cert(directory)
    import trustme  # the test extra has it

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mailboxes", type=int, default=200)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("--auth", choices=["user", "plain"], default="user", help="USER/PASS or AUTH PLAIN (default user)")
    p.add_argument("-c", "--connections", type=int, default=16)
    p.add_argument("-p", "--procs", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("-d", "--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    p.add_argument("-w", "--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="alternate the variants this many times; medians are shown")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--json-dir", metavar="DIR", help="write every run's full result here")
    args = p.parse_args(argv)

    from rich.console import Console

    console = Console(highlight=False)
    workdir = spawn.make_workdir("fastpop-tls-bench-")
    seeded = spawn.seed(workdir, spawn.SeedSpec(args.mailboxes, args.messages))
    cert, key = make_certificate(workdir)
    mailboxes = {"users": args.mailboxes, "messages": args.messages, "size": "3700 B", "large_users": 0,
                 "large_size": 0}
    server = spawn.SpawnedServer(seeded, extra_args=["--tls-cert", str(cert), "--tls-key", str(key),
                                                     "--listen-tls", "127.0.0.1:0"])
    results: dict[str, list[dict]] = {}
    load_before = os.getloadavg()[0]
    try:
        server.start()
        m = re.search(r"TLS listening on 127\.0\.0\.1:(\d+)", server.log())
        if not m:
            raise RuntimeError("fastpop did not open its implicit-TLS listener:\n" + server.log()[-2000:])
        ports = {"plain": server.port, "implicit TLS": int(m.group(1)), "STLS": server.port}

        def spec(variant: str, **kw) -> LoadSpec:
            base = dict(host="127.0.0.1", port=ports[variant], scenario="stat", users=seeded.users,
                        tls=VARIANTS[variant], cafile=str(cert), auth=args.auth,
                        connections=args.connections, procs=min(args.procs, args.connections),
                        duration=args.duration, warmup=args.warmup)
            base.update(kw)
            return LoadSpec(**base)

        def target(variant: str) -> Target:
            return Target("127.0.0.1", ports[variant], server.describe(), spawned=True, pid=server.pid)

        console.print("[dim]warming up: one session per mailbox[/dim]")
        execute(spec("plain", sessions=len(seeded.users), duration=None, warmup=0.0), target("plain"), mailboxes,
                quiet=True, console=console, header=False)
        order = list(VARIANTS)
        for r in range(args.rounds):
            for variant in (order if r % 2 == 0 else order[::-1]):
                console.rule(f"{variant}" + (f" (round {r + 1})" if args.rounds > 1 else ""))
                res = execute(spec(variant), target(variant), mailboxes, quiet=True, console=console, header=False)
                cpu = (res["server"] or {}).get("cpu_s_per_1000_sessions")
                console.print(f"{res['rates']['sessions_per_s']:,.1f} sessions/s, server {cpu} CPU ms/session, "
                              f"errors {res['errors']['total']}")
                results.setdefault(variant, []).append(res)
                if args.json_dir:
                    from fastpop.bench.report import write_json

                    os.makedirs(args.json_dir, exist_ok=True)
                    write_json(res, os.path.join(args.json_dir, f"{variant.replace(' ', '-')}-{r + 1}.json"))
    finally:
        server.stop()
        spawn.remove_workdir(workdir)

    md = table(results, args, load_before)
    print()
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    errors = sum(r["errors"]["total"] for runs in results.values() for r in runs)
    return 1 if errors else 0


def _median(runs: list[dict], get) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def table(results: dict[str, list[dict]], args, load_before: float) -> str:
    rate = {v: _median(runs, lambda r: r["rates"]["sessions_per_s"]) for v, runs in results.items()}
    cpu = {v: _median(runs, lambda r: (r["server"] or {}).get("cpu_s_per_1000_sessions")) for v,
           runs in results.items()}
    p50 = {v: _median(runs, lambda r: (r["latency_us"].get("session") or {}).get("p50")) for v, runs in results.items()}
    lines = [
        f"connect (+ TLS) + {'USER/PASS' if args.auth == 'user' else 'AUTH PLAIN'} + STAT + QUIT, "
        f"{args.connections} connections over {min(args.procs, args.connections)} client processes, "
        f"{args.duration:g} s per run, median of {args.rounds} round(s); load average before: {load_before:.1f}",
        "",
        "| variant | sessions/s | vs plain | server CPU per session | vs plain | session p50 |",
        "|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        if v not in results:
            continue
        ratio = f"{rate[v] / rate['plain']:.2f}x" if rate.get("plain") else "-"
        cpu_ratio = f"{cpu[v] / cpu['plain']:.2f}x" if cpu.get(v) and cpu.get("plain") else "-"
        lines.append(f"| {v} | {rate[v]:,.0f} | {ratio} | {cpu[v]:.2f} ms | {cpu_ratio} | "
                     f"{p50[v] / 1000:.1f} ms |" if p50.get(v) else
                     f"| {v} | {rate[v]:,.0f} | {ratio} | {cpu[v]:.2f} ms | {cpu_ratio} | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
