"""Command line: ``fastpop serve``, ``fastpop user``, ``fastpop --version``.

Other subcommands live beside the code they drive: each module named in
``SUBCOMMAND_MODULES`` has ``add_subcommand(subparsers)``, which adds its
parser and sets ``func`` to a function taking the parsed args and returning
the exit status.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import os
import sys

from fastpop import __version__
from fastpop.config import Config, load_toml

SUBCOMMAND_MODULES: tuple[str, ...] = ("fastpop.delivery.cli", "fastpop.delivery.legacy_import", "fastpop.bench",
                                       "fastpop.auth.oauth", "fastpop.serve.control_cli",
                                       "fastpop.serve.expire_cli")


def _version() -> str:
    """The version and, for each compiled module, whether it or its Python twin is used."""
    from fastpop import _compiled

    choices = ", ".join(f"{name}: {impl}" for name, impl in _compiled.implementations().items())
    return f"fastpop {__version__} ({choices})"


class _VersionAction(argparse.Action):
    """--version, printed as is (argparse's own wraps it) and computed only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and which compiled modules are used, then exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpop", description="A fast, correct POP3 server.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the POP3 server")
    serve.set_defaults(func=cmd_serve)
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--demo", action="store_true", help="create and serve a demo user and mailbox on 127.0.0.1:1110")
    serve.add_argument("--demo-dir", default="fastpop-demo",
                       help="where --demo keeps its files (default: ./fastpop-demo)")
    serve.add_argument("--listen", action="append", metavar="HOST:PORT", help="address to listen on (repeatable)")
    serve.add_argument("--lmtp-listen", action="append", metavar="HOST:PORT|unix:PATH",
                       help="also accept mail over LMTP here (repeatable)")
    serve.add_argument("--passwd-file", help="Dovecot-style passwd-file")
    serve.add_argument("--mail-location", help="Maildir path template: %%u user, %%n local part, %%d domain, %%h home")
    serve.add_argument("--mail-lock", choices=["table", "symlink"],
                       help="one session per mailbox by a per-host lock table (default) or a "
                            "fastpop.lock symlink in each Maildir (several hosts on one NFS store)")
    serve.add_argument("--mail-lock-table", metavar="PATH",
                       help="the lock table file (default /run/fastpop/mailbox.locks as root)")
    serve.add_argument("--mail-uidl", choices=["maildir", "dovecot"],
                       help="UIDLs from the Maildir names, reading dovecot-uidlist (default), or given "
                            "as Dovecot does: UIDs assigned in dovecot-uidlist under its lock")
    serve.add_argument("--hostname", help="host name in the APOP greeting")
    serve.add_argument("--user", help="switch to this user after binding (start as root)")
    serve.add_argument("--group", help="switch to this group after binding (default: the user's)")
    serve.add_argument("--allow-mail-as-root", action="store_true", default=None,
                       help="started as root without --user, serve mail as root instead of refusing "
                            "(unsafe where users can write their Maildirs: docs/security.md)")
    serve.add_argument("--loop", choices=["uvloop", "asyncio"])
    serve.add_argument("--workers", type=int, metavar="N",
                       help="worker processes sharing the listeners, restarted if they die (default: CPUs)")
    serve.add_argument("--max-connections", type=int, metavar="N",
                       help="connections in total over all workers (default 0: as many as descriptors allow)")
    serve.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                       help="on SIGTERM, time logged-in sessions get to finish (default 30)")
    serve.add_argument("--no-sendfile", dest="sendfile", action="store_false", default=None,
                       help="send every message through the userspace transform")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "keyvalue", "json"],
                       help="log lines as text (default), key=value pairs (logfmt) or JSON objects")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics over HTTP here (default: metrics off)")
    serve.add_argument("--control-socket", metavar="PATH",
                       help="the control socket of fastpop who/kick/deny/maintenance ('none': off; default "
                            "control.sock in the lock table's runtime directory)")
    serve.add_argument("--control-group", metavar="GROUP", help="this group may use the control socket too (0660)")
    serve.add_argument("--control-deny-file", metavar="PATH",
                       help="where fastpop deny keeps its list (default: denied-users beside the auth secret)")
    serve.add_argument("--timeout-authorization", type=float, metavar="SECONDS", help="idle time allowed before login")
    serve.add_argument("--timeout-transaction", type=float, metavar="SECONDS", help="idle time allowed after login")
    serve.add_argument("--auth-failure-delay", type=float, metavar="SECONDS",
                       help="delay before answering a failed login")
    serve.add_argument("--auth-max-attempts", type=int, metavar="N", help="failed logins before disconnecting")
    serve.add_argument("--expire", help="EXPIRE: days after which retrieved mail is deleted (NEVER, or 0: at QUIT)")
    serve.add_argument("--expire-per-user", action=argparse.BooleanOptionalAction, default=None,
                       help="say EXPIRE ... USER before login: the user database sets per-user values")
    serve.add_argument("--login-delay", type=int, metavar="SECONDS", help="LOGIN-DELAY capability value")
    serve.add_argument("--client-workarounds", metavar="NAME,...",
                       help="Dovecot's POP3 client workarounds: outlook-no-nuls, oe-ns-eoh (comma-separated)")
    serve.add_argument("--pop3-last", dest="pop3_last", action="store_true", default=None,
                       help="answer RFC 1460's obsolete LAST command")
    serve.add_argument("--deleted-flag", metavar="KEYWORD",
                       help="POP3 deletion adds this IMAP keyword instead of deleting (Dovecot's pop3_deleted_flag)")
    serve.add_argument("--seen-on-retr", action=argparse.BooleanOptionalAction, default=None,
                       help="flag retrieved messages \\Seen at QUIT, as Dovecot's POP3 does")
    tls = serve.add_argument_group("TLS and authentication")
    tls.add_argument("--tls-cert", metavar="PEM", help="certificate chain: enables STLS (reloaded on SIGHUP)")
    tls.add_argument("--tls-key", metavar="PEM", help="private key (default: in the certificate file)")
    tls.add_argument("--tls-min-version", choices=["TLSv1.2", "TLSv1.3"])
    tls.add_argument("--tls-handshake-timeout", type=float, metavar="SECONDS")
    tls.add_argument("--tls-sni", action="append", metavar="NAME=PEM[,KEY]",
                     help="a certificate for clients asking for NAME (or *.DOMAIN) by SNI (repeatable)")
    tls.add_argument("--tls-cert-dir", metavar="DIR",
                     help="certificates chosen by SNI: DIR/NAME/fullchain.pem+privkey.pem (certbot's live/) or"
                          " DIR/NAME.pem, served for the names they hold")
    tls.add_argument("--tls-reload-interval", type=float, metavar="SECONDS",
                     help="check the certificate files for changes this often (default 5; 0: SIGHUP only)")
    tls.add_argument("--listen-tls", action="append", metavar="HOST:PORT",
                     help="implicit-TLS listener, e.g. :995 (repeatable)")
    tls.add_argument("--trusted-networks", metavar="CIDR,...",
                     help="plaintext logins allowed without TLS, no penalties"
                          " ('none' for no network; default loopback)")
    tls.add_argument("--auth-mechanisms", metavar="MECH,...",
                     help="SASL mechanisms offered (default PLAIN,LOGIN,SCRAM-SHA-256)")
    tls.add_argument("--apop", dest="auth_apop", action="store_true", default=None,
                     help="offer APOP (RFC 1939; off by default): needs {PLAIN} passwords, weak without TLS")
    tls.add_argument("--auth-secret-file", metavar="FILE",
                     help="the server's persistent secret, made if missing (default: $STATE_DIRECTORY/auth.key, "
                          "/var/lib/fastpop/auth.key as root, else ~/.local/state/fastpop/auth.key)")
    tls.add_argument("--auth-penalty-initial", type=float, metavar="SECONDS",
                     help="delay after a first failure (0: no penalty)")
    tls.add_argument("--auth-penalty-max", type=float, metavar="SECONDS", help="longest penalty delay")
    tls.add_argument("--auth-penalty-half-life", type=float, metavar="SECONDS",
                     help="time for a failure count to halve")
    tls.add_argument("--max-connections-per-ip", type=int, metavar="N",
                     help="open connections per address (0: no limit)")
    tls.add_argument("--max-connections-per-ip-exempt", metavar="CIDR,...",
                     help="networks without the per-address cap, still penalised (carrier-grade NAT, webmail)")
    tls.add_argument("--auth-master-passwd-file", metavar="FILE",
                     help="master users' passwd-file: USER alice*admin logs admin in as alice (default: off)")
    tls.add_argument("--oauth-validator", metavar="NAME",
                     help="hmac, command or module:function (enables OAUTHBEARER, XOAUTH2)")
    tls.add_argument("--oauth-secret-file", metavar="FILE", help="shared secret of the hmac validator")
    tls.add_argument("--oauth-command", metavar="COMMAND", help="token checker of the command validator")
    proxy = serve.add_argument_group("behind a load balancer (PROXY protocol v1/v2, fastpop.session.proxied)")
    proxy.add_argument("--proxy-listen", action="append", metavar="HOST:PORT",
                       help="listener that requires a PROXY header, e.g. for HAProxy's send-proxy-v2 (repeatable)")
    proxy.add_argument("--proxy-listen-tls", action="append", metavar="HOST:PORT",
                       help="the same, then implicit TLS (the proxy passes TLS through; needs --tls-cert)")
    proxy.add_argument("--proxy-trusted-networks", metavar="CIDR,...", help="the proxies allowed to send the header")
    proxy.add_argument("--proxy-timeout", type=float, metavar="SECONDS",
                       help="wait this long for the header (default 5)")

    user = sub.add_parser("user", help="manage a passwd-file")
    user.set_defaults(func=cmd_user)
    user_sub = user.add_subparsers(dest="user_command", required=True)
    for name, help_text in (
        ("add", "add a user (password from a prompt or stdin)"),
        ("passwd", "change a user's password"),
        ("del", "delete a user"),
        ("list", "list users"),
    ):
        p = user_sub.add_parser(name, help=help_text)
        p.add_argument("--passwd-file", help="passwd-file to edit")
        p.add_argument("--config", help="take passwd_file from this TOML configuration")
        if name != "list":
            p.add_argument("name")
        if name in ("add", "passwd"):
            from fastpop.auth.passwords import CREATABLE_SCHEMES, DEFAULT_SCHEME

            p.add_argument("--scheme", default=DEFAULT_SCHEME, type=str.upper, choices=CREATABLE_SCHEMES)
            p.add_argument("--no-scram", dest="scram", action="store_false",
                           help="do not store SCRAM-SHA-256 keys (the scram_sha256 extra field) beside the hash")
        if name == "add":
            p.add_argument("--home", help="home directory (the %%h of the mail location)")
            p.add_argument("--uid", type=int)
            p.add_argument("--gid", type=int)
    flush = user_sub.add_parser(
        "flush", help="empty the auth cache of a running server (SQL, LDAP): sends it SIGHUP",
        description="Empties the auth cache of a running fastpop (and re-reads its TLS certificate): "
                    "sends SIGHUP to the server, or to the supervisor of --workers, which passes it on.")
    target = flush.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="the server's (or supervisor's) process id")
    target.add_argument("--pid-file", help="a file holding that process id")
    # fastpop proxy (fastpop.proxy): serve's flags; the sessions are relayed to [backends]
    proxy_cmd = sub.add_parser(
        "proxy", parents=[serve], add_help=False, conflict_handler="resolve",
        help="run a POP3 proxy that routes each user to their backend",
        description="A fastpop server whose logins are relayed to the users' backends ([backends] in the "
                    "configuration file: docs/configuration.md, docs/deploy.md); it takes serve's flags.")
    proxy_cmd.set_defaults(func=cmd_proxy)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_subcommand(sub)
    return parser


_FLAG_FIELDS = (
    "passwd_file",
    "mail_location",
    "mail_lock",
    "mail_lock_table",
    "mail_uidl",
    "hostname",
    "user",
    "group",
    "allow_mail_as_root",
    "loop",
    "workers",
    "max_connections",
    "shutdown_timeout",
    "sendfile",
    "log_level",
    "timeout_authorization",
    "timeout_transaction",
    "auth_failure_delay",
    "auth_max_attempts",
    "auth_apop",
    "auth_secret_file",
    "expire",
    "expire_per_user",
    "seen_on_retr",
    "deleted_flag",
    "login_delay",
    "pop3_last",
    "tls_cert",
    "tls_key",
    "tls_min_version",
    "tls_handshake_timeout",
    "tls_cert_dir",
    "tls_reload_interval",
    "listen_tls",
    "auth_penalty_initial",
    "auth_penalty_max",
    "auth_penalty_half_life",
    "max_connections_per_ip",
    "auth_master_passwd_file",
    "oauth_validator",
    "oauth_secret_file",
    "oauth_command",
    "proxy_listen",
    "proxy_listen_tls",
    "proxy_timeout",
    "log_format",
    "metrics_listen",
    "control_socket",
    "control_group",
    "control_deny_file",
)


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_toml(args.config) if args.config else Config()
    if args.demo:
        from fastpop import demo

        config.passwd_file, config.mail_location = demo.prepare(args.demo_dir)
        config.listen = [demo.DEMO_LISTEN]
        if config.auth_secret_file is None:  # the demo's files stay in its directory
            config.auth_secret_file = os.path.join(os.path.dirname(config.passwd_file), "auth.key")
        # The demo's mail is its own, in a directory only this user can write
        # (demo.prepare checks): serving it as root reads nobody's files.
        config.allow_mail_as_root = True
    if args.listen:
        config.listen = args.listen
    if args.lmtp_listen:
        config.lmtp_listen = args.lmtp_listen
    for name in _FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.trusted_networks is not None:
        nets = [n.strip() for n in args.trusted_networks.split(",") if n.strip()]
        config.trusted_networks = [] if nets == ["none"] else nets
    if args.max_connections_per_ip_exempt is not None:
        config.max_connections_per_ip_exempt = [n.strip() for n in args.max_connections_per_ip_exempt.split(",")
                                                if n.strip()]
    if args.proxy_trusted_networks is not None:
        config.proxy_trusted_networks = [n.strip() for n in args.proxy_trusted_networks.split(",") if n.strip()]
    for given in args.tls_sni or ():
        name, eq, files = given.partition("=")
        if not eq or not name or not files:
            raise ValueError(f"--tls-sni {given!r}: expected NAME=CHAIN.pem or NAME=CHAIN.pem,KEY.pem")
        config.tls_sni[name] = files.split(",")
    if args.auth_mechanisms is not None:
        config.auth_mechanisms = [m.strip().upper() for m in args.auth_mechanisms.split(",") if m.strip()]
    if args.client_workarounds is not None:
        config.client_workarounds = [w.strip().lower() for w in args.client_workarounds.split(",") if w.strip()]
    if getattr(args, "route", False):
        config.backend_route = True
    if config.backend_route and config.auth_mechanisms is None and config.backend_master_user is None:
        # fastpop proxy without a master login: only the mechanisms that give it the password
        config.auth_mechanisms = ["PLAIN", "LOGIN"]
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from fastpop.serve.validation import validate_all

    try:
        config = config_from_args(args)
        validate_all(config)
    except (OSError, ValueError) as exc:
        print(f"fastpop: {exc}", file=sys.stderr)
        return 2
    from fastpop.serve.logformat import configure_logging

    configure_logging(config.log_format, config.log_level)
    if args.demo:
        from fastpop import demo

        print(demo.banner(config.listen[0]), file=sys.stderr, flush=True)
    from fastpop.serve import workers
    from fastpop.serve.server import RefusedAsRoot

    try:
        return workers.run(config, reload=lambda: _reloaded_config(args))
    except RefusedAsRoot as exc:
        print(f"fastpop: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG, as fastpop deliver
    except OSError as exc:
        print(f"fastpop: {exc}", file=sys.stderr)
        return 1


def cmd_proxy(args: argparse.Namespace) -> int:
    args.route = True  # (config_from_args: on SIGHUP too)
    return cmd_serve(args)


def _reloaded_config(args: argparse.Namespace) -> Config:
    """SIGHUP: the config file read again, the command line's flags still winning."""
    from fastpop.serve.validation import validate_all

    config = config_from_args(args)
    validate_all(config)
    return config


def _read_password() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("passwords do not match")
    return first


def cmd_user(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fastpop.auth.authenticator import valid_username
    from fastpop.auth.passwd_file import (
        Problem,
        UserRecord,
        check_record,
        read_records,
        write_records,
    )
    from fastpop.auth.passwords import hash_password
    from fastpop.auth.sasl import SCRAM_EXTRA, make_scram_keys

    if args.user_command == "flush":
        return _flush_cache(args)
    path = args.passwd_file or (load_toml(args.config).passwd_file if args.config else None)
    if not path:
        print("fastpop: give --passwd-file or --config", file=sys.stderr)
        return 2
    problems: list[Problem] = []
    records = read_records(path, problems)
    for problem in problems:
        print(f"fastpop: warning: {problem.describe(path)}: line skipped (the server skips it too)", file=sys.stderr)
    if args.user_command == "list":
        for rec in records:
            print(rec.name)
        return 0
    broken = next((p for p in problems if p.name == args.name), None)
    if broken is not None:
        print(f"fastpop: {path}:{broken.lineno}: the line of user {args.name} is malformed; "
              "correct or remove it by hand first", file=sys.stderr)
        return 1
    index = next((i for i, r in enumerate(records) if r.name == args.name), None)
    if args.user_command == "del":
        if index is None:
            print(f"fastpop: no user {args.name}", file=sys.stderr)
            return 1
        records = [r for r in records if r.name != args.name]  # every line of the user
    else:
        if args.user_command == "add" and index is not None:
            print(f"fastpop: user {args.name} exists", file=sys.stderr)
            return 1
        if args.user_command == "passwd" and index is None:
            print(f"fastpop: no user {args.name}", file=sys.stderr)
            return 1
        if not valid_username(args.name) or args.name.startswith("#"):
            why = " (a passwd-file line starting with '#' is a comment)" if args.name.startswith("#") else ""
            print(f"fastpop: invalid user name {args.name!r}{why}", file=sys.stderr)
            return 2
        if index is None:
            try:  # before the password prompt: the name, uid, gid and home fit in the file
                check_record(UserRecord(args.name, "", uid=args.uid, gid=args.gid, home=args.home))
            except ValueError as exc:
                print(f"fastpop: {exc}", file=sys.stderr)
                return 2
        password = _read_password()
        if not password:
            print("fastpop: empty password", file=sys.stderr)
            return 2
        if args.scheme == "PLAIN" and _unstorable_in_clear(password):
            # The passwd-file has no escape for its separators, and Dovecot
            # none either: such a password is stored hashed, never in clear.
            print("fastpop: a password stored with --scheme PLAIN cannot contain ':' or control characters "
                  "(the passwd-file's field and line separators); choose a hashing scheme, "
                  "e.g. the default --scheme ARGON2ID", file=sys.stderr)
            return 2
        stored = hash_password(password, args.scheme)
        extra = dict(records[index].extra) if index is not None else {}
        extra.pop(SCRAM_EXTRA, None)
        if args.scram and args.scheme != "PLAIN":
            # SCRAM-SHA-256 needs keys derived from the password: stored now,
            # so the plaintext is never needed again (Dovecot's format).
            extra[SCRAM_EXTRA] = make_scram_keys(password)
        if index is None:
            records.append(UserRecord(args.name, stored, uid=args.uid, gid=args.gid, home=args.home, extra=extra))
        else:
            records[index] = replace(records[index], password=stored, extra=extra)
    try:
        write_records(path, records)
    except ValueError as exc:  # check_record: never a line that would read back otherwise
        print(f"fastpop: {exc}; {path} left unchanged", file=sys.stderr)
        return 2
    except OSError as exc:  # (it names the passwd-file, never the temporary file written first)
        print(f"fastpop: {exc}", file=sys.stderr)
        return 1
    return 0


def _unstorable_in_clear(password: str) -> bool:
    from fastpop.auth.passwd_file import UserRecord, check_record

    try:
        check_record(UserRecord("x", "{PLAIN}" + password))
    except ValueError:
        return True
    return False


def _flush_cache(args: argparse.Namespace) -> int:
    import os
    import signal

    pid = args.pid
    if pid is None:
        try:
            with open(args.pid_file) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            print(f"fastpop: cannot read a process id from {args.pid_file}: {exc}", file=sys.stderr)
            return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"fastpop: cannot signal process {pid}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"fastpop: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
