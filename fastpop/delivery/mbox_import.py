"""``fastpop import mbox SPOOL --maildir DIR``: move a user off an mbox
spool (``/var/mail/USER``, served by qpopper, UW ipop3d, Dovecot mbox...)
into a Maildir, keeping the UIDLs the old server served.

The spool is split at its From_ lines: a line starting ``From `` at the
start of the file, or after an empty line and carrying a time (``hh:mm``),
as mutt, Dovecot and c-client read it; an unquoted ``From `` line
elsewhere stays in the body.  Each message loses its From_ line and the
empty line that separates it from the next (the mbox's, not the message's);
one without a final newline is kept as it is (RETR adds the CRLF).  The
first message c-client (UW imapd, ipop3d, pine) keeps its folder state in
(``X-IMAP:``, "DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA") is not
mail and is left out, as ipop3d hides it.  With
``--quoting mboxrd`` a body line ``>From ``, ``>>From ``... loses one ``>``;
with ``mboxo`` (the default) nothing is changed, since mboxo cannot tell a
quoted line from one that had the ``>`` already.

UIDLs: qpopper and many mbox-era servers keep a message's UIDL in an
``X-UIDL:`` header (qpopper writes it into the spool the first time it
serves the message).  Its value (the first such header of the header
section) is the message's UIDL in fastpop; one RFC 1939 does not allow is
replaced by the MD5 of it in hex (fastpop.store.courier.safe_uidl), a value
another message has already gets fastpop's own UIDL.  A message without one
was never served by such a server with a lasting UIDL (qpopper writes one
whenever it serves) and gets fastpop's own UIDL (from the Maildir name):
that is the stated rule for servers that derived UIDLs in another way, whose
clients then download those messages once more.  The UIDLs are pinned in the
Maildir's ``dovecot-uidlist`` (the ``P`` field Dovecot's POP3 serves, as
fastpop.store.dovecot_uidlist keeps them), so they survive the loss of
fastpop's index and hold for Dovecot too.

Delivery is fastpop's (fastpop.delivery.local: tmp/, fsync, rename into
new/), each file given to the Maildir's owner: the spool's owner when run as
root, or ``--owner``.  The spool is the user's file: it is opened without
following a link, must be a regular file with one link, and is locked
(flock and fcntl, as MTAs and POP3 servers lock it) while it is read.
Nothing is held in memory but one message (at most ``--max-message-size``).
Each stored file is read back and compared; with ``--remove-mbox`` the spool
is emptied (truncated: its owner and mode stay, as POP3 servers leave it)
only if every message was imported and verified and the spool did not change
since it was read.  A manifest in the Maildir (``fastpop-mbox-import``: the
SHA-256 of each message imported, its Maildir name and UIDL) makes a second
run import only what is new.
"""

from __future__ import annotations

import argparse
import calendar
import errno
import fcntl
import hashlib
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

MANIFEST = "fastpop-mbox-import"
MAX_MESSAGE = 256 * 1024 * 1024
_CHUNK = 64 * 1024  # lines are read in pieces of at most this: no line is held whole
_FROM_TIME = re.compile(rb"\d{1,2}:\d\d")
_RD_QUOTED = re.compile(rb"^>+From ", re.MULTILINE)
_DATE = re.compile(rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) +([A-Z][a-z]{2}) +(\d{1,2}) +"
                   rb"(\d{1,2}):(\d\d)(?::(\d\d))? +(\d{4})")
_MONTHS = {m.encode(): i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                                                "Oct", "Nov", "Dec"), 1)}


class ImportRefused(Exception):
    """The spool cannot be imported; the message says why (nothing written)."""


@dataclass
class Span:
    """One message of the spool: its bytes are [start, end), From_ line excluded."""

    start: int
    end: int
    from_line: bytes
    x_uidl: str | None = None
    # c-client's (UW imapd, ipop3d, pine) first message, which holds the folder's
    # state ("DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA"): not mail, never served
    internal: bool = False
    _x_imap: bool = False
    _subject: bytes = b""


def _lines(fd: int):
    """(offset, piece, starts a line) for the file, in pieces of at most _CHUNK."""
    buf = b""
    offset = 0
    at_start = True
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) >= _CHUNK:  # a long line: handed on in pieces
                    yield offset, buf, at_start
                    offset += len(buf)
                    buf = b""
                    at_start = False
                break
            piece, buf = buf[: nl + 1], buf[nl + 1 :]
            yield offset, piece, at_start
            offset += len(piece)
            at_start = True
    if buf:
        yield offset, buf, at_start


def _is_blank(piece: bytes) -> bool:
    return piece in (b"\n", b"\r\n")


def scan(fd: int, max_message: int = MAX_MESSAGE) -> list[Span]:
    """The messages of the mbox open as ``fd`` (read from its current offset
    to its end).  ImportRefused if it is not an mbox or a message is larger
    than ``max_message``."""
    return list(iter_spans(fd, max_message))


def iter_spans(fd: int, max_message: int = MAX_MESSAGE) -> Iterator[Span]:
    """scan(), one message at a time: the spool is its user's, and a list of
    its messages costs ~300 bytes of memory for each (a From_ line and an
    empty line, ~33 bytes of spool), so the import never holds one."""
    first = True  # the message being read is the spool's first
    current: Span | None = None
    prev_blank = False
    prev_start = 0  # where the previous line began: a separating empty line is not the message's
    in_header = False
    end = 0
    for offset, piece, at_start in _lines(fd):
        end = offset + len(piece)
        if at_start and piece.startswith(b"From ") and (
            current is None or (prev_blank and _FROM_TIME.search(piece[:1000]))
        ):
            if current is not None:
                current.end = prev_start
                yield _marked(current, first)
                first = False
            elif offset != 0:
                raise ImportRefused("not an mbox: it does not start with a From_ line")
            current = Span(end, end, piece.rstrip(b"\r\n")[:1000])
            in_header = True
            prev_blank = False
            continue
        if current is None:
            raise ImportRefused("not an mbox: it does not start with a From_ line")
        if end - current.start > max_message + 2:
            raise ImportRefused(f"a message (after byte {current.start}) is larger than {max_message} bytes")
        if in_header and at_start:
            if _is_blank(piece):
                in_header = False
            elif current.x_uidl is None and piece[:7].lower() == b"x-uidl:":
                current.x_uidl = piece[7:1000].strip().decode("utf-8", "surrogateescape")
            elif first and piece[:7].lower() == b"x-imap:":
                current._x_imap = True
            elif first and piece[:8].lower() == b"subject:":
                current._subject = piece[8:200].strip()
        prev_start = offset if at_start else prev_start
        prev_blank = at_start and _is_blank(piece)
    if current is not None:
        # the last message: an empty last line is the mbox's separator, not the message's
        current.end = prev_start if prev_blank and end > current.start else end
        yield _marked(current, first)


def _marked(span: Span, first: bool) -> Span:
    """The span, marked internal if it is c-client's folder state (the first message only)."""
    if first and span._x_imap and span._subject.startswith(b"DON'T DELETE THIS MESSAGE"):
        span.internal = True
    return span


def read_message(fd: int, span: Span, quoting: str = "mboxo") -> bytes:
    """The bytes of one message as the mail client should get it."""
    size = span.end - span.start
    data = b""
    while len(data) < size:
        more = os.pread(fd, size - len(data), span.start + len(data))
        if not more:
            raise ImportRefused("the spool shrank while it was read")
        data += more
    if quoting == "mboxrd":
        data = _RD_QUOTED.sub(lambda m: m.group(0)[1:], data)
    return data


def from_time(line: bytes) -> float | None:
    """The time of a From_ line (``From sender Thu Dec  3 10:00:00 2026``, as UTC), or None."""
    m = _DATE.search(line)
    if m is None or m.group(1) not in _MONTHS:
        return None
    mon, day, hour, minute, sec, year = (_MONTHS[m.group(1)], int(m.group(2)), int(m.group(3)),
                                         int(m.group(4)), int(m.group(5) or 0), int(m.group(6)))
    try:
        return float(calendar.timegm((year, mon, day, hour, minute, sec, 0, 0, 0)))
    except (OverflowError, ValueError):
        return None


# -- the command


def add_kind(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "mbox",
        help="an mbox spool (/var/mail/USER) into a Maildir, keeping X-UIDL UIDLs",
        description="Split the mbox SPOOL into messages and deliver them into the Maildir --maildir, "
        "keeping each message's X-UIDL header as its UIDL (docs/migration.md). The spool is only read, "
        "unless --remove-mbox empties it after a verified import.",
    )
    p.add_argument("spool", metavar="SPOOL", help="the mbox file, e.g. /var/mail/USER")
    p.add_argument("--maildir", required=True, metavar="DIR", help="the user's Maildir (created if missing)")
    p.add_argument("--owner", type=int, metavar="UID",
                   help="uid to give the Maildir and messages (default: the spool's owner as root, else yours)")
    p.add_argument("--quoting", choices=("mboxo", "mboxrd"), default="mboxo",
                   help="From_ quoting of the spool: mboxrd removes one '>' from '>From ' lines (default mboxo)")
    p.add_argument("--max-message-size", type=int, default=MAX_MESSAGE, metavar="BYTES",
                   help=f"refuse the spool if a message is larger (default {MAX_MESSAGE})")
    p.add_argument("--remove-mbox", action="store_true",
                   help="empty the spool after every message was imported and verified")
    p.add_argument("--dry-run", action="store_true", help="read and report, write nothing")
    p.set_defaults(func=cmd_import_mbox)


def cmd_import_mbox(args: argparse.Namespace) -> int:
    try:
        result = import_spool(args.spool, args.maildir, owner=args.owner, quoting=args.quoting,
                              max_message=args.max_message_size, remove=args.remove_mbox, dry_run=args.dry_run)
    except ImportRefused as exc:
        print(f"fastpop import mbox: {args.spool}: {exc}; nothing imported", file=sys.stderr)
        return 1
    except OSError as exc:
        where = exc.filename or args.spool
        print(f"fastpop import mbox: {where}: {exc.strerror or exc}; running it again continues where it stopped",
              file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"fastpop import mbox: {args.spool}: {exc}; running it again continues where it stopped",
              file=sys.stderr)
        return 1
    print(result)
    return 0


def open_spool(path: str, writable: bool) -> tuple[int, os.stat_result]:
    """The spool, never through a link in its last component (its directory is
    the administrator's), a regular file with one link; locked with flock and
    fcntl as MTAs lock it."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImportRefused("is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImportRefused("not a regular file")
        if st.st_nlink != 1:
            raise ImportRefused("has other hard links: another file's content, not a spool")
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                fcntl.lockf(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) or time.monotonic() > deadline:
                    raise ImportRefused("is locked by another program (a delivery?); try again") from None
                time.sleep(0.1)
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _ascii_digits(text: str) -> bool:
    """Whether ``text`` is a number int() takes: str.isdigit() alone also
    passes digits such as "²" (Maildir names and the manifest are the user's)."""
    return text.isascii() and text.isdigit()


def _read_manifest(dir_fd: int) -> dict[tuple[str, int], tuple[str, str]]:
    """{(sha256, occurrence): (Maildir name, UIDL)} imported before."""
    from fastpop.store import safefs

    try:
        fd, st = safefs.open_regular(dir_fd, MANIFEST)
    except FileNotFoundError:
        return {}
    try:
        data = os.pread(fd, 64 * 1024 * 1024, 0)
    finally:
        os.close(fd)
    done = {}
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split(" ")
        if len(parts) == 4 and _ascii_digits(parts[1]) and len(parts[1]) <= 20:
            done[(parts[0], int(parts[1]))] = (parts[2], parts[3])
    return done


def _existing_uidls(maildir: str, dir_fd: int, owner: int) -> set[str]:
    """The UIDLs the Maildir's messages have already (its index, dovecot-uidlist)."""
    from fastpop.store import dovecot_uidlist
    from fastpop.store import index as mindex

    taken: set[str] = set()
    current = mindex.load(maildir, dir_fd, owner)
    if current is not None:
        taken.update(e.uidl for e in current.entries())
    try:
        uidlist = dovecot_uidlist.read(dir_fd)
    except (OSError, ValueError):
        uidlist = None
    if uidlist is not None:
        taken.update(uidlist.uidl(base) or "" for base in uidlist.records)
    return taken


def import_spool(spool: str, maildir: str, *, owner: int | None = None, quoting: str = "mboxo",
                 max_message: int = MAX_MESSAGE, remove: bool = False, dry_run: bool = False) -> str:
    """Import the spool into the Maildir (see the module doc); returns a line
    saying what was done.  ImportRefused before anything is written."""
    from fastpop.delivery.local import DeliveryError, normalize, store_normalized
    from fastpop.store import dovecot_uidlist, safefs
    from fastpop.store.courier import safe_uidl
    from fastpop.store.maildir import ensure_maildir
    from fastpop.store.maildir_names import uidl_of

    fd, st = open_spool(spool, remove and not dry_run)
    try:
        if owner is None:
            owner = st.st_uid if os.geteuid() == 0 else os.geteuid()
        if owner == 0 and os.geteuid() == 0:
            raise ImportRefused("belongs to root: give the mail's owner with --owner")
        if os.geteuid() == 0 and st.st_uid != owner:
            raise ImportRefused(f"belongs to uid {st.st_uid}, not to uid {owner} that the Maildir is for")
        # the whole spool checked before anything is written, without holding its messages
        mail = with_uidl = 0
        for span in iter_spans(fd, max_message):
            mail += not span.internal
            with_uidl += bool(span.x_uidl)
        if dry_run:
            return f"{spool}: {mail} messages, {with_uidl} with X-UIDL (dry run: nothing written)"
        ensure_maildir(maildir, owner)
        dir_fd, owner = safefs.open_maildir(maildir, owner)
        try:
            done = _read_manifest(dir_fd)
            taken = _existing_uidls(maildir, dir_fd, owner) | {u for _, u in done.values()}
            seen: dict[str, int] = {}
            pins: dict[str, str] = {}
            if done:  # a run that stopped before pinning: its messages still there are pinned now
                present = _present_bases(dir_fd)
                pins = {n.split(":", 1)[0]: u for n, u in done.values() if n.split(":", 1)[0] in present}
            imported = skipped = 0
            last = 0.0
            os.lseek(fd, 0, os.SEEK_SET)
            for span in _read_again(fd, max_message, spool):
                if span.internal:
                    continue
                data = normalize(read_message(fd, span, quoting))
                digest = hashlib.sha256(data).hexdigest()
                seen[digest] = occurrence = seen.get(digest, 0) + 1
                when = from_time(span.from_line) or 0.0
                if not 0 < when < time.time() + 86400:  # no date, or not one a Maildir name should carry
                    when = time.time()
                when = max(when, last + 1e-6)  # the spool's order is kept in the names
                last = when
                if (digest, occurrence) in done:
                    skipped += 1
                    continue
                try:
                    # moving existing mail: the quota must not stop it halfway (as import legacy)
                    stored = store_normalized(maildir, data, when=when, owner=owner, quota=False)
                except DeliveryError as exc:
                    raise OSError(errno.EIO, str(exc), maildir) from None
                if _digest_of(dir_fd, stored.name, len(data)) != digest:
                    raise OSError(errno.EIO, f"message {stored.name} reads back differently", maildir)
                uidl = uidl_of(stored.name)
                if span.x_uidl:
                    wanted = safe_uidl(span.x_uidl)
                    if wanted not in taken:
                        uidl = wanted
                        pins[stored.name] = uidl
                taken.add(uidl)
                _append_manifest(dir_fd, owner, f"{digest} {occurrence} {stored.name} {uidl}\n")
                imported += 1
            if pins:
                pins = {b: u for b, u in pins.items() if u != uidl_of(b)}
            if pins:
                dovecot_uidlist.assign(dir_fd, list(pins), pins, owner)
        finally:
            os.close(dir_fd)
        line = f"{spool}: {imported} messages imported into {maildir}, {skipped} imported before"
        if remove:
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns, now.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
                return line + "; the spool changed meanwhile: not emptied, run again"
            os.ftruncate(fd, 0)
            os.fsync(fd)
            line += "; spool emptied"
        return line
    finally:
        os.close(fd)


def _read_again(fd: int, max_message: int, spool: str) -> Iterator[Span]:
    """The spool's messages once more, for the import: one it refuses now
    was changed (by its user, who need not lock it) since it was checked,
    and some messages may be stored already (a second run goes on)."""
    try:
        yield from iter_spans(fd, max_message)
    except ImportRefused as exc:
        raise OSError(errno.EAGAIN, f"changed while it was imported ({exc})", spool) from None


def _digest_of(dir_fd: int, name: str, size: int) -> str:
    """SHA-256 of a message just stored (in new/, or in cur/ if a login moved it),
    of ``size`` bytes: "" for a file of another size, unread (its user may have
    put a sparse file of a terabyte in its place, which root would read for hours)."""
    from fastpop.store import safefs

    for sub_name, file_name in (("new", name), ("cur", name + ":2,")):
        sub = os.open(sub_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            try:
                fd, st = safefs.open_regular(sub, file_name)
            except FileNotFoundError:
                continue
        finally:
            os.close(sub)
        h = hashlib.sha256()
        left = size + 1  # one more: a file that grew after the fstat reads back differently
        try:
            if st.st_size != size:
                return ""
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                h.update(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        return h.hexdigest()
    return ""


def _present_bases(dir_fd: int) -> set[str]:
    out: set[str] = set()
    for sub_name in ("new", "cur"):
        sub = os.open(sub_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            out.update(n.split(":", 1)[0] for n in os.listdir(sub))
        finally:
            os.close(sub)
    return out


def _append_manifest(dir_fd: int, owner: int, line: str) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    created = True
    try:
        fd = os.open(MANIFEST, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        created = False
        fd = os.open(MANIFEST, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", MANIFEST)
        # one the user planted (a hard link to a file they may write but do not own):
        # never written, never given to them; only the file made just now is chowned
        if not created and (st.st_nlink != 1 or (os.geteuid() == 0 and st.st_uid not in (0, owner))):
            raise OSError(errno.EPERM, "a hard link or another user's file: not written", MANIFEST)
        if created and os.geteuid() == 0 and owner != 0 and st.st_uid != owner:
            os.fchown(fd, owner, -1)
        os.write(fd, line.encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)


# -- X-UIDL headers of messages already in a Maildir

HEADER_LIMIT = 256 * 1024  # an X-UIDL further into a message than this is not looked for


def header_x_uidl(head: bytes) -> str | None:
    """The first X-UIDL: header's value in the header section of ``head``
    (the start of a message), or None."""
    for line in head.split(b"\n"):
        if line in (b"", b"\r"):
            break
        if line[:7].lower() == b"x-uidl:":
            value = line[7:1000].strip()
            return value.decode("utf-8", "surrogateescape") if value else None
    return None


def add_x_uidl_kind(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "x-uidl",
        help="keep the X-UIDL headers of Maildirs converted from mbox as their UIDLs",
        description="For each message of each MAILDIR that fastpop has not served yet, make the value of its "
        "X-UIDL header its UIDL, pinned in dovecot-uidlist (docs/migration.md). Run it before fastpop serves "
        "these Maildirs: mail that arrives later is never read for X-UIDL headers.",
    )
    p.add_argument("maildirs", nargs="+", metavar="MAILDIR")
    p.add_argument("--dry-run", action="store_true", help="read and report, write nothing")
    p.set_defaults(func=cmd_import_x_uidl)


def cmd_import_x_uidl(args: argparse.Namespace) -> int:
    status = 0
    for path in args.maildirs:
        try:
            print(pin_x_uidls(path, dry_run=args.dry_run))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"fastpop import x-uidl: {path}: {reason}; nothing pinned", file=sys.stderr)
            status = 1
    return status


def pin_x_uidls(maildir: str, dry_run: bool = False) -> str:
    """Pin the X-UIDL of each message of the Maildir that fastpop's index
    does not list (none served yet) into dovecot-uidlist; a line of what was done."""
    from fastpop.store import dovecot_uidlist, safefs
    from fastpop.store import index as mindex
    from fastpop.store.courier import safe_uidl
    from fastpop.store.maildir_names import delivery_order, uidl_of

    fd, owner = safefs.open_maildir(maildir, safefs.ANY_OWNER if os.geteuid() == 0 else os.geteuid())
    try:
        current = mindex.load(maildir, fd, owner)
        served = {e.name.split(":", 1)[0]: e.uidl for e in current.entries()} if current is not None else {}
        taken = set(served.values()) | _existing_uidls(maildir, fd, owner)
        pins: dict[str, str] = {}
        names: list[str] = []
        for sub_name in ("cur", "new"):
            sub = safefs.open_subdir(fd, sub_name, owner, maildir)
            try:
                for name in os.listdir(sub):
                    if name[0] == "." or name.split(":", 1)[0] in served:
                        continue
                    try:
                        mfd, _ = safefs.open_regular(sub, name)
                    except OSError:
                        continue  # a link, a FIFO, gone: never read (the server skips it too)
                    try:
                        head = os.pread(mfd, HEADER_LIMIT, 0)
                    finally:
                        os.close(mfd)
                    names.append(name)
                    value = header_x_uidl(head)
                    if value is not None:
                        pins[name.split(":", 1)[0]] = value
            finally:
                os.close(sub)
        kept: dict[str, str] = {}
        # in delivery order, so the first of two equal X-UIDLs keeps it, whenever this runs
        for base in sorted(pins, key=delivery_order):
            uidl = safe_uidl(pins[base])
            if uidl in taken or uidl == uidl_of(base):
                continue
            taken.add(uidl)
            kept[base] = uidl
        if current is not None and kept:
            line_end = f" ({len(served)} already served by fastpop keep theirs)"
        else:
            line_end = ""
        if dry_run:
            return f"{maildir}: {len(names)} messages, {len(kept)} X-UIDLs to pin (dry run){line_end}"
        if kept:
            dovecot_uidlist.assign(fd, list(kept), kept, owner)
        return f"{maildir}: {len(names)} messages, {len(kept)} X-UIDLs pinned{line_end}"
    finally:
        os.close(fd)
