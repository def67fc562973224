"""``fastpop expire``: the EXPIRE sweep (fastpop.store.expire), for cron or a
systemd timer.

Over every user of the passwd-file (or the users named, or Maildirs given
with ``--maildir``), messages retrieved ``expire`` or more days ago (the
user's own ``pop3_expire``/``expire`` field, else ``[pop3] expire``, or
``--days``) are deleted.  Each mailbox is taken with the same lock a POP3
login takes (``[mail] lock``): a mailbox in use by a session is skipped and
left for the next run, so a client never loses a message it is being shown.
Exit status: 0, or 1 if a mailbox could not be expired (not for one in use),
64 for a usage or configuration error, 75 if the user database is unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

EX_USAGE = 64
EX_TEMPFAIL = 75


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "expire", help="delete messages retrieved EXPIRE days ago (RFC 2449), for cron or a systemd timer",
        description="Delete the messages POP3 clients retrieved at least EXPIRE days ago, in every mailbox of "
        "the passwd-file, or of the users or Maildirs given. A mailbox in use by a session is skipped.")
    p.add_argument("users", nargs="*", metavar="USER", help="only these users (default: every passwd-file user)")
    p.add_argument("--config", help="TOML configuration file (as for fastpop serve)")
    p.add_argument("--passwd-file", help="Dovecot-style passwd-file")
    p.add_argument("--mail-location", help="Maildir path template: %%u user, %%n local part, %%d domain, %%h home")
    p.add_argument("--maildir", action="append", default=[], metavar="PATH",
                   help="expire this Maildir (repeatable; with --days or [pop3] expire)")
    p.add_argument("--days", metavar="N", help="EXPIRE days for every mailbox, instead of the configured ones")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing for mailboxes with nothing to do")
    p.set_defaults(func=cmd_expire)


def cmd_expire(args: argparse.Namespace) -> int:
    from fastpop.auth.authenticator import Authenticator, AuthUnavailable
    from fastpop.config import Config, load_toml
    from fastpop.store import expire, index, maildir
    from fastpop.store.locking import mailbox_locks
    from fastpop.store.safefs import served_uid

    def fail(code: int, text: str) -> int:
        print(f"fastpop expire: {text}", file=sys.stderr)
        return code

    try:
        config = load_toml(args.config) if args.config else Config()
        forced = expire.parse_days(args.days) if args.days is not None else None
    except (OSError, ValueError) as exc:
        return fail(EX_USAGE, str(exc))
    if args.passwd_file:
        config.passwd_file = args.passwd_file
        config.userdb_driver = "passwd-file"
    if args.mail_location:
        config.mail_location = args.mail_location
    if os.geteuid() == 0 and config.user:  # the index directory and the locks are the serving uid's
        from fastpop.serve.server import drop_privileges

        drop_privileges(config.user, config.group)
    try:
        index.configure(config.mail_index)
        maildir.configure_uidl(config.mail_uidl)
        maildir.configure_deleted_flag(config.deleted_flag)
        locks = mailbox_locks(config.mail_lock, config.mail_lock_table)
    except (OSError, ValueError) as exc:
        return fail(EX_USAGE, f"cannot use the configuration: {exc}")

    # (label, Maildir, uid it is served as, days or None)
    targets: list[tuple[str, str, int, int | None]] = []
    default_days = forced if args.days is not None else expire.parse_days(config.expire)
    for path in args.maildir:
        targets.append((path, path, served_uid(None), default_days))
    if args.users or not args.maildir:
        try:
            auth = Authenticator.from_config(config)
            if args.users:
                records = []
                for name in args.users:
                    record = (asyncio.run(_lookup(auth, name)) if auth.is_async else auth.lookup(name))
                    if record is None:
                        return fail(EX_USAGE, f"no such user: {name}")
                    records.append(record)
            elif auth.is_async or not config.passwd_file:
                return fail(EX_USAGE, "a SQL or LDAP user database cannot be listed: name the users "
                            "(fastpop expire USER...) or give --maildir")
            else:
                from fastpop.auth.passwd_file import read_records

                records = read_records(config.passwd_file)
        except (AuthUnavailable, OSError) as exc:
            return fail(EX_TEMPFAIL, f"user database unavailable: {exc}")
        for record in records:
            days = forced if args.days is not None else expire.days_for(record.extra, config.expire)
            try:
                path = auth.maildir_for(record)
            except ValueError as exc:
                print(f"{record.name}: no mail location: {exc}", file=sys.stderr)
                continue
            targets.append((record.name, path, served_uid(record.uid), days))

    status = 0
    for label, path, owner, days in targets:
        if days is None:
            continue  # EXPIRE NEVER
        result = sweep(locks, path, owner, days)
        if result.startswith("error"):
            status = 1
        if not (args.quiet and result in ("expired 0", "no mailbox", "no record")):
            print(f"{label}: {result}")
    return status


async def _lookup(auth, name: str):
    try:
        return await auth.lookup_async(name)
    finally:
        await auth.close()


def sweep(locks, path: str, owner: int, days: int) -> str:
    """Expire one mailbox under its lock; a short result for the report."""
    from fastpop.store import expire
    from fastpop.store.locking import MailboxLocked
    from fastpop.store.maildir import Mailbox

    if not expire.has_record(path):
        return "no record"  # nothing was ever retrieved with EXPIRE on: not even locked
    try:
        lock = locks.acquire(path)
    except FileNotFoundError:
        return "no mailbox"
    except MailboxLocked:
        return "in use, skipped"
    except OSError as exc:
        return f"error: cannot lock: {exc.strerror or exc}"
    try:
        mailbox = Mailbox.open(path, owner)
        try:
            removed = expire.expire(mailbox, days)
        finally:
            mailbox.close()
        if removed:
            Mailbox.open(path, owner).close()  # the index without them, for the next login
        return f"expired {removed}"
    except (OSError, ValueError) as exc:
        return f"error: {exc}"
    finally:
        lock.release()
