"""``fastpop who``, ``kick``, ``deny``, ``allow``, ``maintenance``: clients of
a running server's control socket (fastpop.serve.control; docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fastpop.config import Config, load_toml


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", metavar="PATH", help="the server's control socket (default: as the server's)")
        p.add_argument("--config", help="the server's TOML configuration: its [control] socket")
        p.add_argument("--json", action="store_true", help="the server's answer as JSON, for scripts")
        p.set_defaults(func=cmd_control)

    p = subparsers.add_parser("who", help="list the open POP3 sessions of a running server")
    common(p)
    p.set_defaults(control="who")
    p = subparsers.add_parser("kick", help="end the sessions of a user or an address (nothing is deleted)",
                              description="End every session of USER, or from ADDRESS (an IP address or a "
                                          "network such as 192.0.2.0/24), as a shutdown does: -ERR [SYS/TEMP] and "
                                          "close, no UPDATE state, so messages marked with DELE stay.")
    common(p)
    p.add_argument("target", metavar="USER|ADDRESS")
    p.set_defaults(control="kick")
    for name, text in (("deny", "refuse the logins of a user until fastpop allow (kept across restarts)"),
                       ("allow", "let a denied user log in again")):
        p = subparsers.add_parser(name, help=text)
        common(p)
        p.add_argument("user", nargs="?" if name == "deny" else None,
                       help="the user (deny without one lists the denied users)" if name == "deny" else None)
        p.set_defaults(control=name)
    p = subparsers.add_parser("maintenance", help="refuse new logins with [SYS/TEMP] while sessions finish (on), "
                                                  "or accept them again (off)")
    common(p)
    p.add_argument("mode", choices=["on", "off", "status"])
    p.set_defaults(control="maintenance")


def _message(args: argparse.Namespace) -> dict[str, Any]:
    command = args.control
    if command == "kick":
        return {"cmd": "kick", "target": args.target}
    if command == "deny" and args.user is None:
        return {"cmd": "status"}
    if command in ("deny", "allow"):
        return {"cmd": command, "user": args.user}
    if command == "maintenance":
        return {"cmd": "status"} if args.mode == "status" else {"cmd": "maintenance", "on": args.mode == "on"}
    return {"cmd": command}


def cmd_control(args: argparse.Namespace) -> int:
    from fastpop.serve import control

    path = args.socket
    if path is None:
        config = load_toml(args.config) if args.config else Config()
        path = control.socket_path(config)
        if path is None:
            print("fastpop: the control socket is off ([control] socket = \"none\")", file=sys.stderr)
            return 1
    try:
        answer = control.request(path, _message(args))
    except (OSError, ValueError) as exc:
        print(f"fastpop: cannot reach the server's control socket {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        _show(args, answer)
    for error in answer.get("errors", ()):
        print(f"fastpop: {error}", file=sys.stderr)
    if not answer.get("ok"):
        if not args.json:
            print(f"fastpop: {answer.get('error')}", file=sys.stderr)
        return 1
    if answer.get("warning"):
        print(f"fastpop: warning: {answer['warning']}", file=sys.stderr)
    if args.control == "kick" and not answer.get("kicked"):
        return 1  # no session matched
    return 0


def _show(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    if not answer.get("ok"):
        return
    command = args.control
    if command == "who":
        header = ("USER", "ADDRESS", "STATE", "SINCE", "WORKER", "PID", "SENT")
        rows = [(s["user"] or "-", s["address"], s["state"], s["since"],
                 "-" if s["worker"] is None else str(s["worker"]), str(s["pid"]), str(s["bytes_sent"]))
                for s in answer["sessions"]]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    elif command == "kick":
        print(f"kicked {answer['kicked']} session{'s' if answer['kicked'] != 1 else ''}")
    elif command in ("deny", "allow"):
        if command == "deny" and args.user is None:
            for user in answer["denied"]:
                print(user)
        else:
            print(f"{args.user} {'denied' if command == 'deny' else 'allowed'}")
    elif command == "maintenance":
        print(f"maintenance {'on' if answer['maintenance'] else 'off'}")
