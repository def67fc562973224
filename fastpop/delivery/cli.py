"""``fastpop deliver``: a local delivery agent for an MTA.

Reads one RFC 5322 message on standard input and stores it in a user's
Maildir (see ``fastpop.delivery.local``); meant for Postfix's ``mailbox_command``
or ``pipe(8)``, or Exim's pipe transport.  It prints nothing on success and
one line on standard error on failure, and its exit status is a sysexits(3)
code, which is how the MTA decides between retrying and bouncing:

====  ==============  ====================================================
code  name            when
====  ==============  ====================================================
0     EX_OK           stored in new/
64    EX_USAGE        bad command line
65    EX_DATAERR      the message is larger than --max-size
66    EX_NOINPUT      standard input is not open
67    EX_NOUSER       no such user (or not a valid user name)
70    EX_SOFTWARE     an internal error (a bug)
73    EX_CANTCREAT    the Maildir cannot be created or written (permissions,
                      a file where a directory should be, ...)
74    EX_IOERR        reading standard input failed
75    EX_TEMPFAIL     disk full, quota, I/O error, user database unavailable,
                      interrupted by a signal, any other storage failure
77    EX_NOPERM       the user's uid is not the one fastpop runs as (and it is
                      not root, so it cannot switch)
78    EX_CONFIG       no passwd-file, an unreadable or invalid --config, a
                      mail location that cannot be expanded, a uid without a
                      gid, an unknown [server] user
====  ==============  ====================================================

A failure never leaves a file in new/.  Started as root, it writes as the
user's uid from the passwd-file, else as the server's ``[server] user`` from
--config, so the server can read what it stored.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import pwd
import signal
import sys
from typing import NoReturn

from fastpop.delivery.local import (
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
    DeliveryError,
)
from fastpop.store import safefs

PROG = "fastpop deliver"
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGXCPU)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deliver",
        help="store a message from stdin in a user's Maildir (an LDA for Postfix or Exim)",
        description="Read one message on standard input and store it in the user's Maildir. "
        "Exit status is a sysexits(3) code: 0 stored, 67 no such user, 75 try again later, ...",
    )
    _strict(p)
    p.add_argument("--user", "-u", required=True, metavar="NAME", help="user name or address to deliver to")
    p.add_argument("--config", help="TOML configuration file (as for fastpop serve)")
    p.add_argument("--passwd-file", help="Dovecot-style passwd-file")
    p.add_argument("--mail-location", help="Maildir path template: %%u user, %%n local part, %%d domain, %%h home")
    p.add_argument("--allow-mail-as-root", action="store_true",
                   help="as root, for a user without a uid and no [server] user, write as root instead "
                        "of refusing (unsafe where users can write their Maildirs: docs/security.md)")
    p.add_argument("--max-size", type=_size, metavar="BYTES", help="refuse larger messages (K, M, G suffixes)")
    p.set_defaults(func=cmd_deliver)


def _strict(parser: argparse.ArgumentParser) -> None:
    """Every command-line error, unknown arguments too, exits EX_USAGE (argparse: 2)
    with one line: an MTA reads sysexits codes."""

    def error(message: str) -> NoReturn:
        print(f"{PROG}: {message}", file=sys.stderr)
        sys.exit(EX_USAGE)

    parse_known_args = parser.parse_known_args

    def parse_all(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_all  # type: ignore[method-assign]


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    mult = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if mult > 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}")
    return int(digits) * mult


class _Interrupted(BaseException):
    pass


def _interrupt(signum: int, _frame) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def cmd_deliver(args: argparse.Namespace) -> int:
    # Nothing may reach stderr but the one line below: quiet the loggers.
    root = logging.getLogger("fastpop")
    root.addHandler(logging.NullHandler())
    root.propagate = False
    for sig in _SIGNALS:
        signal.signal(sig, _interrupt)
    try:
        deliver(args)
        return EX_OK
    except DeliveryError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except _Interrupted as exc:
        print(f"{PROG}: interrupted by {exc}, nothing stored", file=sys.stderr)
        return EX_TEMPFAIL
    except MemoryError:
        print(f"{PROG}: out of memory, nothing stored", file=sys.stderr)
        return EX_TEMPFAIL
    except Exception as exc:  # a bug: still one line and a status the MTA understands
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_SOFTWARE


async def _resolve_network(config, address: str):
    from fastpop.auth.authenticator import Authenticator
    from fastpop.delivery.local import resolve_async

    auth = Authenticator.from_config(config)
    try:
        return await resolve_async(auth, address)
    finally:
        await auth.close()


def deliver(args: argparse.Namespace) -> None:
    from fastpop.auth.authenticator import Authenticator, AuthUnavailable
    from fastpop.config import Config, load_toml
    from fastpop.delivery.local import normalize, resolve, store_normalized

    try:
        config = load_toml(args.config) if args.config else Config()
    except (OSError, ValueError) as exc:
        raise DeliveryError(EX_CONFIG, f"cannot use config {args.config}: {_reason(exc)}") from None
    passwd_file = args.passwd_file or config.passwd_file
    mail_location = args.mail_location or config.mail_location
    network_db = config.userdb_driver != "passwd-file" and not args.passwd_file
    if not passwd_file and not network_db:
        raise DeliveryError(EX_CONFIG, "no passwd_file configured (use --passwd-file or --config)")

    try:
        if network_db:  # SQL or LDAP from --config: one asynchronous lookup
            config.mail_location = mail_location
            recipient = asyncio.run(_resolve_network(config, args.user))
        else:
            auth = Authenticator(passwd_file, mail_location)
            recipient = resolve(auth, args.user)
    except AuthUnavailable as exc:
        raise DeliveryError(EX_TEMPFAIL, f"user database unavailable: {exc}") from None
    except (OSError, ValueError) as exc:
        raise DeliveryError(EX_TEMPFAIL, f"user database unavailable: {_reason(exc)}") from None
    if recipient is None:
        raise DeliveryError(EX_NOUSER, f"no such user: {args.user}")
    _become(recipient.user, config, args.allow_mail_as_root)

    data = _strip_envelope_line(_read_stdin(args.max_size))
    data = normalize(data)
    # No signal may interrupt between the rename into new/ and the exit status:
    # that would report a failure for a stored message and make the MTA retry.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        store_normalized(recipient.maildir, data)
    finally:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def _become(user, config, args_allow_root: bool = False) -> None:
    """Write as the owner the Maildir should have: the user's uid from the
    passwd-file, else (when started as root) the server's ``[server] user``.
    Root switches; anyone else with the wrong uid is refused.  Mail is never
    written as root unless allowed: not for a user without a uid, nor for one
    whose uid is 0 (a user database entry, or an injected field, as Dovecot
    refuses below first_valid_uid)."""
    euid = os.geteuid()
    allow_root = config.allow_mail_as_root or args_allow_root
    if user.uid == 0 and not allow_root:
        raise DeliveryError(EX_CONFIG, f"refusing to deliver as root: user {user.name} has uid 0 (docs/security.md)")
    if user.uid is None:
        if euid != 0:
            return
        if not config.user:
            if allow_root:
                return
            raise DeliveryError(
                EX_CONFIG,
                f"refusing to deliver as root: user {user.name} has no uid and no [server] user is "
                "configured (give the user a uid in the user database, or set [server] user in "
                "--config to the owner of the Maildirs; docs/security.md)",
            )
        try:
            entry = pwd.getpwnam(config.user)
            gid = grp.getgrnam(config.group).gr_gid if config.group else entry.pw_gid
        except KeyError:
            raise DeliveryError(EX_CONFIG,
                                f"no such system user or group: {config.user}:{config.group or ''}") from None
        _switch(entry.pw_uid, gid)
        return
    if euid == user.uid:
        return
    if euid != 0:
        raise DeliveryError(EX_NOPERM, f"user {user.name} has uid {user.uid}, fastpop deliver runs as uid {euid}")
    gid = user.gid
    if gid is None:
        try:
            gid = pwd.getpwuid(user.uid).pw_gid
        except KeyError:
            raise DeliveryError(EX_CONFIG, f"user {user.name} has uid {user.uid} but no gid") from None
    _switch(user.uid, gid)


def _switch(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    safefs.forget_euid()


def _read_stdin(limit: int | None) -> bytes:
    try:
        os.fstat(0)
    except OSError:
        raise DeliveryError(EX_NOINPUT, "standard input is not open") from None
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(0, 1 << 20)
        except OSError as exc:
            raise DeliveryError(EX_IOERR, f"cannot read the message from standard input: {exc.strerror}") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if limit is not None and total > limit:
            raise DeliveryError(EX_DATAERR, f"message larger than --max-size ({limit} bytes)")
        chunks.append(chunk)


def _strip_envelope_line(data: bytes) -> bytes:
    """Drop the mbox "From sender date" line Postfix's local(8) and Exim's pipe
    transport put before the message (it is never a header: no colon)."""
    if data.startswith(b"From "):
        end = data.find(b"\n")
        return b"" if end < 0 else data[end + 1 :]
    return data
