"""One bench run from start to end: set up (spawn or probe), load, report."""

from __future__ import annotations

import base64
import poplib
import ssl
import sys
from dataclasses import dataclass

from fastpop.bench import report
from fastpop.bench.load import LoadSpec, make_ssl_context
from fastpop.bench.load import run as run_load


class BenchError(Exception):
    """A problem with the setup, reported without a traceback (exit status 2)."""


@dataclass
class Target:
    host: str
    port: int
    server: str  # what is listening, for the header
    spawned: bool = False
    pid: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# ------------------------------------------------------------------ probe


def probe(spec: LoadSpec, user: tuple[str, str]) -> str:
    """One session by the book before the load: the server answers, offers
    what --tls/--auth need, and takes the first user's password.  Returns the
    greeting.  Any failure is a BenchError that says what to do."""
    host, port, timeout = spec.host, spec.port, min(spec.timeout, 10.0)
    pop: poplib.POP3
    try:
        if spec.tls == "implicit":
            ctx = make_ssl_context(spec.cafile)
            try:
                pop = poplib.POP3_SSL(host, port, timeout=timeout, context=ctx)
            except ssl.SSLError as exc:
                raise BenchError(f"implicit TLS to {host}:{port} failed: {exc.reason or exc}: is it a plain-text "
                                 f"POP3 port? (fastpop listens for implicit TLS only with --listen-tls)") from None
        else:
            pop = poplib.POP3(host, port, timeout=timeout)
    except (OSError, poplib.error_proto) as exc:
        if isinstance(exc, BenchError):
            raise
        raise BenchError(f"cannot connect to {host}:{port}: {exc}") from None
    try:
        greeting = pop.getwelcome().decode(errors="replace")
        if not greeting.startswith("+OK"):
            raise BenchError(f"{host}:{port} greets with {greeting!r}, not +OK: not a POP3 server?")
        try:
            capa = pop.capa()
        except poplib.error_proto:
            capa = {}
        if spec.tls == "starttls":
            if "STLS" not in capa:
                raise BenchError(f"{host}:{port} does not offer STLS (not in its CAPA list); "
                                 f"fastpop offers it once started with --tls-cert and --tls-key; else use --tls none")
            try:
                pop.stls(make_ssl_context(spec.cafile))
            except (ssl.SSLError, poplib.error_proto, OSError) as exc:
                raise BenchError(f"STLS with {host}:{port} failed: {exc}") from None
            try:
                capa = pop.capa()
            except poplib.error_proto:
                capa = {}
        name, password = user
        try:
            if spec.auth == "plain":
                mechanisms = " ".join(capa.get("SASL", [])).upper().split()
                if "PLAIN" not in mechanisms:
                    raise BenchError(f"{host}:{port} does not offer AUTH PLAIN (CAPA has no 'SASL ... PLAIN'); "
                                     f"fastpop offers it over TLS or from trusted networks; else use --auth user")
                token = base64.b64encode(b"\0" + name.encode() + b"\0" + password.encode()).decode()
                # poplib has no AUTH command: its private one-line exchange (not in its stubs)
                pop._shortcmd("AUTH PLAIN " + token)  # type: ignore[attr-defined]
            else:
                pop.user(name)
                pop.pass_(password)
        except poplib.error_proto as exc:
            said = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise BenchError(f"login as {name!r} failed: {said}") from None
        if spec.scenario not in ("login", "idle"):
            pop.stat()
        pop.quit()
        return greeting
    except (OSError, EOFError) as exc:
        raise BenchError(f"{host}:{port}: {exc}") from None
    except poplib.error_proto as exc:
        raise BenchError(f"{host}:{port}: {exc}") from None
    finally:
        try:
            pop.close()
        except Exception:
            pass


# ------------------------------------------------------------------ the run


def describe_load(spec: LoadSpec) -> str:
    if spec.scenario == "idle":
        what = f"hold {spec.connections:,} logged-in sessions"
    elif spec.rate:
        what = f"open loop at {spec.rate:g} sessions/s"
    else:
        what = f"closed loop, {spec.connections} connections"
    if spec.sessions is not None:
        length = f"{spec.sessions:,} sessions"
    elif spec.scenario == "idle":
        length = f"{spec.duration:g} s held"
    else:
        length = f"{spec.duration:g} s"
    if spec.warmup:
        length += f" after {spec.warmup:g} s warm-up"
    tls = {"none": "plain", "starttls": "STLS", "implicit": "implicit TLS"}[spec.tls]
    auth = {"user": "USER/PASS", "plain": "AUTH PLAIN"}[spec.auth]
    return f"{what}; {length}; {tls}, {auth}; timeout {spec.timeout:g} s"


def execute(spec: LoadSpec, target: Target, mailboxes: dict | None = None, quiet: bool = False,
            console=None, header: bool = True) -> dict:
    """Run the load and return the result document (report.RESULT_SCHEMA)."""
    from fastpop.bench import text
    from fastpop.bench.procstat import ServerMonitor

    console = console or text.console(stderr=False, highlight=False)
    monitor = None
    if target.pid is not None:
        try:
            monitor = ServerMonitor(target.pid)
        except ValueError as exc:
            raise BenchError(f"--server-pid: {exc}") from None
    if header:
        _print_header(console, spec, target, mailboxes)
    total = (spec.warmup + spec.duration) if spec.duration is not None else None
    live = None
    if not quiet and console.is_terminal:
        from rich.live import Live
        from rich.text import Text

        live = Live(Text("starting..."), console=console, refresh_per_second=4, transient=True)
        live.start()

        def on_tick(tick: dict) -> None:
            live.update(Text(report.progress_text(tick, total)))
    elif not quiet:
        def on_tick(tick: dict) -> None:
            console.print(report.progress_text(tick, total), highlight=False, soft_wrap=True)
    else:
        on_tick = None  # type: ignore[assignment]
    try:
        out = run_load(spec, monitor=monitor, on_tick=on_tick)
    finally:
        if live is not None:
            live.stop()
    target_info = {
        "address": target.address,
        "server": target.server,
        "spawned": target.spawned,
        "tls": spec.tls,
        "auth": spec.auth,
    }
    return report.build_result(out, target_info, mailboxes, target.pid if monitor else None)


def _print_header(console, spec: LoadSpec, target: Target, mailboxes: dict | None) -> None:
    from fastpop.bench.text import grid

    table = grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("target", target.address + ("  (spawned)" if target.spawned else ""))
    table.add_row("server",
                  target.server + (f", pid {target.pid}" if target.pid and "pid" not in target.server else ""))
    scenario = spec.scenario
    if scenario == "mixed":
        scenario += " " + ",".join(f"{k}={v:g}" for k, v in spec.mix.items())
    table.add_row("scenario", scenario)
    table.add_row("load", describe_load(spec))
    table.add_row("client", f"{spec.procs} process(es), {spec.loop}; {len(spec.users):,} users"
                  + (f" + {len(spec.large_users):,} large" if spec.large_users else "")
                  + ("; certificate not verified" if spec.tls != "none" and not spec.cafile else ""))
    if mailboxes:
        table.add_row("mailboxes", f"{mailboxes['users']:,} x {mailboxes['messages']} messages of {mailboxes['size']}"
                      + (f"; {mailboxes['large_users']} x 1 of {mailboxes['large_size']:,} B"
                         if mailboxes.get("large_users") else ""))
    console.print(table)


def print_summary(console, result: dict) -> None:
    for item in report.summary_renderables(result):
        console.print(item)


# ------------------------------------------------------------------ the command line


def run_cli(args) -> int:
    from fastpop.bench import scenarios, spawn, text
    from fastpop.net import parse_address

    # wide enough for the notes and tables when the output goes to a file or a CI log
    console = text.console(highlight=False, width=None if sys.stdout.isatty() else 120)
    spawn_mode = args.spawn or args.target is None
    if args.spawn and args.target:
        raise BenchError("give a target or --spawn, not both")
    if args.target and not args.users:
        raise BenchError("a target needs --users FILE ('name password' per line), or use --spawn")
    if args.rate is not None and args.connections is not None:
        raise BenchError("--rate (open loop) and --connections (closed loop) exclude each other")
    if args.rate is not None and args.rate <= 0:
        raise BenchError("--rate must be positive")
    if args.rate is not None and args.scenario == "idle":
        raise BenchError("idle holds --connections sessions; --rate does not apply")
    if args.sessions is not None and args.duration is not None:
        raise BenchError("--duration and --sessions exclude each other")
    if args.sessions is not None and args.scenario == "idle":
        raise BenchError("idle holds sessions for --duration; --sessions does not apply")
    if args.procs < 1 or (args.connections is not None and args.connections < 1):
        raise BenchError("--procs and --connections must be at least 1")
    if args.mix and args.scenario != "mixed":
        raise BenchError("--mix goes with --scenario mixed")
    if args.server_pid is not None and spawn_mode:
        raise BenchError("--server-pid is for an external server; with --spawn the server is measured anyway")
    connections = args.connections if args.connections is not None else 16
    duration = args.duration if args.duration is not None else (None if args.sessions is not None else 5.0)
    mix = (scenarios.parse_mix(args.mix) if args.mix
           else dict(scenarios.DEFAULT_MIX) if args.scenario == "mixed" else {})
    procs = args.procs
    if args.rate is None and procs > connections:
        procs = connections  # a process with no connection would only idle
    from fastpop.bench import capacity

    try:
        sources = capacity.parse_sources(args.source) if args.source else []
        limit = capacity.raise_descriptor_limit()  # the client processes inherit it
        if args.rate is None:  # closed loop and idle: this many open at once
            wanted = procs
            procs = capacity.procs_for(connections, procs, limit)
            if procs > wanted:
                console.print(f"[yellow]{connections:,} connections at {limit:,} descriptors per process "
                              f"(RLIMIT_NOFILE): {procs} client processes instead of {wanted}[/yellow]")
            capacity.check(connections, sources, spawn_mode)
            if spawn_mode:
                capacity.check_spawned(connections, list(getattr(args, "server_arg", None) or []), limit)
    except capacity.CapacityError as exc:
        raise BenchError(str(exc)) from None
    try:
        size = spawn.SizeDistribution.parse(args.message_size)
        large_size = spawn.parse_size(args.large_size)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    used = list(mix) if args.scenario == "mixed" else [args.scenario]

    server = None
    workdir = None
    try:
        if spawn_mode:
            if args.tls != "none":
                raise BenchError("--spawn does not give fastpop a certificate: use --tls none, or start the "
                                 "server yourself with TLS and point bench at it")
            mailboxes_n = max(args.mailboxes, connections if args.scenario == "idle" else procs)
            large_n = 0
            if "retr-large" in used:
                large_n = max(procs, connections) if args.rate is None else max(procs, 16)
            if args.workdir:
                from pathlib import Path

                workdir = Path(args.workdir)
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                workdir = spawn.make_workdir()
            spec_seed = spawn.SeedSpec(mailboxes_n, args.messages, size, large_n, large_size, args.seed)
            console.print(f"[dim]seeding {mailboxes_n:,} mailboxes x {args.messages} messages"
                          + (f" and {large_n} x {args.large_size}" if large_n else "") + f" in {workdir}[/dim]")
            seeded = spawn.seed(workdir, spec_seed)
            server = spawn.SpawnedServer(seeded, parser=args.server_parser, loop=args.server_loop,
                                         extra_args=getattr(args, "server_arg", None))
            server.start()
            target = Target("127.0.0.1", server.port, server.describe(), spawned=True, pid=server.pid)
            users, large = seeded.users, seeded.large_users
            reseed = seeded.mail_location if "download-delete" in used else None
            mailboxes = {"users": mailboxes_n, "messages": args.messages, "size": str(size),
                         "large_users": large_n, "large_size": large_size if large_n else 0}
        else:
            try:
                host, port = parse_address(args.target)
            except ValueError as exc:
                raise BenchError(str(exc)) from None
            try:
                users = spawn.read_users(args.users)
            except (OSError, ValueError) as exc:
                raise BenchError(str(exc)) from None
            large = []
            reseed = args.reseed
            if "download-delete" in used and not reseed:
                console.print("[yellow]download-delete without --reseed: mailboxes empty as the run goes on[/yellow]")
            target = Target(host, port, "?", pid=args.server_pid)
            mailboxes = None
        spec = LoadSpec(
            host=target.host, port=target.port, scenario=args.scenario, mix=mix, users=users, large_users=large,
            tls=args.tls, cafile=args.cafile, server_hostname=args.server_name, auth=args.auth,
            connections=connections, rate=args.rate, duration=duration, sessions=args.sessions,
            warmup=args.warmup, procs=procs, timeout=args.timeout, loop=args.loop, reseed=reseed,
            reseed_size=size, seed=args.seed, idle_noop=args.idle_noop, sources=sources,
        )
        if args.scenario == "idle" and len(users) < connections:
            raise BenchError(f"idle needs a mailbox per held session: {len(users)} users for {connections} connections")
        if args.rate is None and args.scenario != "idle" and len(users) < connections:
            console.print(f"[yellow]{len(users)} users for {connections} connections: connections wait for a free "
                          f"mailbox (no two sessions share one)[/yellow]")
        greeting = probe(spec, (large or users)[0] if args.scenario == "retr-large" else users[0])
        if not spawn_mode:
            target.server = greeting[4:].strip()[:60] or "?"
        result = execute(spec, target, mailboxes, quiet=args.quiet, console=console)
    finally:
        if server is not None:
            rc = server.stop()
            log = server.log()
            if "Traceback" in log:
                console.print("[bold red]the spawned fastpop logged a traceback:[/bold red]")
                console.print(log[log.index("Traceback"):][:3000], markup=False)
            elif rc not in (0, None):
                console.print(f"[bold red]the spawned fastpop exited with status {rc}[/bold red]")
        if workdir is not None and not args.keep and not args.workdir:
            spawn.remove_workdir(workdir)
        elif workdir is not None and args.keep:
            console.print(f"[dim]kept {workdir}[/dim]")
    print_summary(console, result)
    if args.json:
        report.write_json(result, args.json)
        console.print(f"[dim]result written to {args.json}[/dim]")
    if args.plot:
        try:
            report.plot(result, args.plot)
            console.print(f"[dim]plot written to {args.plot}[/dim]")
        except RuntimeError as exc:
            print(f"fastpop bench: {exc}", file=sys.stderr)
            return 2
    return 0 if result["ok"] else 1
