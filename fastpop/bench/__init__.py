"""``fastpop bench``: a POP3 load generator for any server.

    fastpop bench                                  # = --spawn: a local fastpop on generated mailboxes
    fastpop bench --spawn -s download -c 32 -d 10 --json run.json --plot run.png
    fastpop bench 127.0.0.1:110 --users users.txt -s mixed --rate 500
    fastpop bench compare a.json b.json
    fastpop bench seed DIR                         # mailboxes, passwd-file and users file for another server
    fastpop bench trivial-server                   # a canned responder: the generator's own ceiling
    fastpop bench -s idle -c 30000 --source 127.0.0.2-127.0.0.9   # hold many sessions

Modules: ``client`` (the POP3 client protocol), ``scenarios``, ``load``
(closed/open loop, client processes), ``report`` (HdrHistogram summaries,
JSON, compare, plot), ``spawn`` (mailboxes, a local fastpop), ``dovecot``
(a local Dovecot for comparisons), ``procstat`` (server CPU and memory),
``trivial`` (the canned responder), ``capacity`` (connections over client
processes and source addresses, and the limits in the way), ``text`` (rich
or plain-text output).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2

_VERBS = ("compare", "seed", "trivial-server")


def add_subcommand(subparsers) -> None:
    # bench has verbs (compare, seed) and a positional target, which argparse
    # cannot mix: the top-level parser hands everything after "bench" over
    # as-is ("+" is a prefix nobody types), and main() parses it.
    p = subparsers.add_parser(
        "bench", help="load-test a POP3 server (fastpop bench --help)", add_help=False, prefix_chars="+",
        description="Load-test a POP3 server; see fastpop bench --help.",
    )
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=lambda args: main(args.argv))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    from fastpop.bench.scenarios import SCENARIOS

    p = argparse.ArgumentParser(
        prog="fastpop bench",
        description=(
            "Load-test a POP3 server. With no target (or --spawn) it starts a local fastpop on "
            "generated mailboxes, runs the load and cleans up. Every RETR is checked against the "
            "checksum the seeding wrote into the message; any error makes the exit status 1."
        ),
        epilog=(
            "other commands: 'fastpop bench compare A.json B.json' prints runs side by side; "
            "'fastpop bench seed DIR' writes mailboxes, a passwd-file and a users file for another "
            "server; 'fastpop bench trivial-server' runs a canned responder."
        ),
    )
    p.add_argument("target", nargs="?", metavar="HOST:PORT", help="the server to load (needs --users)")
    p.add_argument("--users", metavar="FILE", help="'name password' per line")
    p.add_argument("--spawn", action="store_true",
                   help="start a local fastpop with generated mailboxes (the default without a target)")
    g = p.add_argument_group("what each session does")
    g.add_argument("-s", "--scenario", choices=SCENARIOS, default="stat",
                   help="login | stat (login+STAT) | download (UIDL, RETR all) | download-delete | retr-large | idle"
                        " | mixed (default stat)")
    g.add_argument("--mix",
                   help="mixed: weights, e.g. login=1,stat=5,download=4 (default login=10,stat=50,download=40)")
    g.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    g.add_argument("--cafile", help="verify the server certificate with these CAs (default: not verified)")
    g.add_argument("--server-name", help="TLS server name (default: the target host)")
    g.add_argument("--auth", choices=["user", "plain"], default="user", help="USER/PASS or AUTH PLAIN (default user)")
    g = p.add_argument_group("load")
    g.add_argument("-c", "--connections", type=int,
                   help="closed loop: concurrent sessions (default 16); idle: sessions to hold")
    g.add_argument("-r", "--rate", type=float, metavar="R", help="open loop: start R sessions per second")
    g.add_argument("-d", "--duration", type=float, metavar="S", help="seconds of measured load (default 5)")
    g.add_argument("-n", "--sessions", type=int, metavar="N", help="run N measured sessions instead of a duration")
    g.add_argument("-w", "--warmup", type=float, default=1.0, metavar="S",
                   help="seconds of unmeasured load first (default 1)")
    g.add_argument("-p", "--procs", type=int, default=_cpus(),
                   help=f"client processes (default {_cpus()}: the usable cores)")
    g.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="a reply slower than this is an error (default 10)")
    g.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the clients' event loop")
    g.add_argument("--source", metavar="ADDRS",
                   help="connect from these addresses in turn, e.g. 127.0.0.2-127.0.0.9 (a range, or a comma list): "
                        "each gives its own ephemeral ports (net.ipv4.ip_local_port_range) toward the server")
    g.add_argument("--idle-noop", type=float, default=0.0, metavar="S",
                   help="idle: each held session sends NOOP every S seconds")
    g.add_argument("--reseed", metavar="TEMPLATE",
                   help="download-delete on an external server: Maildir path with %%u to put deleted mail back")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="write the whole result")
    g.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency over the run (needs matplotlib)")
    g.add_argument("--server-pid", type=int,
                   help="the server's PID: report its CPU per session and memory (summed over its process tree)")
    g.add_argument("-q", "--quiet", action="store_true", help="no live progress line")
    g = p.add_argument_group("--spawn: the generated mailboxes and the local fastpop")
    g.add_argument("--mailboxes", type=int, default=200, help="users (default 200; idle: at least --connections)")
    g.add_argument("--messages", type=int, default=20, help="messages per mailbox (default 20)")
    g.add_argument("--message-size", default="3700", metavar="SIZE",
                   help="N, A-B (uniform) or lognormal:MEDIAN[:SIGMA], with k/M suffixes (default 3700)")
    g.add_argument("--large-size", default="10M", metavar="SIZE",
                   help="retr-large: the one message of each large mailbox (default 10M)")
    g.add_argument("--seed", type=int, default=1, help="random seed of the generated mail")
    g.add_argument("--server-parser", choices=["cython", "python"], default="cython")
    g.add_argument("--server-loop", choices=["uvloop", "asyncio"], default="uvloop")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for the spawned fastpop serve (repeatable), "
                        "e.g. --server-arg=--metrics-listen=127.0.0.1:0")
    g.add_argument("--workdir", help="where to generate (default: a temporary directory, removed after)")
    g.add_argument("--keep", action="store_true", help="keep the generated directory")
    return p


def _need_deps() -> str | None:
    """hdrhistogram is a dependency of fastpop (rich, the extra, only prettier)."""
    try:
        __import__("hdrh")
    except ImportError:
        return "fastpop bench needs hdrhistogram, a dependency of fastpop: pip install hdrhistogram"
    return None


def main(argv: list[str]) -> int:
    if argv and argv[0] in _VERBS:
        verb, rest = argv[0], argv[1:]
        if verb == "trivial-server":
            from fastpop.bench import trivial

            tp = argparse.ArgumentParser(prog="fastpop bench trivial-server",
                                         description=trivial.__doc__.splitlines()[0])
            trivial.add_arguments(tp)
            return trivial.main(tp.parse_args(rest))
        problem = _need_deps() if verb == "compare" else None
        if problem:
            print(f"fastpop: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if verb == "compare":
            return _compare(rest)
        return _seed(rest)
    args = build_parser().parse_args(argv)
    problem = _need_deps()
    if problem:
        print(f"fastpop: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from fastpop.bench.runner import BenchError, run_cli

    try:
        return run_cli(args)
    except BenchError as exc:
        print(f"fastpop bench: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _compare(argv: list[str]) -> int:
    from fastpop.bench import report, text

    p = argparse.ArgumentParser(prog="fastpop bench compare",
                                description="Print bench results side by side (ratios: second / first).")
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument("--names", help="column names, comma-separated (default: the file names)")
    args = p.parse_args(argv)
    try:
        results = [report.load_json(path) for path in args.results]
    except (OSError, ValueError) as exc:
        print(f"fastpop bench compare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    names = args.names.split(",") if args.names else [os.path.basename(x) for x in args.results]
    if len(names) != len(results):
        print("fastpop bench compare: --names needs one name per result", file=sys.stderr)
        return EXIT_USAGE
    text.console().print(report.compare_table(results, names))
    return EXIT_OK


def _seed(argv: list[str]) -> int:
    from fastpop.bench import spawn

    p = argparse.ArgumentParser(prog="fastpop bench seed",
                                description="Write Maildirs, a passwd-file ({PLAIN}) and a users file for bench.")
    p.add_argument("directory")
    p.add_argument("--mailboxes", type=int, default=200)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("--message-size", default="3700")
    p.add_argument("--large-mailboxes", type=int, default=0)
    p.add_argument("--large-size", default="10M")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    try:
        spec = spawn.SeedSpec(args.mailboxes, args.messages, spawn.SizeDistribution.parse(args.message_size),
                              args.large_mailboxes, spawn.parse_size(args.large_size), args.seed)
    except ValueError as exc:
        print(f"fastpop bench seed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seeded = spawn.seed(args.directory, spec)
    print(f"{len(seeded.users) + len(seeded.large_users)} mailboxes in {seeded.mailroot}/<user> (Maildir)\n"
          f"passwd-file: {seeded.passwd}\nusers file:  {seeded.users_file}")
    return EXIT_OK
