#!/usr/bin/env python3
"""Login rate with each user database, auth cache cold and warm, beside the passwd-file.

    sudo python3 benchmarks/userdb_login.py                  # ~2 minutes
    sudo python3 benchmarks/userdb_login.py --markdown userdb.md --only passwd-file,postgresql

Generates one set of Maildirs (200 users x 20 messages), puts the same users
({PLAIN} passwords, as the bench's passwd-file has them) in a passwd-file,
an SQLite file, PostgreSQL, MariaDB and OpenLDAP (the servers started as the
tests start them, tests/support/userdb_servers.py: fresh directories, free loopback
ports; needs root and the Debian packages scripts/test installs), and for
each runs ``fastpop bench``'s load against a fastpop that reads them, one
after the other with the same client settings:

- passwd-file: the embedded default (in memory; no cache in front of it);
- DRIVER cold: ``[auth_cache] size = 0``, every login asks the database;
- DRIVER warm: the cache on and filled (one login per user before the run),
  every login a cache hit (still checked against the cached hash).

LDAP runs twice: fetching userPassword, and ``auth_bind`` (a bind per cold
login).  The server CPU is fastpop's own (the database's is not counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fastpop.bench import spawn
from fastpop.bench.load import LoadSpec
from fastpop.bench.runner import Target, execute

DRIVERS = ["sqlite", "postgresql", "mysql", "ldap", "ldap-bind"]
QUERY = "SELECT password FROM users WHERE userid = '%u'"


def start_databases(kinds: set[str], workdir: Path, users: list[tuple[str, str]]) -> tuple[dict, list]:
    """Each database with the users in it -> (kind -> [userdb] TOML lines), servers to close."""
    import sqlite3

    from support.userdb_servers import (
        USERS_TABLE,
        MariaDBServer,
        PostgresServer,
        SlapdServer,
        ssha,
    )

    rows = [{"userid": n, "password": "{PLAIN}" + p} for n, p in users]
    tomls: dict[str, str] = {}
    servers: list = []
    if "sqlite" in kinds:
        path = workdir / "users.sqlite"
        with sqlite3.connect(path) as conn:
            conn.execute(USERS_TABLE)
            conn.executemany("INSERT INTO users (userid, password) VALUES (?, ?)",
                             [(r["userid"], r["password"]) for r in rows])
        tomls["sqlite"] = f'driver = "sqlite"\nconnect = "{path}"\npassword_query = "{QUERY}"\n'
    for kind, cls in (("postgresql", PostgresServer), ("mysql", MariaDBServer)):
        if kind in kinds:
            why = cls.available()
            if why:
                raise SystemExit(f"{kind}: {why}")
            srv = cls()
            servers.append(srv)
            srv.add_users(rows)
            tomls[kind] = f'driver = "{kind}"\nconnect = "{srv.dsn}"\npassword_query = "{QUERY}"\n'
    if kinds & {"ldap", "ldap-bind"}:
        why = SlapdServer.available()
        if why:
            raise SystemExit(f"ldap: {why}")
        slapd = SlapdServer()
        servers.append(slapd)
        ldif = []
        for n, p in users:  # {SSHA}: slapd (bind) and fastpop (fetch) both check it, cheaply
            ldif.append(f"dn: uid={n},{slapd.PEOPLE}\nobjectClass: inetOrgPerson\nuid: {n}\ncn: {n}\nsn: {n}\n"
                        f"userPassword: {ssha(p)}\n")
        slapd.ldapadd("\n".join(ldif))
        for kind in ("ldap", "ldap-bind"):
            tomls[kind] = (f'driver = "ldap"\n[ldap]\nuri = "{slapd.uri}"\nbind_dn = "{slapd.SEARCH_DN}"\n'
                           f'bind_password = "{slapd.SEARCH_PW}"\nbase = "{slapd.PEOPLE}"\nfilter = "(uid=%u)"\n'
                           f'auth_bind = {"true" if kind == "ldap-bind" else "false"}\nattrs = []\n')
    return tomls, servers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mailboxes", type=int, default=200)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("-s", "--scenario", default="login", choices=["login", "stat"],
                   help="login: connect, USER/PASS, QUIT (default); stat: with a STAT")
    p.add_argument("-c", "--connections", type=int, default=16)
    p.add_argument("-p", "--procs", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    p.add_argument("-w", "--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="run every variant this many times; medians are shown")
    p.add_argument("--only", help="comma-separated: passwd-file and/or drivers (default all)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    args = p.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else {"passwd-file", *DRIVERS}

    from rich.console import Console

    console = Console(highlight=False)
    workdir = spawn.make_workdir("fastpop-userdb-bench-")
    os.chmod(workdir, 0o755)
    seeded = spawn.seed(workdir, spawn.SeedSpec(args.mailboxes, args.messages))
    mailboxes = {"users": args.mailboxes, "messages": args.messages, "size": "3700 B", "large_users": 0,
                 "large_size": 0}
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {}
    servers: list = []
    try:
        tomls, servers = start_databases(wanted & set(DRIVERS), workdir, seeded.users)
        variants: list[tuple[str, str | None, int]] = []  # (label, driver TOML, cache size)

        def spec(port: int, **kw) -> LoadSpec:
            base = dict(host="127.0.0.1", port=port, scenario=args.scenario, users=seeded.users,
                        connections=args.connections, procs=min(args.procs, args.connections),
                        duration=args.duration, warmup=args.warmup)
            base.update(kw)
            return LoadSpec(**base)

        if "passwd-file" in wanted:
            variants.append(("passwd-file", None, 0))
        for kind in DRIVERS:
            if kind in tomls:
                variants += [(f"{kind} cold", tomls[kind], 0), (f"{kind} warm", tomls[kind], 100000)]
        for r in range(args.rounds):
            for label, driver, cache in variants:
                extra = []
                if driver is not None:
                    conf = workdir / f"{label.replace(' ', '-')}.toml"
                    conf.write_text(f"[auth_cache]\nsize = {cache}\nttl = 3600\nnegative_ttl = 3600\n"
                                    f"[userdb]\n{driver}")
                    extra = ["--config", str(conf)]
                server = spawn.SpawnedServer(seeded, extra_args=extra)
                server.log_path = workdir / f"fastpop-{label.replace(' ', '-')}-{r}.log"  # one log per server
                server.start()
                try:
                    target = Target("127.0.0.1", server.port, server.describe(), spawned=True, pid=server.pid)
                    # one session per mailbox: indexes built, and for "warm" every user cached
                    execute(spec(server.port, sessions=len(seeded.users), duration=None, warmup=0.0, connections=4,
                                 procs=1),
                            target, mailboxes, quiet=True, console=console, header=False)
                    console.rule(label + (f" (round {r + 1})" if args.rounds > 1 else ""))
                    res = execute(spec(server.port), target, mailboxes, quiet=True, console=console, header=False)
                finally:
                    server.stop()
                if res["errors"]["total"]:
                    console.print(f"[red]{res['errors']}[/red]\n" + server.log()[-1500:])
                cpu = (res["server"] or {}).get("cpu_s_per_1000_sessions")
                console.print(f"{res['rates']['sessions_per_s']:,.1f} sessions/s, fastpop {cpu} CPU ms/session, "
                              f"errors {res['errors']['total']}")
                results.setdefault(label, []).append(res)
    finally:
        for srv in servers:
            srv.close()
        spawn.remove_workdir(workdir)

    md = table(results, args, load_before)
    print()
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 1 if sum(r["errors"]["total"] for runs in results.values() for r in runs) else 0


def _median(runs: list[dict], get) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def table(results: dict[str, list[dict]], args, load_before: float) -> str:
    rate = {v: _median(runs, lambda r: r["rates"]["sessions_per_s"]) for v, runs in results.items()}
    cpu = {v: _median(runs, lambda r: (r["server"] or {}).get("cpu_s_per_1000_sessions")) for v,
           runs in results.items()}
    p50 = {v: _median(runs, lambda r: (r["latency_us"].get("session") or {}).get("p50")) for v, runs in results.items()}
    base = rate.get("passwd-file")
    lines = [
        f"scenario {args.scenario} (connect, USER/PASS{', STAT' if args.scenario == 'stat' else ''}, QUIT), "
        f"{args.connections} connections over {min(args.procs, args.connections)} client processes, "
        f"{args.duration:g} s per run, median of {args.rounds} round(s); load average before: {load_before:.1f}",
        "",
        "| user database | sessions/s | vs passwd-file | fastpop CPU per session | session p50 |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in results:
        ratio = f"{rate[v] / base:.2f}x" if base else "-"
        c = f"{cpu[v]:.2f} ms" if cpu.get(v) is not None else "-"
        lat = f"{p50[v] / 1000:.1f} ms" if p50.get(v) else "-"
        lines.append(f"| {v} | {rate[v]:,.0f} | {ratio} | {c} | {lat} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
