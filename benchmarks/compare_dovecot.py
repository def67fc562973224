#!/usr/bin/env python3
"""fastpop against Dovecot, side by side, on the same mailboxes, in one run.

    sudo python3 benchmarks/compare_dovecot.py                 # ~1 minute
    python3 benchmarks/compare_dovecot.py --duration 10 --markdown table.md --json-dir runs/

Generates one set of Maildirs (200 users x 20 messages of 3,700 B by
default) and starts, all on 127.0.0.1:
- fastpop (``python -m fastpop serve``),
- Dovecot (Debian's dovecot-pop3d) from fastpop/bench/dovecot.conf.in:
  passwd-file, Maildir, its high-performance process settings,
- the trivial canned responder (``fastpop bench trivial-server``, its
  compiled engine), which shows what the load generator itself can do on
  this machine, and the floor of what a POP3 session costs the kernel;
- with ``--uvloop-floor``, the same responder as a Python protocol on uvloop
  (``--engine asyncio --loop uvloop``): what any uvloop server pays before it
  does any work of its own, fastpop's floor;
- with ``--login-floor``, that responder also making the system calls a safe
  Maildir login makes (``--maildirs``: lstat of the Maildir, lock, stats of
  new/, cur/ and the index, unlock, a log line): the floor under fastpop's
  login on uvloop, with no logic of its own.
With ``--rate``, every server is offered the same load (an open loop at so many
sessions per second) instead of each being driven as fast as it answers: a
server's CPU per session depends on how busy it is (a busy event loop answers
several connections per wakeup, and a busy client is not woken by every reply),
so a saturated fast responder and a half-loaded server are not at the same
point.  Both views are worth reading; benchmarks/README.md shows both.
Every server gets a warm-up pass over all mailboxes, then each scenario
runs against each server back to back with the same client settings, and
the table gives both with the ratios.  Server CPU is summed over each
server's whole process tree (Dovecot's master and all its children).
Needs root (Dovecot) and exits 2 with the reason when it cannot run.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from fastpop.bench import dovecot, spawn
from fastpop.bench.load import LoadSpec
from fastpop.bench.runner import Target, execute

SCENARIO_NAMES = {"login": "login + QUIT", "stat": "login + STAT", "download": "full download (UIDL + every RETR)",
                  "download-delete": "download + DELE (re-seeded)", "mixed": "mixed"}


def start_trivial(messages: int, size: str, engine: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpop", "bench", "trivial-server", "--messages", str(messages), "--message-size",
         size, *(engine or [])],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    line = proc.stderr.readline()
    m = re.search(r":(\d+) \(pid", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"trivial server did not start: {line}")
    return proc, int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="stat,download", help="comma-separated (default stat,download)")
    p.add_argument("--mailboxes", type=int, default=200)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("--message-size", default="3700")
    p.add_argument("-c", "--connections", type=int, default=64,
                   help="closed loop: concurrent sessions per server (default 64: with fewer the generator waits "
                        "on round trips and wakes per reply, and its CPU per session rises; see benchmarks/README.md)")
    p.add_argument("-p", "--procs", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("-d", "--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    p.add_argument("-w", "--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times; medians are shown")
    p.add_argument("--rate", metavar="R|SCENARIO=R,...",
                   help="matched load: an open loop at R sessions/s for every server (per scenario with "
                        "stat=4000,download=1200) instead of each server's own saturation; a server that cannot "
                        "keep up is marked in the table")
    p.add_argument("--no-dovecot", action="store_true",
                   help="leave Dovecot out (e.g. at a --rate above what it sustains on this machine)")
    p.add_argument("--no-trivial", action="store_true", help="skip the generator-ceiling runs")
    p.add_argument("--uvloop-floor", action="store_true",
                   help="also run the trivial responder as a Python protocol on uvloop (fastpop's floor)")
    p.add_argument("--login-floor", action="store_true",
                   help="also run that responder making a safe login's system calls on the same Maildirs "
                        "(trivial-server --maildirs): the floor under fastpop's login on uvloop")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--json-dir", metavar="DIR", help="write every run's full result here")
    p.add_argument("--keep", action="store_true", help="keep the generated directory")
    p.add_argument("--fastpop-workers", type=int, default=len(os.sched_getaffinity(0)), metavar="N",
                   help="run fastpop with --workers N (default: the usable CPUs, as `fastpop serve` does; "
                        "Dovecot too runs a process per core and more)")
    p.add_argument("--baseline", metavar="CHECKOUT",
                   help="also run the fastpop of this checkout (e.g. `git worktree add /tmp/base REV` and "
                        "`python3 setup.py build_ext --inplace` there), same settings, for before/after ratios")
    p.add_argument("--from-json-dir", metavar="DIR", help="print the table of runs saved with --json-dir, run nothing")
    args = p.parse_args(argv)
    try:
        args.rates = parse_rates(args.rate)
    except ValueError as exc:
        p.error(f"--rate: {exc}")
    if args.from_json_dir:
        return render_saved(args)

    reason = None if args.no_dovecot else dovecot.unavailable()
    if reason:
        print(f"compare_dovecot: {reason}", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console(highlight=False)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    workdir = spawn.make_workdir("fastpop-vs-dovecot-")
    size = spawn.SizeDistribution.parse(args.message_size)
    console.print(f"[dim]seeding {args.mailboxes} mailboxes x {args.messages} messages of {size} in {workdir}[/dim]")
    seeded = spawn.seed(workdir, spawn.SeedSpec(args.mailboxes, args.messages, size))
    mailboxes = {"users": args.mailboxes, "messages": args.messages, "size": str(size), "large_users": 0,
                 "large_size": 0}
    servers: dict[str, Target] = {}
    fast = dove = trivial = floor = login_floor = base = None
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        if not args.no_dovecot:
            dove = dovecot.DovecotServer(seeded)
            dove.start()  # (chowns the Maildirs to its mail user)
            servers["Dovecot"] = Target("127.0.0.1", dove.port, dove.describe(), pid=dove.pid)
        elif os.geteuid() == 0:
            dovecot.chown_tree(seeded.mailroot, *dovecot.ensure_mail_user())
        # as Dovecot's mail processes: the mail user (its start chowned the Maildirs to it),
        # the deployment docs/security.md recommends, rather than root
        fast_args = ["--workers", str(args.fastpop_workers)]
        if os.geteuid() == 0:
            fast_args += ["--user", dovecot.MAIL_USER]
        fast = spawn.SpawnedServer(seeded, extra_args=fast_args)
        fast.start()
        servers["fastpop"] = Target("127.0.0.1", fast.port, fast.describe(), spawned=True, pid=fast.pid)
        if args.baseline:
            base = spawn.SpawnedServer(seeded, extra_args=fast_args,
                                       package_root=os.path.abspath(args.baseline), name="baseline")
            base.start()
            servers["baseline"] = Target("127.0.0.1", base.port, f"baseline {base.describe()}", spawned=True,
                                         pid=base.pid)
        if not args.no_trivial:
            trivial, tport = start_trivial(args.messages, args.message_size)
            servers["trivial"] = Target("127.0.0.1", tport, "trivial canned responder", pid=trivial.pid)
        if args.uvloop_floor:
            floor, fport = start_trivial(args.messages, args.message_size, ["--engine", "asyncio", "--loop", "uvloop"])
            servers["uvloop"] = Target("127.0.0.1", fport, "trivial responder on uvloop", pid=floor.pid)
        if args.login_floor:
            os.makedirs(os.path.join(workdir, "login-floor"))
            login_floor, lport = start_trivial(
                args.messages, args.message_size,
                ["--engine", "asyncio", "--loop", "uvloop", "--maildirs", seeded.mailroot,
                 "--state-dir", os.path.join(workdir, "login-floor")])
            servers["login-floor"] = Target("127.0.0.1", lport, "trivial responder on uvloop with a login's "
                                            "system calls", pid=login_floor.pid)

        def spec(target: Target, scenario: str, **kw) -> LoadSpec:
            base = dict(host=target.host, port=target.port, scenario=scenario, users=seeded.users,
                        connections=args.connections, procs=min(args.procs, args.connections),
                        duration=args.duration, warmup=args.warmup,
                        reseed=seeded.mail_location if scenario == "download-delete" else None, reseed_size=size)
            rate = args.rates.get(scenario, args.rates.get(""))
            if rate is not None:
                base["rate"] = rate
            base.update(kw)
            return LoadSpec(**base)

        for name, target in servers.items():
            console.print(f"[dim]warming up {name}: one session per mailbox[/dim]")
            warm = execute(spec(target, "stat", sessions=len(seeded.users), duration=None, warmup=0.0), target,
                           mailboxes, quiet=True, console=console, header=False)
            if not warm["ok"]:
                console.print(f"[red]warm-up of {name} had errors: {warm['errors']['by_kind']}[/red]")
        order = list(servers)
        for r in range(args.rounds):
            for scenario in scenarios:
                for name in (order if r % 2 == 0 else order[::-1]):
                    target = servers[name]
                    console.rule(f"{scenario} against {name}" + (f" (round {r + 1})" if args.rounds > 1 else ""))
                    res = execute(spec(target, scenario), target, mailboxes, quiet=True, console=console, header=False)
                    console.print(f"{res['rates']['sessions_per_s']:,.1f} sessions/s, server "
                                  f"{(res['server'] or {}).get('cpu_s_per_1000_sessions')} CPU s/1,000 sessions, "
                                  f"errors {res['errors']['total']}")
                    results.setdefault((scenario, name), []).append(res)
                    if args.json_dir:
                        os.makedirs(args.json_dir, exist_ok=True)
                        from fastpop.bench.report import write_json

                        write_json(res, os.path.join(args.json_dir, f"{scenario}-{name}-{r + 1}.json"))
    finally:
        for server in (fast, dove, base):
            if server is not None:
                server.stop()
        for proc in (trivial, floor, login_floor):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if args.keep:
            console.print(f"[dim]kept {workdir}[/dim]")
        else:
            spawn.remove_workdir(workdir)

    md = markdown_table(results, scenarios, args, dove.version if dove else "?")
    print()
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    errors = sum(r["errors"]["total"] for runs in results.values() for r in runs)
    if errors:
        console.print(f"[bold red]{errors} errors during the comparison: see the runs above[/bold red]")
        return 1
    return 0


def render_saved(args) -> int:
    """The table from the results of an earlier run (--json-dir)."""
    from fastpop.bench.report import load_json

    results: dict[tuple[str, str], list[dict]] = {}
    scenarios: list[str] = []
    version = "?"
    for path in sorted(Path(args.from_json_dir).glob("*.json")):
        m = re.fullmatch(r"(.+)-(Dovecot|fastpop|trivial|uvloop|login-floor|baseline)-(\d+)\.json", path.name)
        if not m:
            continue
        r = load_json(str(path))
        results.setdefault((m.group(1), m.group(2)), []).append(r)
        if m.group(1) not in scenarios:
            scenarios.append(m.group(1))
        if m.group(2) == "Dovecot":
            version = r["target"]["server"].split()[1]
    if not results:
        print(f"compare_dovecot: no saved runs in {args.from_json_dir}", file=sys.stderr)
        return 2
    first = next(iter(results.values()))[0]
    args.connections = first["load"]["connections"]
    args.procs = first["load"]["procs"]
    args.duration = first["load"]["duration"]
    args.warmup = first["load"]["warmup"]
    args.rounds = max(len(v) for v in results.values())
    args.rates = {s: runs[0]["load"]["rate"] for (s, _), runs in results.items() if runs[0]["load"].get("rate")}
    mb = first.get("mailboxes") or {}
    args.mailboxes, args.messages = mb.get("users", "?"), mb.get("messages", "?")
    args.message_size = mb.get("size", "?").replace(" B", "")
    order = [s for s in SCENARIO_NAMES if s in scenarios] + [s for s in scenarios if s not in SCENARIO_NAMES]
    md = markdown_table(results, order, args, version)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


def parse_rates(text: str | None) -> dict[str, float]:
    """``--rate``: "4000" (every scenario, key "") or "stat=4000,download=1200"."""
    rates: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in (text or "").split(","))):
        scenario, _, value = part.rpartition("=")
        try:
            rates[scenario.strip()] = float(value)
        except ValueError:
            raise ValueError(f"not a rate: {part!r}") from None
        if not rates[scenario.strip()] > 0:
            raise ValueError(f"a rate must be above 0: {part!r}")
    return rates


def _median(runs: list[dict], get) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def markdown_table(results, scenarios, args, dovecot_version: str) -> str:
    def rate(s, n):
        return _median(results.get((s, n), []), lambda r: r["rates"]["sessions_per_s"])

    def cpu(s, n):  # ms of server CPU per session
        return _median(results.get((s, n), []), lambda r: (r["server"] or {}).get("cpu_s_per_1000_sessions"))

    def p99(s, n):
        return _median(results.get((s, n), []), lambda r: r["latency_us"].get("session", {}).get("p99", 0) / 1000)

    def rss(s, n):
        return _median(results.get((s, n), []), lambda r: (r["server"] or {}).get("peak_rss_bytes", 0) / 1024**2)

    def f(x, d=0):
        return "-" if x is None else f"{x:,.{d}f}"

    def ratio(a, b):
        return "-" if not a or b is None else f"{b / a:.2f}x"

    lines = [
        f"| scenario | measure | Dovecot {dovecot_version} | fastpop | fastpop / Dovecot |",
        "|---|---|---:|---:|---:|",
    ]
    for s in scenarios:
        name = SCENARIO_NAMES.get(s, s)
        rows = (("sessions/s", rate, 0), ("server CPU ms per session", cpu, 3),
                ("session p99 ms", p99, 1), ("server peak RSS MiB", rss, 1))
        for measure, get, digits in rows:
            d, fp = get(s, "Dovecot"), get(s, "fastpop")
            bold = "**" if measure in ("sessions/s", "server CPU ms per session") else ""
            lines.append(f"| {name} | {measure} | {f(d, digits)} | {f(fp, digits)} | {bold}{ratio(d, fp)}{bold} |")
    def client_cpu(s, n):  # ms of the load generator's CPU per session
        return _median(results.get((s, n), []), lambda r: (r["client"]["cpu_us_per_session"] or 0) / 1000)

    if any(n == "trivial" for _, n in results):
        lines.append("")
        lines.append("| scenario | generator against the trivial server, sessions/s | fastpop sessions/s | "
                     "generator headroom | generator CPU ms per session | fastpop CPU ms per session |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for s in scenarios:
            lines.append(f"| {SCENARIO_NAMES.get(s, s)} | {f(rate(s, 'trivial'))} | {f(rate(s, 'fastpop'))} | "
                         f"**{ratio(rate(s, 'fastpop'), rate(s, 'trivial'))}** | {f(client_cpu(s, 'trivial'), 3)} | "
                         f"{f(cpu(s, 'fastpop'), 3)} |")
    if any(n in ("trivial", "uvloop", "login-floor") for _, n in results):
        floors = any(n == "login-floor" for _, n in results)
        lines.append("")
        lines.append("| scenario | server CPU ms per session: trivial (compiled) | trivial on uvloop | "
                     + ("uvloop + a login's system calls | " if floors else "") + "fastpop | "
                     "fastpop / compiled | fastpop / uvloop |" + (" login floor / compiled |" if floors else ""))
        lines.append("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if floors else ""))
        for s in scenarios:
            t, u, lf, fp = cpu(s, "trivial"), cpu(s, "uvloop"), cpu(s, "login-floor"), cpu(s, "fastpop")
            lines.append(f"| {SCENARIO_NAMES.get(s, s)} | {f(t, 3)} | {f(u, 3)} | "
                         + (f"{f(lf, 3)} | " if floors else "") + f"{f(fp, 3)} | "
                         f"**{ratio(t, fp)}** | **{ratio(u, fp)}** |" + (f" **{ratio(t, lf)}** |" if floors else ""))
    if any(n == "baseline" for _, n in results):
        lines.append("")
        lines.append("| scenario | measure | baseline fastpop | this fastpop | this / baseline |")
        lines.append("|---|---|---:|---:|---:|")
        for s in scenarios:
            for measure, get, digits in (("sessions/s", rate, 0), ("server CPU ms per session", cpu, 3)):
                b, fp = get(s, "baseline"), get(s, "fastpop")
                lines.append(f"| {SCENARIO_NAMES.get(s, s)} | {measure} | {f(b, digits)} | {f(fp, digits)} | "
                             f"**{ratio(b, fp)}** |")
    offered = args.rates  # (main and render_saved both set it)
    short = []
    for s, n in sorted(results):
        want = offered.get(s, offered.get(""))
        got = rate(s, n)
        if want and got is not None and got < 0.97 * want:
            short.append(f"{n} {SCENARIO_NAMES.get(s, s)} ({got:,.0f} of {want:,.0f}/s)")
    if short:
        lines.append("")
        lines.append("Did not keep up with the offered rate (its CPU per session is at saturation, not at the "
                     "matched load): " + "; ".join(short) + ".")
    load = ("open loop at " + ", ".join(f"{v:,.0f} sessions/s" + (f" ({k})" if k else "") for k, v in offered.items())
            if offered else f"{args.connections} connections (closed loop)")
    lines.append("")
    lines.append(f"Same client settings for every server: {load} over "
                 f"{min(args.procs, args.connections)} uvloop processes, {args.duration:g} s measured after "
                 f"{args.warmup:g} s warm-up, {args.mailboxes} mailboxes x {args.messages} messages of "
                 f"{args.message_size} B; server CPU = utime+stime of the server's whole process tree over the "
                 f"measured window; {args.rounds} round(s), medians.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
